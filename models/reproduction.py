"""Import a checkpoint of the public 1.58-bit FLUX reproduction (ugonfor/1.58bit-flux).

Its ``ternary_distilled_r*_*.pt`` files hold, per diffusers-named linear ``L``, only the
trained ``L.scale`` [out, 1], ``L.lora_A`` (the UP matrix, [out, r]) and ``L.lora_B`` (the
DOWN matrix, [r, in]); the ternary T is recomputed from the bf16 FLUX.1-dev base with the
absmean rule. The reproduction computes ``y = (x T^T) * s + (x B^T) A^T + bias``.

This module writes the same model as a v1 ternary file in BFL names:

* block linears become ternary layers: T from the base, s from the checkpoint, LoRA in
  kohya / PEFT orientation (down = lora_B, up = lora_A, alpha = rank: scale 1);
* fused BFL layers (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``) gather their diffusers
  row slices: scales concatenate, the slices' LoRAs become one block-structured LoRA with
  down = the downs stacked [S r, in] and up block-diagonal [out, S r]. This is exact and an
  ordinary LoRA for every loader and kernel, at the cost of storing zeros in up;
* the linears outside the blocks, which the reproduction also made ternary, are written as
  dense float32 weights ``s T + A B`` computed in float32, so their outputs equal the
  reproduction's to float rounding while the file keeps the format's rule that only block
  linears are ternary (64 M parameters: about 128 MB more than bf16 for FLUX.1-dev);
* ``norm_out.linear`` is ``final_layer.adaLN_modulation.1`` with its halves swapped
  (diffusers emits (scale, shift), BFL (shift, scale)): its scale rows and up rows are
  swapped; T is per row, so ternarizing the BFL-ordered base weight gives the swapped T.

The checkpoint holds no ternary codes, so a base with the right architecture but other
weights would import silently. With a LoRA (rank > 0) the base is checked first: the LoRA
was trained to carry the base's quantization residual W - s T, so the cosine between the
two (per layer, median over a sample of layers) is clearly positive on the right base
(0.3-0.9 on simulated checkpoints) and about 0 on any other. A checkpoint of scales alone
(rank 0) gives nothing to check against.
"""

from __future__ import annotations

import os
import pickle
import re
import statistics
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ternary.atomic import check_target
from ..ternary.convert import LayerPlan, Progress, convert, plan_entries, write_converted
from ..ternary.fileformat import MmapReader, build_metadata
from ..ternary.integrity import DamagedFileError, check_zip
from ..ternary.packing import pack
from ..ternary.quantize import ternarize
from .family import ModelFamilyError, Shapes
from .files import dense_tensors, diffusion_model_keys, logical, strip_prefix
from .flux1 import FAMILY, FluxConfig, NotFluxError, detect_config, is_block_linear
from .registry import detect_family

# BFL module (inside a block) -> its diffusers linears, in BFL row order.
_DOUBLE_BLOCK = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_OUTSIDE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_HALF_SWAPPED = "final_layer.adaLN_modulation.1"
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_KINDS = ("scale", "lora_A", "lora_B")
_BASE_DTYPES = (torch.bfloat16, torch.float32)
_OUT_DTYPE = torch.bfloat16  # every tensor taken from the base as it is
_DENSE_DTYPE = torch.float32  # the linears outside the blocks, s T + A B
_CHECKPOINT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float64: to float32
BASE_CHECK_LAYERS = 24  # layers sampled for the base check
MIN_BASE_COSINE = 0.05  # median below this: not the base the LoRAs were trained on (other
# bases give |cos| < 0.01; the right one 0.3-0.9, and 0.1 for a weak rank-4 LoRA on tiny layers)


class CheckpointError(ValueError):
    """A reproduction checkpoint that cannot be imported; the message names the problem."""


@dataclass
class ReproductionImport:
    """The imported model: v1 tensors (empty when streamed to a file), layers, metadata."""

    layers: dict[str, tuple[int, int]]
    lora_rank: int
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Linear:
    """One BFL linear that the checkpoint covers, with its diffusers row slices."""

    module: str
    parts: tuple[str, ...]
    rows: tuple[int, ...]
    in_features: int
    ternary: bool


def diffusers_parts(module: str) -> tuple[str, ...] | None:
    """Diffusers linears making up a BFL linear (row blocks, in order), or None if none."""
    if module in _OUTSIDE:
        return (_OUTSIDE[module],)
    match = _BLOCK.match(module)
    if match is None:
        return None
    kind, index, name = match.groups()
    table, prefix = (
        (_DOUBLE_BLOCK, "transformer_blocks")
        if kind == "double_blocks"
        else (_SINGLE_BLOCK, "single_transformer_blocks")
    )
    if name not in table:
        return None
    return tuple(f"{prefix}.{index}.{part}" for part in table[name])


