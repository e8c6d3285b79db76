"""Quantize a FLUX model to the ternary format: in memory, or streamed file to file.

Both paths share one loop over the source tensors, so a file quantized by the CLI and a
model quantized in ComfyUI hold the same numbers. The file path reads the source through
mmap one tensor at a time and writes with :class:`StreamingWriter`: peak memory is about
one layer, not the model.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .fileformat import MmapReader, StreamingWriter, build_metadata, dtype_from_name
from .flux import FluxConfig, detect_config, is_block_linear, strip_prefix
from .packing import pack, packed_shape
from .quantize import dequantize, residual_lora, ternarize

Progress = Callable[[int, int, str], None]
_KEEP_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class LayerError:
    """Relative Frobenius error of one layer: ||W - sT|| / ||W|| (and with the LoRA)."""

    name: str
    shape: tuple[int, int]
    ternary: float
    with_lora: float | None = None


@dataclass
class QuantizeReport:
    """What a quantization did: counts, bytes, per-layer errors, time, peak memory."""

    config: FluxConfig
    params_total: int = 0
    params_quantized: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    layers: list[LayerError] = field(default_factory=list)

    def format(self) -> str:
        """A plain-text summary for the terminal and for ComfyUI's node output."""
        errors = [e.ternary for e in self.layers]
        lines = [
            f"quantized layers        {len(self.layers)}",
            f"parameters quantized    {self.params_quantized:,} of {self.params_total:,} "
            f"({100 * self.params_quantized / max(self.params_total, 1):.2f} %)",
            f"bytes before            {self.bytes_before:,} ({self.bytes_before / 1e9:.3f} GB)",
            f"bytes after             {self.bytes_after:,} ({self.bytes_after / 1e9:.3f} GB)",
            f"size ratio              {self.bytes_before / max(self.bytes_after, 1):.2f}x smaller",
        ]
        if errors:
            lines.append(
                "relative error ||W-sT||/||W||  "
                f"min {min(errors):.4f}  median {statistics.median(errors):.4f}  "
                f"max {max(errors):.4f}"
            )
            worst = max(self.layers, key=lambda e: e.ternary)
            lines.append(f"worst layer             {worst.name} {list(worst.shape)}")
        lora = [e.with_lora for e in self.layers if e.with_lora is not None]
        if lora:
            lines.append(
                "relative error with LoRA  "
                f"median {statistics.median(lora):.4f}  max {max(lora):.4f}"
            )
        lines.append(f"time                    {self.seconds:.1f} s")
        if self.peak_rss_bytes:
            lines.append(f"peak RAM (process)      {self.peak_rss_bytes / 1e9:.2f} GB")
        return "\n".join(lines)


