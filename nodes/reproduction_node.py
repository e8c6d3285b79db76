"""Load Reproduction Checkpoint: bf16 FLUX MODEL + ternary_distilled_*.pt -> ternary MODEL."""

from __future__ import annotations

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..models.reproduction import import_reproduction_from_weights
from . import folders
from .model_io import (
    ACT_BITS,
    activations_input,
    bfl_state_dict,
    check_bf16_flux,
    patcher_from_state_dict,
)


class LoadReproductionCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxLoadReproduction",
            display_name="Load Reproduction Checkpoint",
            category="model/loaders/ternary",
            description="Builds the ternary model of a 1.58-bit FLUX reproduction checkpoint "
            "(ternary_distilled_r*.pt: scales + LoRA only) on top of the bf16 FLUX.1-dev it "
            "was trained from. Save it with Save Ternary Model to skip this step next time.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The bf16 FLUX.1-dev the checkpoint was trained on (Load Diffusion "
                    "Model, weight_dtype default, no LoRA): its ternary values are recomputed "
                    "from these exact weights. The MODEL itself is left as it is.",
                ),
                io.Combo.Input(
                    "checkpoint",
                    options=folders.files(".pt"),
                    tooltip="A ternary_distilled_*.pt file in models/ternary. Only its tensors "
                    "are read (weights_only); no code from it runs.",
                ),
                activations_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, checkpoint: str, activations: str) -> io.NodeOutput:
        check_bf16_flux(model)
        path = folder_paths.get_full_path_or_raise(folders.FOLDER, checkpoint)
        bar = comfy.utils.ProgressBar(1)
        result = import_reproduction_from_weights(
            bfl_state_dict(model),
            path,
            source="the connected MODEL",
            packing="2bit",
            progress=lambda done, total, _key: bar.update_absolute(done, total),
        )
        return io.NodeOutput(
            patcher_from_state_dict(
                result.tensors, ACT_BITS[activations], scale_rule=result.metadata["scale_rule"]
            )
        )
