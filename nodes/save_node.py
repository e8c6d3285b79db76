"""Save Ternary Model: a ternary MODEL -> a new v1 file in models/ternary (never overwrites)."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from ..ternary.fileformat import save_ternary_file
from ..ternary.packing import PACKINGS, pack, unpack_2bit
from . import folders
from .model_io import bfl_state_dict, refuse_patches
from .ternary_ops import ternary_modules

_DENSE_DTYPES = (torch.float16, torch.bfloat16)


def ternary_file_tensors(patcher, packing: str) -> tuple[dict, dict, int]:
    """(tensors, layers, lora rank) of a ternary MODEL in the v1 layout."""
    layers = ternary_modules(patcher)
    if not layers:
        raise ValueError("this MODEL has no ternary layers; quantize or load a ternary model")
    refuse_patches(
        patcher, "a ternary file cannot hold them; connect the model from before the LoRA loaders"
    )
    tensors = {}
    for key, tensor in bfl_state_dict(patcher).items():
        module, suffix = key.rsplit(".", 1)
        tensor = tensor.detach().cpu()
        if module in layers:
            if suffix == "weight" and packing != "2bit":
                values = unpack_2bit(tensor, layers[module].in_features)
                tensor = pack(values, packing)
        elif tensor.dtype not in _DENSE_DTYPES:
            tensor = tensor.to(torch.bfloat16)
        tensors[key] = tensor
    shapes = {name: (m.out_features, m.in_features) for name, m in layers.items()}
    return tensors, shapes, max(m.lora_rank for m in layers.values())


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
                    default="base3",
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
        save_ternary_file(path, tensors, layers, packing=packing, lora_rank=rank)
        name = os.path.basename(path)
        text = f"saved {name} ({os.path.getsize(path) / 1e6:.1f} MB, {len(layers)} ternary layers)"
        return io.NodeOutput(name, ui=ui.PreviewText(text))
