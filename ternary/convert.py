"""The one conversion loop: source tensors in, ternary-format tensors out, in memory or
streamed file to file.

It knows no model: the caller (models/files.py, models/reproduction.py) says which layers
become ternary (a :class:`LayerPlan` per layer) and how (a ``make_layer`` callback that
returns the layer's tensors in the schema of ternary/fileformat.py). The file path reads
the source one tensor at a time and writes with :class:`StreamingWriter`: peak memory is
about one layer, not the model.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .fileformat import LORA_DTYPE, StreamingWriter, layer_entries
from .quantize import LayerError

Progress = Callable[[int, int, str], None]
KEEP_DTYPES = (torch.float16, torch.bfloat16)  # tensors outside the layers keep these
Shapes = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


class LayerPlan(NamedTuple):
    """One source linear that becomes ternary: logical [n, k] and its LoRA."""

    n: int
    k: int
    lora_rank: int = 0
    lora_dtype: torch.dtype = LORA_DTYPE


def dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored dtype of a tensor outside the ternary layers (16-bit as it was, else bf16)."""
    return dtype if dtype in KEEP_DTYPES else torch.bfloat16


def plan_entries(
    shapes: Shapes,
    layers: Mapping[str, LayerPlan],
    packing: str,
    dense: Callable[[str, torch.dtype], torch.dtype] = lambda key, dtype: dense_dtype(dtype),
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every output tensor (key -> (dtype, shape)) in file order: a layer's ``weight`` key is
    replaced by the layer's tensors; ``dense`` gives the dtype of every other tensor."""
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, (dtype, shape) in shapes.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in layers:
            plan = layers[module]
            parts = layer_entries(plan.n, plan.k, packing, plan.lora_rank, plan.lora_dtype)
            entries.update({f"{module}.{suffix}": entry for suffix, entry in parts.items()})
        else:
            entries[key] = (dense(key, dtype), shape)
    return entries


def convert(
    keys: list[str],
    get: Callable[[str], torch.Tensor],
    layers: Mapping[str, LayerPlan],
    make_layer: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
    dense: Callable[[str, torch.Tensor], torch.Tensor] = lambda key, t: t.to(dense_dtype(t.dtype)),
    progress: Progress | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield output (key, tensor) pairs in :func:`plan_entries` order, one source tensor at a
    time: ``make_layer(module, weight)`` for the layers' weights, ``dense(key, tensor)`` for
    the rest."""
    for i, key in enumerate(keys):
        tensor = get(key)
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in layers:
            for suffix, part in make_layer(module, tensor).items():
                yield f"{module}.{suffix}", part.cpu()
        else:
            yield key, dense(key, tensor)
        if progress:
            progress(i + 1, len(keys), key)


def write_converted(
    path,
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str],
    tensors: Iterator[tuple[str, torch.Tensor]],
    overwrite: bool = False,
) -> None:
    """Stream the loop's tensors into a file that appears only once complete."""
    with StreamingWriter(path, entries, metadata, overwrite=overwrite) as writer:
        for key, tensor in tensors:
            writer.write(key, tensor)


@dataclass
class QuantizeReport:
    """What a quantization did: counts, bytes, per-layer errors, time, peak memory."""

    model: str  # the family and its shape, in words
    params_total: int = 0
    params_quantized: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    layers: list[LayerError] = field(default_factory=list)
    calibration_seconds: float | None = None  # of a calibrated quantization
    calibration_peak_bytes: int | None = None  # device memory allocated, CUDA only
    calibration_reserved_bytes: int | None = None  # by the caching allocator

    def count_source(self, shapes: Shapes, layers: Mapping[str, LayerPlan]) -> None:
        """Parameters and bytes of the source, and how many of them become ternary."""
        for key, (dtype, shape) in shapes.items():
            numel = torch.Size(shape).numel()
            self.params_total += numel
            self.bytes_before += numel * dtype.itemsize
            if key.endswith(".weight") and key.rsplit(".", 1)[0] in layers:
                self.params_quantized += numel

    def _calibration_lines(self) -> list[str]:
        """Output error on the calibration inputs, calibrated against the plain rule."""
        pairs = [(e.output_plain, e.output) for e in self.layers if e.output is not None]
        if not pairs:
            return []
        plain = statistics.median(p for p, _ in pairs)
        calibrated = statistics.median(c for _, c in pairs)
        better = sum(c < p for p, c in pairs)
        lines = [
            "output error on the calibration inputs ||X(W-What)^T||/||XW^T||",
            f"  plain (round to nearest)  median {plain:.4f}  max {max(p for p, _ in pairs):.4f}",
            f"  calibrated                median {calibrated:.4f}  "
            f"max {max(c for _, c in pairs):.4f}  ({better} of {len(pairs)} layers lower, "
            f"median {100 * (1 - calibrated / max(plain, 1e-30)):.1f} % lower)",
        ]
        if self.calibration_seconds is not None:
            lines.append(f"calibration time        {self.calibration_seconds:.1f} s")
        if self.calibration_peak_bytes:
            lines.append(
                f"peak GPU memory         {self.calibration_peak_bytes / 2**30:.2f} GiB allocated, "
                f"{(self.calibration_reserved_bytes or 0) / 2**30:.2f} GiB reserved"
            )
        return lines

    def format(self) -> str:
        """A plain-text summary for the terminal and for ComfyUI's node output."""
        errors = [e.ternary for e in self.layers]
        lines = [
            f"model                   {self.model}",
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
        lines.extend(self._calibration_lines())
        lines.append(f"time                    {self.seconds:.1f} s")
        if self.peak_rss_bytes:
            lines.append(f"peak RAM (process)      {self.peak_rss_bytes / 1e9:.2f} GB")
        return "\n".join(lines)
