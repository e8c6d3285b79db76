"""Quantize Model to Ternary: a FLUX.1 / FLUX.2 / Chroma MODEL (bf16 / fp16 / fp8) -> a new
ternary MODEL."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..models.files import quantize_state_dict
from ..ternary.quantize import SCALE_RULES
from .model_io import (
    ACT_BITS,
    activations_input,
    check_flux,
    dense_state_dict,
    patcher_from_state_dict,
)
from .save_node import SAVE_PACKING


class QuantizeModelToTernary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxQuantize",
            display_name="Quantize Model to Ternary",
            category="model/ternary",
            description="Makes a new 1.58-bit copy of a FLUX.1, FLUX.2 or Chroma model: every "
            "linear inside the double and single blocks (for FLUX.2 also its three global "
            "modulation linears) becomes ternary. The input MODEL is left as it is. "
            "Without distillation the images degrade; a LoRA rank > 0 recovers part of it.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A FLUX.1, FLUX.2 or Chroma diffusion model (bf16, fp16 or fp8); "
                    "LoRAs already "
                    "applied to it are quantized with it.",
                ),
                io.Int.Input(
                    "lora_rank",
                    default=0,
                    min=0,
                    max=512,
                    tooltip="Rank of a LoRA branch per layer, fitted to the quantization error "
                    "(truncated SVD). 0: none. 64 adds about 0.65 GB for FLUX.1-dev.",
                ),
                io.Combo.Input(
                    "scale_rule",
                    options=list(SCALE_RULES),
                    default="absmean",
                    tooltip="absmean: s = mean|W| per row (the 1.58-bit FLUX rule, needed for "
                    "its checkpoints). lsq: same ternary values, least-squares scale (lower "
                    "error).",
                ),
                activations_input(),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora_rank: int, scale_rule: str, activations: str) -> io.NodeOutput:
        check_flux(model)
        state = dense_state_dict(model)
        bar = comfy.utils.ProgressBar(len(state))
        tensors, _, report = quantize_state_dict(
            state,
            lora_rank=lora_rank,
            scale_rule=scale_rule,
            device=comfy.model_management.get_torch_device(),
            progress=lambda done, total, _key: bar.update_absolute(done, total),
            stored_packing=SAVE_PACKING,  # bytes after: the file Save Ternary Model writes
        )
        del state
        model = patcher_from_state_dict(tensors, ACT_BITS[activations], scale_rule=scale_rule)
        return io.NodeOutput(model, report.format())
