"""Save Ternary Model: a ternary MODEL -> a new v1 file in models/ternary (never overwrites)."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..models.registry import detect_family
from ..ternary.fileformat import save_ternary_file
from ..ternary.module import export_tensors
from ..ternary.packing import PACKINGS
from ..ternary.quantize import HEADER_SCALE_RULES
from . import folders
from .model_io import bfl_key, logical_shapes, refuse_patches
from .ternary_ops import ternary_modules

SAVE_PACKING = "base3"  # the default: the smallest file


def ternary_file_tensors(patcher, packing: str) -> tuple[dict, dict, int]:
    """(tensors, layers, lora rank) of a ternary MODEL in the v1 layout, BFL names."""
    if not ternary_modules(patcher):
        raise ValueError("this MODEL has no ternary layers; quantize or load a ternary model")
    refuse_patches(
        patcher, "a ternary file cannot hold them; connect the model from before the LoRA loaders"
    )
    return export_tensors(patcher.model.diffusion_model, packing, key=bfl_key)


def ternary_file_header(patcher) -> dict[str, str]:
    """The header fields a file of this MODEL states about it: the ``scale_rule`` its ternary
    layers carry (from the Quantize node or the file they were loaded from), its
    ``architecture`` (the model family its shapes are) and, for a calibrated model, the
    ``calibration`` entry (as ``metadata``)."""
    layers = ternary_modules(patcher).values()
    rules = {layer.scale_rule for layer in layers}
    if len(rules) != 1 or not rules <= set(HEADER_SCALE_RULES):
        found = ", ".join(sorted(str(r) for r in rules))
        raise ValueError(
            f"this MODEL's ternary layers do not say one scale rule ({found}); "
            "save a model from Quantize Model to Ternary or a ternary file"
        )
    family, _ = detect_family(logical_shapes(patcher))
    header = {"scale_rule": rules.pop(), "architecture": family.name}
    calibrations = {layer.calibration for layer in layers}
    if len(calibrations) == 1 and None not in calibrations:
        header["metadata"] = {"calibration": calibrations.pop()}
    return header


class SaveTernaryModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxSave",
            display_name="Save Ternary Model",
            category="model/ternary",
            description="Writes a ternary MODEL to models/ternary as a ternary-flux file. An "
            "existing file is never replaced: a number is added to the name instead.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A ternary MODEL (from Quantize or a loader)."),
                io.String.Input(
                    "filename",
                    default="flux_ternary",
                    tooltip="File name inside models/ternary (.safetensors is added).",
                ),
                io.Combo.Input(
                    "packing",
                    options=list(PACKINGS),
                    default=SAVE_PACKING,
                    tooltip="base3: 1.6 bits per weight, the smallest file. 2bit: the layout "
                    "the kernels run, about 20 % larger, no conversion when loading.",
                ),
            ],
            outputs=[io.String.Output(display_name="file")],
        )

    @classmethod
    def execute(cls, model, filename: str, packing: str) -> io.NodeOutput:
        path = folders.output_path(filename)
        tensors, layers, rank = ternary_file_tensors(model, packing)
        header = ternary_file_header(model)
        save_ternary_file(path, tensors, layers, packing=packing, lora_rank=rank, **header)
        name = folders.listed_name(path)
        text = f"saved {name} ({os.path.getsize(path) / 1e6:.1f} MB, {len(layers)} ternary layers)"
        return io.NodeOutput(name, ui=ui.PreviewText(text))
