"""What the pack needs to know of a model family: the :class:`Family` record, and helpers
the family modules share (random weights, FLUX-like configurations read from shapes). The
list of families is in models/registry.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

Shapes = Mapping[str, tuple[int, ...]]
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefix(key: str) -> str:
    """Drop the ``model.diffusion_model.`` / ``diffusion_model.`` prefix of full checkpoints."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class ModelFamilyError(ValueError):
    """The weights are not a model of the family asked for, or of any family the pack knows;
    the message says what was found."""


@dataclass(frozen=True)
class TextConditioning:
    """What a family's model is conditioned on, for random conditioning of the right shapes
    (the Report node, benchmarks, tests): text embeddings [tokens, context_dim], a pooled
    vector [pooled_dim] (None: the family has none) and the guidance value its text
    encoding carries by default."""

    context_dim: int
    tokens: int  # what ComfyUI's text encoder of the family gives for a short prompt
    pooled_dim: int | None
    guidance: float


@dataclass(frozen=True)
class Family:
    """What the pack needs to know of one model family, in its own (BFL / ComfyUI) key names.

    ``claims`` is a cheap look at the keys that only this family has; ``detect`` reads the
    full configuration from the logical shapes (ternary weights as [N, K]) and raises
    ModelFamilyError naming what does not fit. ``is_ternary`` says which linear (module
    name, without ``.weight``) becomes ternary: the linears inside the transformer blocks
    (and, for FLUX.2, the global modulation linears that replaced the blocks' own).
    """

    name: str  # the file header's ``architecture``
    title: str  # for people: "FLUX.1"
    claims: Callable[[Shapes], bool]
    detect: Callable[[Shapes], Any]
    is_ternary: Callable[[str], bool]
    shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # config -> every tensor's shape
    describe: Callable[[Any], str]  # config -> one line for reports
    latent_channels: Callable[[Any], int]
    conditioning: Callable[[Any], TextConditioning]
    presets: Mapping[str, Any]  # named configurations (full sizes, tiny test models)

    def preset(self, name: str) -> Any:
        if name not in self.presets:
            raise ModelFamilyError(
                f"{self.title} has no preset {name!r}; choose from {', '.join(self.presets)}"
            )
        return self.presets[name]


def add_linear(
    shapes: dict[str, tuple[int, ...]], name: str, n_out: int, n_in: int, bias: bool = True
) -> None:
    """A linear's tensors in a {key: shape} being built (weight [out, in], bias [out])."""
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def check_shapes(
    expected: Mapping[str, tuple[int, ...]],
    shapes: Shapes,
    title: str,
    error: type[ModelFamilyError] = ModelFamilyError,
) -> None:
    """Every expected tensor present with its shape: a file cannot claim one size in its
    embedders and hold another in its blocks. RMSNorm weights are ``*.scale`` in BFL files
    and ``*.weight`` once ComfyUI has loaded them: either name is accepted."""
    for key, shape in expected.items():
        got = shapes.get(key)
        if got is None and key.endswith(".scale"):
            got = shapes.get(key[: -len("scale")] + "weight")
        if got is None:
            raise error(f"not a complete {title} model: {key} is missing")
        if tuple(got) != shape:
            raise error(f"{key} has shape {list(got)}, expected {list(shape)} for {title}")


def iter_random_weights(
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    ones: Callable[[str], bool] = lambda key: key.endswith(".scale"),
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in the order of ``shapes``, drawn from a seed one tensor at a time:
    what :func:`random_weights` holds, without holding it (a 64 GB model can be made and
    quantized layer by layer)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for key, shape in shapes.items():
        if ones(key):
            tensor = torch.ones(shape, device=device)
        elif key.endswith(".bias") or len(shape) == 1:
            tensor = 0.02 * torch.randn(shape, generator=gen, device=device)
        else:
            tensor = torch.randn(shape, generator=gen, device=device) / shape[1] ** 0.5
        yield key, tensor.to(dtype)


def random_weights(
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    ones: Callable[[str], bool] = lambda key: key.endswith(".scale"),
) -> dict[str, torch.Tensor]:
    """Weights drawn from a seed for tests and benchmarks (nothing is ever downloaded).

    Matrices are N(0, 1/fan_in) so activations keep their size through the blocks, biases
    are small, and norm weights (``ones``) are 1.
    """
    return dict(iter_random_weights(shapes, seed, dtype, device, ones))


def random_source(
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], Callable[[str], torch.Tensor]]:
    """(shapes with dtypes, get) of :func:`random_weights` made one tensor at a time, for the
    streaming quantizer (models/files.quantize_tensors): ``get`` must be asked for the keys
    in order, and hands out exactly the tensors random_weights would hold."""
    stream = iter_random_weights(shapes, seed, dtype, device)

    def get(key: str) -> torch.Tensor:
        made, tensor = next(stream, (None, None))
        if made != key:
            raise RuntimeError(f"random weights are made in order: asked for {key}, next {made}")
        return tensor

    return {key: (dtype, tuple(shape)) for key, shape in shapes.items()}, get


