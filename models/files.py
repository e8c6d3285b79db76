"""Model files, family-aware: dense sources read under BFL / ComfyUI names, quantized with the
one conversion loop, and ternary files read back with their family checked.

The ternary format (ternary/fileformat.py) knows no model; here a file's ``architecture``
is looked up in models/registry.py, or a source's family is detected from its shapes.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..ternary.atomic import check_target
from ..ternary.calibrate import CALIBRATED
from ..ternary.convert import (
    LayerPlan,
    Progress,
    QuantizeReport,
    convert,
    plan_entries,
    write_converted,
)
from ..ternary.fileformat import (
    FORMAT_NAME,
    MmapReader,
    TernaryFile,
    TernaryFormatError,
    build_metadata,
    dtype_from_name,
    file_size,
    read_ternary_file,
)
from ..ternary.quantize import quantize_layer
from ..ternary.resume import START_OVER, ResumeStore, file_identity, store_path
from . import flux1
from .family import PREFIXES, Family, ModelFamilyError, strip_prefix
from .flux1_calibrate import Calibration, FluxCalibrator
from .registry import detect_family, family_named

Shapes = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def diffusion_model_keys(keys: list[str]) -> list[str]:
    """Keys of the diffusion model in a file that may also hold VAE / text encoders."""
    prefixed = [k for k in keys if k.startswith(PREFIXES)]
    return prefixed or keys


def dense_tensors(reader: MmapReader) -> tuple[Shapes, Callable[[str], torch.Tensor]]:
    """(shapes, get) of the diffusion model in a dense file, under BFL names: the
    ``model.diffusion_model.`` prefix dropped, VAE / text-encoder keys left out.

    Refuses ternary files and scaled-fp8 / mixed-precision checkpoints with a message."""
    if reader.metadata.get("format") == FORMAT_NAME:
        raise TernaryFormatError(
            f"{reader.path.name} is already ternary (a {FORMAT_NAME} file): nothing to quantize"
        )
    names = {strip_prefix(k): k for k in diffusion_model_keys(list(reader.infos))}
    shapes = {}
    for key, name in names.items():
        dtype_name, shape = reader.infos[name]
        shapes[key] = (dtype_from_name(dtype_name), shape)
    scaled = [k for k in shapes if k.endswith((".scale_weight", ".comfy_quant", ".input_scale"))]
    if scaled:
        raise ValueError(
            f"{reader.path.name} is a scaled-fp8 / mixed-precision checkpoint ({scaled[0]}); "
            "quantize from the bf16 or fp16 file, or load it in ComfyUI and use the Quantize node"
        )
    return shapes, lambda key: reader.get(names[key])


def logical(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """{key: shape} of {key: (dtype, shape)}: what family detection reads."""
    return {k: s for k, (_, s) in shapes.items()}


@dataclass
class TernaryModel(TernaryFile):
    """A loaded ternary file with its family and configuration."""

    family: Family | None = None
    config: Any = None


def file_family(name: str, layout) -> tuple[Family, Any]:
    """The family of a valid v1 file: the one its header names (checked against its shapes),
    or for older files without a name the one its shapes match."""
    try:
        if layout.architecture is None:
            family, config = detect_family(layout.logical_shapes)
        else:
            family = family_named(layout.architecture)
            config = family.detect(layout.logical_shapes)
    except ModelFamilyError as err:
        raise TernaryFormatError(f"{name}: {err}") from None
    unexpected = sorted(layer for layer in layout.layers if not family.is_ternary(layer))
    if unexpected:
        raise TernaryFormatError(
            f"{name}: {unexpected[0]} is stored ternary, but {family.title} keeps it 16-bit"
        )
    return family, config


def load_ternary_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    on_tensor: Callable[[int, int], None] | None = None,
    convert_device: torch.device | str | None = None,
) -> TernaryModel:
    """Read a ternary file, check its contents and its family (what every loader uses: the
    ComfyUI node, the student loader, ``info``); base3 weights are converted to the 2bit
    layout on ``convert_device`` (default ``device``)."""
    path = Path(path)
    found = []
    loaded = read_ternary_file(
        path,
        device,
        on_tensor,
        check_layout=lambda layout: found.append(file_family(path.name, layout)),
        convert_device=convert_device,
    )
    family, config = found[0]
    return TernaryModel(loaded.state_dict, loaded.layout, loaded.metadata, family, config)


def ternary_layers(family: Family, shapes: Shapes, lora_rank: int) -> dict[str, LayerPlan]:
    """The layers of a dense source that become ternary."""
    layers = {}
    for key, (_, shape) in shapes.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and family.is_ternary(module):
            layers[module] = LayerPlan(shape[0], shape[1], lora_rank)
    return layers


class _Quantizer:
    """make_layer for the conversion loop, set up from a dense source as both quantizers
    (in memory, streamed) need it: the source's family, the layers that become ternary, the
    report counting the source, the header of the result stored in ``stored_packing`` and
    the calibrator of ``calibration`` (made last: it embeds the examples; with a ``store``
    it keeps its finished blocks there and resumes from them). Each layer goes
    through the one per-layer quantizer, errors reported; with a calibrator, the layers it
    quantized with their calibration Hessians."""

    def __init__(
        self,
        shapes: Shapes,
        get: Callable[[str], torch.Tensor],
        lora_rank: int,
        scale_rule: str,
        packing: str,
        device: torch.device | str,
        calibration: Calibration | None,
        stored_packing: str,
        source: str | None = None,
        store: ResumeStore | None = None,
    ) -> None:
        family, config = detect_family(logical(shapes))
        self.layers = ternary_layers(family, shapes, lora_rank)
        self.layer_shapes = {module: (plan.n, plan.k) for module, plan in self.layers.items()}
        self.report = QuantizeReport(family.describe(config))
        self.report.count_source(shapes, self.layers)
        rule, extra = scale_rule, {}
        if calibration is not None:
            rule, extra = CALIBRATED, {"calibration": calibration.metadata()}
        if source is not None:
            extra["source"] = source
        self.metadata = build_metadata(
            self.layer_shapes, stored_packing, lora_rank, rule, family.name, extra
        )
        self.lora_rank, self.scale_rule = lora_rank, scale_rule
        self.packing, self.device = packing, device
        self.calibrator = calibrator_for(
            family, shapes, get, calibration, lora_rank, scale_rule, packing, device, store
        )

    def __call__(self, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.calibrator is not None:
            parts, error = self.calibrator.layer(module)
            self.report.layers.append(error)
            return parts
        try:
            parts, error = quantize_layer(
                weight.to(self.device), self.lora_rank, self.scale_rule, self.packing
            )
        except ValueError as err:
            raise ValueError(f"{module}: {err}") from None
        error.name = module
        self.report.layers.append(error)
        return parts

    def finish(self) -> None:
        """Calibration time and device memory into the report."""
        if self.calibrator is not None:
            self.report.calibration_seconds = self.calibrator.seconds
            peak = self.calibrator.peak_memory()
            if peak is not None:
                self.report.calibration_peak_bytes, self.report.calibration_reserved_bytes = peak


def calibrator_for(
    family: Family,
    shapes: Shapes,
    get: Callable[[str], torch.Tensor],
    calibration: Calibration | None,
    lora_rank: int,
    scale_rule: str,
    packing: str,
    device: torch.device | str,
    store: ResumeStore | None = None,
) -> FluxCalibrator | None:
    """The calibrator of a source (FLUX.1 only; others refused by name), or None. Checks the
    examples against the model (and a store's settings) before anything is written."""
    if calibration is None:
        return None
    if family is not flux1.FAMILY:
        raise ModelFamilyError(calibration_refusal(family.title))
    return FluxCalibrator(
        logical(shapes), get, calibration, lora_rank=lora_rank, scale_rule=scale_rule,
        packing=packing, device=device, store=store,
    )  # fmt: skip


def calibration_store(dst: str | os.PathLike) -> Path:
    """Where a calibrated quantization into ``dst`` keeps its finished blocks until it is
    done: ``DST.calibration-partial/`` beside it."""
    return store_path(dst, "calibration")


def family_of_file(src: str | os.PathLike) -> Family:
    """The family of a dense model file, from its header (refusals as :func:`quantize_file`)."""
    with MmapReader(src) as reader:
        shapes, _ = dense_tensors(reader)
    return detect_family(logical(shapes))[0]


def calibration_refusal(title: str) -> str:
    return f"calibration supports FLUX.1 only; {title} is not supported (quantize it without)"


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "2bit",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    stored_packing: str | None = None,
    calibration: Calibration | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], QuantizeReport]:
    """Quantize an in-memory state dict of a known family: (v1 tensors, layers, report).

    The report counts stored bytes, as :func:`quantize_file` does: before, the source
    tensors in their dtypes; after, the size of the v1 file of the result in
    ``stored_packing`` (default: ``packing``), not the tensors in memory. ``calibration``
    (FLUX.1 only): quantize every block linear for its output on these examples
    (models/flux1_calibrate.py). Raises ModelFamilyError when the weights are not a model of
    a known family.
    """
    start = time.perf_counter()
    state = {strip_prefix(k): v for k, v in state_dict.items()}
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    stored = stored_packing or packing
    quantizer = _Quantizer(
        shapes, state.__getitem__, lora_rank, scale_rule, packing, device, calibration, stored
    )
    layers, report = quantizer.layers, quantizer.report
    out = dict(convert(list(state), state.__getitem__, layers, quantizer, progress=progress))
    quantizer.finish()
    report.bytes_after = file_size(plan_entries(shapes, layers, stored), quantizer.metadata)
    report.seconds = time.perf_counter() - start
    return out, quantizer.layer_shapes, report


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "base3",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    calibration: Calibration | None = None,
    restart: bool = False,
    log: Callable[[str], None] | None = None,
    start_over: str = START_OVER,
) -> QuantizeReport:
    """Stream a dense safetensors file of a known family into a v1 ternary file.

    A calibrated quantization keeps every finished block in :func:`calibration_store` (dst),
    so that the same call after an interruption resumes it (``log`` hears "resuming: ...");
    ``restart`` discards a store of an earlier run instead (``start_over``: how a refusal to
    resume says so). The store is removed once the file is written."""
    src, dst = Path(src), Path(dst)
    check_target(dst, overwrite=True)  # a name too long, a folder, a folder not writable
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError("the output must not be the source file")
    store = None
    if calibration is not None:
        store = ResumeStore(calibration_store(dst), file_identity(src), restart, log, start_over)
    try:
        with MmapReader(src) as reader:
            shapes, get = dense_tensors(reader)
            return quantize_tensors(
                shapes, get, dst, lora_rank, scale_rule, packing, device, overwrite, progress,
                source=src.name, calibration=calibration, store=store,
            )  # fmt: skip
    finally:
        if store is not None:
            store.close()


