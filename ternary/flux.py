"""FLUX (BFL / ComfyUI key names): which linears are quantized, architecture detection,
and tiny FLUX-architecture models made from a seed for tests and the default CLI job."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

# Every linear inside the double and single blocks, modulation included.
_BLOCK_LINEAR = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))$"
)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_REQUIRED = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_mlp.0.weight",
)
# RMSNorm weights are `*_norm.scale` in BFL files and `*_norm.weight` inside ComfyUI.
_KEY_NORM = (
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "double_blocks.0.img_attn.norm.key_norm.weight",
)


class NotFluxError(ValueError):
    """The weights are not a FLUX.1 diffusion model in BFL / ComfyUI naming."""


def is_block_linear(module_name: str) -> bool:
    """True for a module name (without ``.weight``) that the ternary format quantizes."""
    return _BLOCK_LINEAR.match(module_name) is not None


def strip_prefix(key: str) -> str:
    """Drop the ``model.diffusion_model.`` / ``diffusion_model.`` prefix of full checkpoints."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


@dataclass(frozen=True)
class FluxConfig:
    """The shape of a FLUX model, as ComfyUI's detection reads it from the weights."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    in_channels: int = 64
    context_in_dim: int = 4096
    vec_in_dim: int = 768
    mlp_ratio: float = 4.0
    guidance_embed: bool = True

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def as_dict(self) -> dict:
        return asdict(self)


FLUX_DEV = FluxConfig()
TINY_FLUX = FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)


def detect_config(shapes: dict[str, tuple[int, ...]]) -> FluxConfig:
    """Read a FluxConfig from {key: logical shape}; raise NotFluxError naming what is missing.

    Keys may carry a checkpoint prefix. Shapes must be logical ([out, in] for linears).
    """
    shapes = {strip_prefix(k): tuple(v) for k, v in shapes.items()}
    missing = [k for k in _REQUIRED if k not in shapes]
    key_norm = next((k for k in _KEY_NORM if k in shapes), None)
    if key_norm is None:
        missing.append(_KEY_NORM[0])
    if missing:
        raise NotFluxError(
            "not a FLUX.1 diffusion model: missing "
            + ", ".join(missing[:4])
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[key_norm][0]
    doubles = {int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")}
    singles = {int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")}
    for kind, found in (("double", doubles), ("single", singles)):
        if found and found != set(range(max(found) + 1)):
            gaps = sorted(set(range(max(found) + 1)) - found)
            raise NotFluxError(f"not a complete FLUX model: {kind} blocks {gaps[:4]} are missing")
    depth = max(doubles) + 1
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
    return FluxConfig(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=max(singles) + 1 if singles else 0,
        in_channels=in_channels,
        context_in_dim=shapes["txt_in.weight"][1],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        mlp_ratio=mlp_hidden / hidden,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def flux_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX model of this config: {BFL key: shape}."""
    h, mlp, head = config.hidden_size, config.mlp_hidden, config.hidden_size // config.num_heads
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    linear("img_in", h, config.in_channels)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    linear("vector_in.in_layer", h, config.vec_in_dim)
    linear("vector_in.out_layer", h, h)
    if config.guidance_embed:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", h, config.context_in_dim)
    for i in range(config.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (head,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", mlp, h)
            linear(f"{p}_mlp.2", h, mlp)
    for i in range(config.depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + mlp, h)
        linear(f"{p}.linear2", h, h + mlp)
        shapes[f"{p}.norm.query_norm.scale"] = (head,)
        shapes[f"{p}.norm.key_norm.scale"] = (head,)
        linear(f"{p}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", config.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def random_flux_state_dict(
    config: FluxConfig = TINY_FLUX,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """A FLUX model of this config with weights drawn from a seed (tests, benchmarks, CLI).

    Linear weights are N(0, 1/fan_in) so activations keep their size through the blocks;
    biases are small; RMSNorm scales are 1.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, shape in flux_shapes(config).items():
        if key.endswith(".scale"):
            tensor = torch.ones(shape, device=device)
        elif key.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=gen, device=device)
        else:
            tensor = torch.randn(shape, generator=gen, device=device) / shape[1] ** 0.5
        state[key] = tensor.to(dtype)
    return state
