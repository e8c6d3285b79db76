"""Measure and compare model variants: step latency, peak VRAM, weight bytes, error vs bf16.

Used by the ComfyUI *Ternary Report* node and the benchmarks. It takes plain callables and
modules, so it never imports ComfyUI; Pillow (which ComfyUI ships) is needed only by
:func:`render_chart`. Byte counts use decimal units (1 GB = 1e9 bytes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StepMeasurement:
    """Timing of repeated calls of one step function on one device."""

    seconds_per_step: float  # median over the timed calls
    step_seconds: tuple[float, ...]  # every timed call, in order
    peak_vram_bytes: int | None  # CUDA allocator peak over warm-up and timed calls; else None
    output: Any  # what the last call returned


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_step(
    step_fn: Callable[[], Any],
    device: torch.device | str,
    warmup: int = 1,
    repeats: int = 5,
) -> StepMeasurement:
    """Call ``step_fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Each timed call is bracketed by device synchronisation, so asynchronous GPU work is
    counted in full. The peak-memory counter is reset first: the peak covers everything
    the calls allocate on top of what was already resident (the weights).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    _synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    output = None
    for _ in range(warmup):
        output = step_fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        output = step_fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return StepMeasurement(statistics.median(times), tuple(times), peak, output)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (packed uint8, scales, LoRA, 16-bit rest).

    Tensors shared between modules count once; tensor subclasses that report their real
    storage through ``nbytes`` (comfy-kitchen's QuantizedTensor) are counted by it.
    """
    return sum(t.nbytes for t in module.parameters()) + sum(t.nbytes for t in module.buffers())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), computed in float64 on the CPU."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(
            f"cannot compare outputs of shapes {tuple(out.shape)} and {tuple(ref.shape)}"
        )
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    norm = torch.linalg.vector_norm(r)
    if norm == 0:
        raise ValueError("the reference output is all zeros: relative error is undefined")
    return float(torch.linalg.vector_norm(o - r) / norm)


@dataclass(frozen=True)
class ReportRow:
    """One model variant's numbers; None where a number was not measured."""

    name: str
    weight_bytes: int
    seconds_per_step: float
    peak_vram_bytes: int | None = None
    relative_error: float | None = None

    @classmethod
    def from_measurement(
        cls,
        name: str,
        module: nn.Module,
        measurement: StepMeasurement,
        reference_output: torch.Tensor | None = None,
    ) -> ReportRow:
        """A row for ``module``; the error compares the measurement's output to the reference."""
        error = (
            None
            if reference_output is None
            else relative_error(measurement.output, reference_output)
        )
        return cls(
            name,
            weight_bytes(module),
            measurement.seconds_per_step,
            measurement.peak_vram_bytes,
            error,
        )


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def format_error(e: float | None) -> str:
    if e is None:
        return "-"
    return f"{e:.4f}" if e >= 1e-3 else f"{e:.2e}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def format_report(
    rows: Sequence[ReportRow], reference: str | None = None, markdown: bool = False
) -> str:
    """A table with one line per row; with ``reference`` (a row's name), ratio columns
    ``row / reference`` for weight bytes, peak VRAM and seconds per step.

    ``markdown`` gives a GitHub table instead of aligned plain text.
    """
    if not rows:
        raise ValueError("no rows to report")
    header = ["model", "weights", "peak VRAM", "time/step", "rel. error"]
    base = None
    if reference is not None:
        base = next((r for r in rows if r.name == reference), None)
        if base is None:
            names = ", ".join(r.name for r in rows)
            raise ValueError(f"reference row {reference!r} not among the rows ({names})")
        header += [f"weights / {reference}", f"VRAM / {reference}", f"time / {reference}"]
    table = [header]
    for r in rows:
        line = [
            r.name,
            format_bytes(r.weight_bytes),
            format_bytes(r.peak_vram_bytes),
            format_seconds(r.seconds_per_step),
            format_error(r.relative_error),
        ]
        if base is not None:
            line += [
                _ratio(r.weight_bytes, base.weight_bytes),
                _ratio(r.peak_vram_bytes, base.peak_vram_bytes),
                _ratio(r.seconds_per_step, base.seconds_per_step),
            ]
        table.append(line)
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in table]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    )


_PANELS = (
    ("weight bytes", "weight_bytes", format_bytes),
    ("peak VRAM", "peak_vram_bytes", format_bytes),
    ("time per step", "seconds_per_step", format_seconds),
    ("relative error vs reference", "relative_error", format_error),
)
_COLORS = ((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188))


def render_chart(rows: Sequence[ReportRow], width: int = 1024, height: int = 768) -> np.ndarray:
    """Four horizontal bar charts (weight bytes, peak VRAM, time per step, relative error),
    one bar per row, as an RGB image: numpy uint8 [height, width, 3]."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ImportError("render_chart needs Pillow: pip install pillow") from None
    if not rows:
        raise ValueError("no rows to chart")
    if width < 320 or height < 240:
        raise ValueError(f"chart of {width}x{height} is too small; use at least 320x240")
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font_size = max(10, min(width // 50, height // (8 * (len(rows) + 2))))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        font = ImageFont.load_default()
    panel_w, panel_h = width // 2, height // 2
    label_w = max(draw.textlength(r.name, font=font) for r in rows) + font_size
    text_h = draw.textbbox((0, 0), "Ag", font=font)[3]
    for index, (title, field, fmt) in enumerate(_PANELS):
        x0, y0 = (index % 2) * panel_w, (index // 2) * panel_h
        draw.rectangle([x0 + 2, y0 + 2, x0 + panel_w - 3, y0 + panel_h - 3], outline=(200,) * 3)
        draw.text((x0 + font_size, y0 + font_size // 2), title, fill="black", font=font)
        values = [getattr(r, field) for r in rows]
        top = max((v for v in values if v is not None), default=0) or 1
        bar_left = x0 + font_size + label_w
        bar_room = panel_w - (bar_left - x0) - 6 * font_size
        slot = (panel_h - 3 * font_size) / len(rows)
        for i, (row, value) in enumerate(zip(rows, values, strict=True)):
            y = y0 + 2 * font_size + i * slot
            bar_h = max(2, min(slot * 0.7, 3 * font_size))
            text_y = y + (bar_h - text_h) / 2
            draw.text((x0 + font_size, text_y), row.name, fill="black", font=font)
            end = bar_left
            if value is not None:
                end = bar_left + max(1, bar_room * value / top)
                draw.rectangle([bar_left, y, end, y + bar_h], fill=_COLORS[i % len(_COLORS)])
            draw.text((end + font_size // 2, text_y), fmt(value), fill="black", font=font)
    return np.asarray(image, dtype=np.uint8).copy()
