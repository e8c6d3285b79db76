"""Load Ternary Diffusion Model: a v1 file from models/ternary -> MODEL."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from . import folders
from .model_io import ACT_BITS, activations_input, load_ternary_patcher


class LoadTernaryDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxLoader",
            display_name="Load Ternary Diffusion Model",
            category="model/loaders/ternary",
            description="Loads a 1.58-bit (ternary) FLUX.1, FLUX.2 or Chroma diffusion model from "
            "models/ternary; ComfyUI detects which model it is, as for Load Diffusion Model. "
            "Use it like Load Diffusion Model; LoRAs apply with the usual LoRA loaders.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=folders.files(".safetensors"),
                    tooltip="A ternary-flux file in models/ternary (made by Save Ternary Model "
                    "or the command line tool).",
                ),
                activations_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name: str, activations: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(folders.FOLDER, model_name)
        return io.NodeOutput(load_ternary_patcher(path, ACT_BITS[activations]))