def quantize_tensors(
    shapes: Shapes,
    get: Callable[[str], torch.Tensor],
    dst: str | os.PathLike,
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "base3",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    source: str | None = None,
    calibration: Calibration | None = None,
    store: ResumeStore | None = None,
) -> QuantizeReport:
    """Quantize a dense model given tensor by tensor into a v1 file, streaming: ``shapes``
    ({BFL key: (dtype, shape)}, in file order) and ``get(key)``, asked for each key once in
    that order (it may read a file, or make the tensor: a model larger than memory is made
    and quantized layer by layer). Peak memory is about one layer.

    With ``calibration`` (FLUX.1 only) ``get`` must answer any key at any time (a file or a
    state dict): the calibrator reads the blocks in the model's order, whatever the file's;
    the examples are checked against the model before the output is opened. ``store``
    (ternary/resume.py): where the calibrator keeps finished blocks and finds those of an
    interrupted run (removed once the file is written; it stays after a failure)."""
    start = time.perf_counter()
    dst = Path(dst)
    if lora_rank < 0:
        raise ValueError(f"LoRA rank must be 0 (none) or more, got {lora_rank}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    quantizer = _Quantizer(
        shapes, get, lora_rank, scale_rule, packing, device, calibration, packing, source, store
    )
    layers, report = quantizer.layers, quantizer.report
    loop = convert(list(shapes), get, layers, quantizer, progress=progress)
    entries = plan_entries(shapes, layers, packing)
    write_converted(dst, entries, quantizer.metadata, loop, overwrite=overwrite)
    if quantizer.calibrator is not None and store is not None:
        store.remove()
    quantizer.finish()
    report.bytes_after = dst.stat().st_size
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report