def quantize_layer(
    weight: torch.Tensor,
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "2bit",
    lora_dtype: torch.dtype = torch.bfloat16,
) -> tuple[dict[str, torch.Tensor], LayerError]:
    """Quantize one dense [N, K] weight: ({suffix: tensor}, error) for the file format."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"weight of shape {tuple(weight.shape)} holds NaN or infinite values")
    t, scale = ternarize(weight, scale_rule)
    w = weight.float()
    norm = w.norm().clamp(min=1e-30)
    residual = w - dequantize(t, scale)
    error = LayerError("", tuple(weight.shape), float(residual.norm() / norm))
    out = {"weight": pack(t, packing), "weight_scale": scale}
    if lora_rank:
        down, up = residual_lora(weight, t, scale, lora_rank)
        down, up = down.to(lora_dtype), up.to(lora_dtype)
        error.with_lora = float((residual - up.float() @ down.float()).norm() / norm)
        out.update(lora_down=down, lora_up=up, lora_alpha=torch.tensor(float(lora_rank)))
    return out, error


def plan(
    shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], lora_rank: int, packing: str
) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, tuple[int, int]]]:
    """Output tensors (key -> (dtype, shape), in file order) and the layer list for a source."""
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    layers: dict[str, tuple[int, int]] = {}
    for key, (dtype, shape) in shapes.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and is_block_linear(module):
            n, k = shape
            layers[module] = (n, k)
            entries[f"{module}.weight"] = (torch.uint8, packed_shape(packing, n, k))
            entries[f"{module}.weight_scale"] = (torch.float32, (n,))
            if lora_rank:
                entries[f"{module}.lora_down"] = (torch.bfloat16, (lora_rank, k))
                entries[f"{module}.lora_up"] = (torch.bfloat16, (n, lora_rank))
                entries[f"{module}.lora_alpha"] = (torch.float32, ())
        else:
            entries[key] = (dtype if dtype in _KEEP_DTYPES else torch.bfloat16, shape)
    return entries, layers


def _convert(
    keys: list[str],
    get: Callable[[str], torch.Tensor],
    report: QuantizeReport,
    lora_rank: int,
    scale_rule: str,
    packing: str,
    device: torch.device | str,
    progress: Progress | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The one conversion loop: yields output (key, tensor) pairs in :func:`plan` order."""
    for i, key in enumerate(keys):
        tensor = get(key)
        module = key.rsplit(".", 1)[0]
        report.params_total += tensor.numel()
        report.bytes_before += tensor.numel() * tensor.element_size()
        if key.endswith(".weight") and is_block_linear(module):
            report.params_quantized += tensor.numel()
            try:
                parts, error = quantize_layer(tensor.to(device), lora_rank, scale_rule, packing)
            except ValueError as err:
                raise ValueError(f"{module}: {err}") from None
            error.name = module
            report.layers.append(error)
            for suffix, part in parts.items():
                yield f"{module}.{suffix}", part.cpu()
        else:
            yield key, tensor if tensor.dtype in _KEEP_DTYPES else tensor.to(torch.bfloat16)
        if progress:
            progress(i + 1, len(keys), key)


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "2bit",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], QuantizeReport]:
    """Quantize an in-memory FLUX state dict: (tensors in the file format, layers, report).

    Raises NotFluxError when the state dict is not a FLUX diffusion model.
    """
    start = time.perf_counter()
    state = {strip_prefix(k): v for k, v in state_dict.items()}
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    report = QuantizeReport(detect_config({k: s for k, (_, s) in shapes.items()}))
    _, layers = plan(shapes, lora_rank, packing)
    out = dict(
        _convert(
            list(state), state.__getitem__, report, lora_rank, scale_rule, packing, device, progress
        )
    )
    report.bytes_after = sum(t.numel() * t.element_size() for t in out.values())
    report.seconds = time.perf_counter() - start
    return out, layers, report


def diffusion_model_keys(keys: list[str]) -> list[str]:
    """Keys of the diffusion model in a file that may also hold VAE / text encoders."""
    prefixed = [k for k in keys if k.startswith(("model.diffusion_model.", "diffusion_model."))]
    return prefixed or keys


def flux_tensors(
    reader: MmapReader,
) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], Callable[[str], torch.Tensor]]:
    """(shapes, get) of the diffusion model in a file, under BFL names: the
    ``model.diffusion_model.`` prefix dropped, VAE / text-encoder keys left out."""
    names = {strip_prefix(k): k for k in diffusion_model_keys(list(reader.infos))}
    shapes = {}
    for key, name in names.items():
        dtype_name, shape = reader.infos[name]
        shapes[key] = (dtype_from_name(dtype_name), shape)
    return shapes, lambda key: reader.get(names[key])


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "base3",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Stream a FLUX safetensors file into a v1 ternary file, one tensor at a time."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("the output must not be the source file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    with MmapReader(src) as reader:
        shapes, get = flux_tensors(reader)
        scaled = [
            k for k in shapes if k.endswith((".scale_weight", ".comfy_quant", ".input_scale"))
        ]
        if scaled:
            raise ValueError(
                f"{src.name} is a scaled-fp8 / mixed-precision checkpoint ({scaled[0]}); quantize "
                "from the bf16 or fp16 file, or load it in ComfyUI and use the Quantize node"
            )
        report = QuantizeReport(detect_config({k: s for k, (_, s) in shapes.items()}))
        entries, layers = plan(shapes, lora_rank, packing)
        meta = build_metadata(
            layers, packing, lora_rank, scale_rule, {"source": src.name, "architecture": "flux"}
        )
        loop = _convert(list(shapes), get, report, lora_rank, scale_rule, packing, device, progress)
        with StreamingWriter(dst, entries, meta, overwrite=overwrite) as writer:
            for key, tensor in loop:
                writer.write(key, tensor)
    report.bytes_after = dst.stat().st_size
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report