# RMSNorm weights are `*_norm.scale` in BFL files and `*_norm.weight` inside ComfyUI.
KEY_NORM = (
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "double_blocks.0.img_attn.norm.key_norm.weight",
)


class FluxLikeConfig:
    """What a FLUX-like configuration (a frozen dataclass of the family, with ``hidden_size``,
    ``num_heads`` and ``mlp_ratio``) derives from its fields, the same in every family."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float

    @property
    def mlp_hidden(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def as_dict(self) -> dict:
        return asdict(self)


def flux_dimensions(
    shapes: Shapes,
    title: str,
    required: tuple[str, ...],
    error: type[ModelFamilyError],
    mlp: tuple[str, int],
    widths: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """The fields every FLUX-like configuration reads from its shapes (double and single
    blocks with q / k RMSNorms, ``img_in`` and ``txt_in`` embedders): hidden size, heads,
    block counts, latent and text widths, MLP ratio (the MLP width is ``shapes[mlp[0]]``
    along axis ``mlp[1]``), and the family's own ``widths`` ({field: (key, axis)}).
    Raises ``error`` naming the missing keys or what does not fit."""
    missing = [k for k in required if k not in shapes]
    key_norm = next((k for k in KEY_NORM if k in shapes), None)
    if key_norm is None:
        missing.append(KEY_NORM[0])
    if missing:
        raise error(
            f"not a {title} diffusion model: missing "
            + ", ".join(missing[:4])
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    if len(shapes[key_norm]) != 1:
        raise error(f"not a {title} diffusion model: {key_norm} is not a vector")
    depth = block_indices(shapes, "double_blocks", "double", error)
    singles = block_indices(shapes, "single_blocks", "single", error)
    head_dim = shapes[key_norm][0]
    try:
        hidden, in_channels = shapes["img_in.weight"]
        mlp_hidden = shapes[mlp[0]][mlp[1]]
        context_in_dim = shapes["txt_in.weight"][1]
        own = {name: shapes[key][axis] for name, (key, axis) in (widths or {}).items()}
    except (KeyError, ValueError, IndexError):
        raise error(f"not a {title} diffusion model: its embedders have odd shapes") from None
    if head_dim < 1 or hidden % head_dim:
        raise error(f"not a {title} model: hidden size {hidden} and head size {head_dim}")
    return dict(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=singles,
        in_channels=in_channels,
        context_in_dim=context_in_dim,
        mlp_ratio=mlp_hidden / hidden,
        **own,
    )


def block_indices(
    shapes: Shapes, prefix: str, kind: str, error: type[ModelFamilyError] = ModelFamilyError
) -> int:
    """How many blocks ``prefix.<i>.`` the keys hold, raising ``error`` if one is missing.

    Bounded by the number of keys, whatever indices a (damaged) file claims.
    """
    found = set()
    for key in shapes:
        if key.startswith(f"{prefix}."):
            index = key[len(prefix) + 1 :].split(".")[0]
            if not (index.isascii() and index.isdigit()):
                raise error(f"{key}: block index {index!r} is not a number")
            found.add(int(index))
    count = len(found)
    if found and max(found) != count - 1:
        gaps = [i for i in range(min(max(found), count + 4)) if i not in found][:4]
        raise error(f"not a complete model: {kind} blocks {gaps} are missing")
    return count
