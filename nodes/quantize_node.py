"""Quantize Model to Ternary: a FLUX.1 / FLUX.2 / Chroma MODEL (bf16 / fp16 / fp8) -> a new
ternary MODEL."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..distill.calibration import DEFAULT_SAMPLES, teacher_calibration
from ..models import flux1
from ..models.family import ModelFamilyError
from ..models.files import calibration_refusal, quantize_state_dict
from ..models.registry import detect_family
from ..ternary.calibrate import CALIBRATED
from ..ternary.quantize import SCALE_RULES
from .distill import dataset_dir
from .model_io import (
    ACT_BITS,
    activations_input,
    check_flux,
    dense_state_dict,
    logical_shapes,
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
            "Without distillation the images degrade; a LoRA rank > 0 recovers part of it, "
            "and calibrating on a teacher data set (FLUX.1) much more.",
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
                io.String.Input(
                    "teacher_data",
                    default="",
                    optional=True,
                    tooltip="FLUX.1 only, optional: a teacher data set (name under "
                    "output/ternary_distill/data, or a folder) from Build Teacher Dataset. Each "
                    "layer's ternary values, scales and LoRA are then chosen for its output on "
                    "the data set's latents and text conditioning (minutes on a GPU, no "
                    "training); the scale rule is not used. Empty: plain quantization.",
                ),
                io.Int.Input(
                    "calibration_samples",
                    default=DEFAULT_SAMPLES,
                    min=1,
                    max=100_000,
                    optional=True,
                    tooltip="Examples of the teacher data set to calibrate on (with teacher_data).",
                ),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(
        cls,
        model,
        lora_rank: int,
        scale_rule: str,
        activations: str,
        teacher_data: str = "",
        calibration_samples: int = DEFAULT_SAMPLES,
    ) -> io.NodeOutput:
        check_flux(model)
        bar = None

        def progress(done: int, total: int, _name: str) -> None:
            nonlocal bar
            bar = bar or comfy.utils.ProgressBar(total)
            bar.update_absolute(done, total)

        calibration = None
        if teacher_data.strip():
            family, _ = detect_family(logical_shapes(model))
            if family is not flux1.FAMILY:
                raise ModelFamilyError(calibration_refusal(family.title))
            calibration = teacher_calibration(
                dataset_dir(teacher_data.strip()), calibration_samples, progress=progress
            )
            # Calibration keeps every example's hidden states on the device (6.4 GiB for 256
            # FLUX.1-dev examples at 1024x1024): ComfyUI's models leave the GPU first, so the
            # source weights below are read from where that puts them, not held twice.
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
        state = dense_state_dict(model)
        tensors, _, report = quantize_state_dict(
            state,
            lora_rank=lora_rank,
            scale_rule=scale_rule,
            device=comfy.model_management.get_torch_device(),
            progress=None if calibration else progress,
            stored_packing=SAVE_PACKING,  # bytes after: the file Save Ternary Model writes
            calibration=calibration,
        )
        del state
        model = patcher_from_state_dict(
            tensors,
            ACT_BITS[activations],
            scale_rule=CALIBRATED if calibration else scale_rule,
            calibration=calibration.metadata() if calibration else None,
        )
        return io.NodeOutput(model, report.format())