def _plan_linears(shapes: dict[str, tuple[int, ...]], hidden: int) -> list[_Linear]:
    linears = []
    for key, shape in shapes.items():
        module = key[: -len(".weight")]
        parts = diffusers_parts(module) if key.endswith(".weight") else None
        if parts is None:
            continue
        n, k = shape
        rows = (n,) if len(parts) == 1 else (hidden,) * 3 + (n - 3 * hidden,) * (len(parts) - 3)
        linears.append(_Linear(module, parts, rows, k, is_block_linear(module)))
    return linears


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a reproduction .pt with ``weights_only=True`` (no code runs) and check its type.

    Its zip members' CRC-32 checksums are verified first (``torch.load`` does not); float64
    tensors come back as float32 (a dtype the format stores), fp8, integer, sparse or
    non-tensor entries and keys that are not names are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (torch.save zip format)")
    try:
        check_zip(path, "download it again")
    except DamagedFileError as err:
        raise CheckpointError(str(err)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a {found.group(1)} object" if found else "Python objects"
        raise CheckpointError(
            f"{path.name} holds {what}, not only tensors: torch.load(weights_only=True) refuses "
            "it, and code from a checkpoint is never run; expected a plain state dict"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path.name} is not a state dict (it holds {type(state).__name__})")
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise CheckpointError(
            f"{path.name}: key {names[0]!r} is a {type(names[0]).__name__}, not a layer name; "
            "expected a state dict"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path.name}: {bad[0]!r} is not a tensor; expected a state dict")
    sparse = [k for k, v in state.items() if v.layout != torch.strided]
    if sparse:
        raise CheckpointError(
            f"{path.name}: {sparse[0]} is a {state[sparse[0]].layout} tensor; expected dense ones"
        )
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (*_CHECKPOINT_DTYPES, torch.float64):
        names = ", ".join(sorted(str(d) for d in dtypes))
        raise CheckpointError(
            f"{path.name}: expected float tensors of one dtype (bf16, fp16, fp32 or fp64), "
            f"found {names}"
        )
    if dtypes == {torch.float64}:
        state = {k: v.float() for k, v in state.items()}
    return state


def _check_checkpoint(state: dict[str, torch.Tensor], linears: list[_Linear], name: str) -> int:
    """Check keys and shapes against the base; return the LoRA rank (0: scales only)."""
    has_lora = any(k.endswith((".lora_A", ".lora_B")) for k in state)
    kinds = _KINDS if has_lora else _KINDS[:1]
    expected = {f"{part}.{kind}" for lin in linears for part in lin.parts for kind in kinds}
    unknown = sorted(set(state) - expected)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CheckpointError(
            f"{name}: unknown keys {', '.join(unknown[:3])}{more}: not a reproduction "
            "checkpoint of this base model (expected <diffusers layer>.scale / .lora_A / "
            ".lora_B of the base's linears)"
        )
    ranks = [
        v.shape[0] if k.endswith(".lora_B") else v.shape[1]
        for k, v in state.items()
        if k.endswith((".lora_A", ".lora_B")) and v.dim() == 2
    ]
    if has_lora and not ranks:
        raise CheckpointError(f"{name}: its lora_A / lora_B tensors are not matrices")
    rank = ranks[0] if has_lora else 0
    for lin in linears:
        for part, rows in zip(lin.parts, lin.rows, strict=True):
            missing = [f"{part}.{kind}" for kind in kinds if f"{part}.{kind}" not in state]
            if missing:
                raise CheckpointError(
                    f"{name}: layer {part} (part of {lin.module}) is missing: no "
                    + ", ".join(missing)
                )
            want = {"scale": (rows, 1), "lora_A": (rows, rank), "lora_B": (rank, lin.in_features)}
            for kind in kinds:
                got = tuple(state[f"{part}.{kind}"].shape)
                if got != want[kind]:
                    raise CheckpointError(
                        f"{name}: {part}.{kind} has shape {list(got)}, expected "
                        f"{list(want[kind])} (base {lin.module} is "
                        f"[{sum(lin.rows)}, {lin.in_features}], LoRA rank {rank})"
                    )
    bad = next((k for k, v in state.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"{name}: {bad} holds NaN or infinite values")
    return rank


def _gather(
    state: dict[str, torch.Tensor], lin: _Linear, rank: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scale [N] float32, down [S r, K], up [N, S r]) of a BFL linear, in BFL row order."""
    kinds = _KINDS if rank else _KINDS[:1]
    if not all(bool(torch.isfinite(state[f"{p}.{k}"]).all()) for p in lin.parts for k in kinds):
        raise CheckpointError(f"the checkpoint's scale or LoRA of {lin.module} is not finite")
    scale = torch.cat([state[f"{p}.scale"][:, 0] for p in lin.parts]).float()
    down = up = None
    if rank:
        down = torch.cat([state[f"{p}.lora_B"] for p in lin.parts])
        up = torch.block_diag(*[state[f"{p}.lora_A"] for p in lin.parts])
    if lin.module == _HALF_SWAPPED:
        half = scale.shape[0] // 2
        scale = torch.cat([scale[half:], scale[:half]])
        up = None if up is None else torch.cat([up[half:], up[:half]])
    return scale, down, up


def _layer_plans(linears: dict[str, _Linear], rank: int, lora_dtype) -> dict[str, LayerPlan]:
    """The ternary layers of the import (fused layers carry S slices' LoRAs: rank S r)."""
    return {
        lin.module: LayerPlan(sum(lin.rows), lin.in_features, rank * len(lin.parts), lora_dtype)
        for lin in linears.values()
        if lin.ternary
    }


class _Converter:
    """make_layer and dense of the conversion loop: T from the base, the rest from the .pt."""

    def __init__(self, linears: dict[str, _Linear], state, rank: int, packing: str) -> None:
        self.linears, self.state, self.rank, self.packing = linears, state, rank, packing

    def make_layer(self, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        t, _ = ternarize(weight, "absmean")
        scale, down, up = _gather(self.state, self.linears[module], self.rank)
        parts = {"weight": pack(t, self.packing), "weight_scale": scale}
        if self.rank:
            parts.update(lora_down=down, lora_up=up, lora_alpha=torch.tensor(float(down.shape[0])))
        return parts

    def dense(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        lin = self.linears.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if lin is None:
            return tensor.to(_OUT_DTYPE)
        t, _ = ternarize(tensor, "absmean")
        scale, down, up = _gather(self.state, lin, self.rank)
        dense = t.float() * scale[:, None]
        if self.rank:
            dense += up.float() @ down.float()
        return dense.to(_DENSE_DTYPE)


def _dense_dtype(linears: dict[str, _Linear]):
    """The stored dtype of each dense tensor of the import (for plan_entries)."""

    def dtype_of(key: str, _source_dtype) -> torch.dtype:
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        return _DENSE_DTYPE if module in linears else _OUT_DTYPE

    return dtype_of


def base_cosines(
    get: Callable[[str], torch.Tensor],
    state: dict[str, torch.Tensor],
    linears: list[_Linear],
    rank: int,
    count: int = BASE_CHECK_LAYERS,
) -> list[float]:
    """Per sampled block linear: cos(up @ down, W - s T) with W the base's weight, T its
    ternary codes and s, up, down the checkpoint's."""
    ternary = [lin for lin in linears if lin.ternary]
    step = max(len(ternary) / count, 1)
    sample = [ternary[int(i * step)] for i in range(min(count, len(ternary)))]
    cosines = []
    for lin in sample:
        weight = get(f"{lin.module}.weight").float()
        t, _ = ternarize(weight, "absmean")
        scale, down, up = _gather(state, lin, rank)
        residual = weight - t.float() * scale[:, None]
        product = up.float() @ down.float()
        norm = float(residual.norm() * product.norm())
        cosines.append(float((residual * product).sum()) / norm if norm > 0 else 0.0)
    return cosines


def check_base(
    get: Callable[[str], torch.Tensor],
    state: dict[str, torch.Tensor],
    linears: list[_Linear],
    rank: int,
    source: str,
    checkpoint: str,
) -> float | None:
    """Refuse a base the checkpoint's LoRAs were not trained on; returns the median cosine
    (None for a checkpoint without LoRA: nothing to compare)."""
    if not rank:
        return None
    cosines = base_cosines(get, state, linears, rank)
    median = statistics.median(cosines)
    if median < MIN_BASE_COSINE:
        raise CheckpointError(
            f"{checkpoint} was not trained on {source}: its LoRAs do not fit the base's "
            f"quantization residual (median cosine {median:.3f} over {len(cosines)} layers; "
            f"about 0.3-0.9 on the base it was trained from, about 0 on another). Use the "
            "bf16 FLUX.1-dev base of the reproduction"
        )
    return median


def base_config(shapes: Shapes, source: str) -> FluxConfig:
    """The FLUX.1 config of a base given as {key: logical shape}. The checkpoints are of
    FLUX.1-dev: a base of another family or FLUX.1 schnell is refused by name (their keys
    would be blamed on the checkpoint: guidance embedder keys the base lacks)."""
    try:
        config = detect_config(shapes)
    except NotFluxError:
        try:
            family, other = detect_family(shapes)
        except ModelFamilyError:
            family = None
        if family is None or family is FAMILY:
            raise
        raise NotFluxError(
            f"{source} is {family.describe(other)}: reproduction checkpoints are of "
            "FLUX.1-dev; use the bf16 FLUX.1-dev base"
        ) from None
    if not config.guidance_embed:
        raise NotFluxError(
            f"{source} is FLUX.1 schnell-like (no guidance embedder): reproduction checkpoints "
            "are of FLUX.1-dev; use the bf16 FLUX.1-dev base"
        )
    return config


def import_reproduction(
    base_path: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    packing: str = "base3",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ReproductionImport:
    """Turn a bf16 FLUX base (BFL / ComfyUI names) + a reproduction .pt into a v1 model.

    With ``out_path`` the result is streamed to that file (atomically; the returned
    ``tensors`` stay empty); without it the tensors are returned in memory. Everything is
    checked before anything is written. Raises NotFluxError (base), CheckpointError (.pt),
    FileExistsError (``out_path`` exists and ``overwrite`` is false).
    """
    base_path, checkpoint_path = Path(base_path), Path(checkpoint_path)
    if out_path is not None:
        out_path = Path(out_path)
        check_target(out_path, overwrite=True)  # a name too long, a folder, not writable
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{out_path} exists; pass --force to overwrite it")
        if out_path.resolve() in (base_path.resolve(), checkpoint_path.resolve()):
            raise ValueError("the output must not be one of the input files")
    with MmapReader(base_path) as reader:
        shapes, get = dense_tensors(reader)
        return _import(
            shapes,
            get,
            base_path.name,
            checkpoint_path,
            out_path,
            packing,
            overwrite,
            progress,
        )


def import_reproduction_from_weights(
    base: Mapping[str, torch.Tensor],
    checkpoint_path: str | os.PathLike,
    *,
    source: str = "base weights",
    packing: str = "2bit",
    progress: Progress | None = None,
) -> ReproductionImport:
    """:func:`import_reproduction` in memory, with the bf16 base given as tensors.

    For a base that is already loaded (a ComfyUI MODEL): ``base`` maps BFL / ComfyUI
    names to tensors, read one at a time; ``source`` names the base in messages and
    metadata. Raises as :func:`import_reproduction` does.
    """
    shapes = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in base.items()}
    return _import(
        shapes, base.__getitem__, source, Path(checkpoint_path), None, packing, False, progress
    )


def _import(
    base_shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    get: Callable[[str], torch.Tensor],
    source: str,
    checkpoint_path: Path,
    out_path: Path | None,
    packing: str,
    overwrite: bool,
    progress: Progress | None,
) -> ReproductionImport:
    """The import of both entry points: ``base_shapes`` (key -> (dtype, shape)) and ``get``
    (key -> tensor) describe the base under its own key names."""
    names = {strip_prefix(k): k for k in diffusion_model_keys(list(base_shapes))}
    shapes = {k: base_shapes[names[k]] for k in names}
    config = base_config(logical(shapes), source)
    linears = _plan_linears(logical(shapes), config.hidden_size)
    for lin in linears:
        dtype = shapes[f"{lin.module}.weight"][0]
        if dtype not in _BASE_DTYPES:
            raise ValueError(
                f"{source}: {lin.module}.weight is {dtype}; the reproduction's ternary "
                "weights are recomputed from the bf16 FLUX.1-dev weights, so use the bf16 base"
            )
    state = load_checkpoint(checkpoint_path)
    rank = _check_checkpoint(state, linears, checkpoint_path.name)
    lora_dtype = next(iter(state.values())).dtype
    base_cosine = check_base(
        lambda key: get(names[key]), state, linears, rank, source, checkpoint_path.name
    )
    by_module = {lin.module: lin for lin in linears}
    plans = _layer_plans(by_module, rank, lora_dtype)
    layers = {module: (p.n, p.k) for module, p in plans.items()}
    metadata = build_metadata(
        layers,
        packing,
        rank,
        "absmean",
        architecture=FAMILY.name,
        extra={
            "source": source,
            "imported_from": f"1.58bit-flux reproduction: {checkpoint_path.name}",
            **({} if base_cosine is None else {"base_cosine": f"{base_cosine:.4f}"}),
        },
    )
    result = ReproductionImport(layers, rank, metadata)
    converter = _Converter(by_module, state, rank, packing)
    loop = convert(
        list(names), lambda key: get(names[key]), plans, converter.make_layer, converter.dense,
        progress,
    )  # fmt: skip
    if out_path is None:
        result.tensors = dict(loop)
        return result
    entries = plan_entries(shapes, plans, packing, dense=_dense_dtype(by_module))
    write_converted(out_path, entries, metadata, loop, overwrite=overwrite)
    return result
