"""Ternary Report: time a ternary MODEL (and a bf16 reference) at one resolution -> table + chart.

Each model runs the same model call ComfyUI's samplers make (``BaseModel.apply_model``,
after ``load_models_gpu``): the first sampling step of a generation, pure noise at sigma 1,
with the given or seeded random conditioning. Every model is measured alone (the other
models are unloaded first), so its peak VRAM is its own weights plus the activations.
The error is that of the ternary model's prediction (FLUX's velocity) against the
reference's on identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from ..models.flux1 import FluxConfig, detect_config
from ..ternary.measure import ReportRow, format_report, measure_step, render_chart
from .model_io import logical_shapes
from .ternary_ops import ternary_modules

SIGMA = 1.0
RANDOM_TOKENS = 256  # ComfyUI's T5 prompt length for FLUX
DEFAULT_GUIDANCE = 3.5
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class StepInputs:
    """The inputs of one FLUX model call (CPU tensors; each run moves them to its device)."""

    noise: torch.Tensor  # [1, C, H/8, W/8]
    context: torch.Tensor  # [1, tokens, context_in_dim]
    pooled: torch.Tensor  # [1, vec_in_dim]
    guidance: float


def step_inputs(
    patcher, config: FluxConfig, width: int, height: int, seed: int, conditioning=None
) -> StepInputs:
    """Noise of the latent size, and the conditioning (given, or seeded random)."""
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16, got {width}x{height}")
    gen = torch.Generator().manual_seed(seed)
    channels = patcher.model.latent_format.latent_channels
    noise = torch.randn(1, channels, height // 8, width // 8, generator=gen)
    if conditioning is None:
        context = torch.randn(1, RANDOM_TOKENS, config.context_in_dim, generator=gen)
        pooled = torch.randn(1, config.vec_in_dim, generator=gen)
        return StepInputs(noise, context, pooled, DEFAULT_GUIDANCE)
    context, extras = conditioning[0]
    if extras.get("pooled_output") is None:
        raise ValueError(
            "the conditioning has no pooled output: connect a FLUX text encoding "
            "(DualCLIPLoader type flux -> CLIPTextEncode)"
        )
    if context.shape[-1] != config.context_in_dim:
        raise ValueError(
            f"the conditioning has {context.shape[-1]} channels; this model takes "
            f"{config.context_in_dim} (a FLUX text encoding is needed)"
        )
    guidance = float(extras.get("guidance", DEFAULT_GUIDANCE))
    return StepInputs(noise, context[:1], extras["pooled_output"][:1], guidance)


def model_label(patcher) -> str:
    """'ternary A16' / 'ternary A8' for a ternary MODEL, else its weight dtype ('bf16')."""
    layers = ternary_modules(patcher)
    if layers:
        return f"ternary A{next(iter(layers.values())).act_bits}"
    dtype = patcher.model.get_dtype()
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def measure(patcher, inputs: StepInputs, steps: int, name: str, reference=None):
    """(ReportRow, prediction) of ``steps`` timed model calls after one warm-up call.

    ``reference``: the reference's prediction, for the row's relative error.
    """
    mm.unload_all_models()
    mm.soft_empty_cache()
    mm.load_models_gpu([patcher])
    device = patcher.load_device
    noise = inputs.noise.to(device)
    sigma = torch.full((1,), SIGMA, device=device)
    guidance = torch.full((1,), inputs.guidance, device=device)

    @torch.inference_mode()
    def step() -> torch.Tensor:
        denoised = patcher.model.apply_model(
            noise, sigma, c_crossattn=inputs.context, y=inputs.pooled, guidance=guidance
        )
        return (noise - denoised) / SIGMA  # FLUX's velocity: denoised = x - sigma * v

    measured = measure_step(step, device, warmup=1, repeats=steps)
    row = ReportRow.from_measurement(name, patcher.model.diffusion_model, measured, reference)
    return row, measured.output


def chart_image(rows: list[ReportRow]) -> torch.Tensor:
    """render_chart as a ComfyUI IMAGE: float [1, H, W, 3] in 0..1."""
    return torch.from_numpy(render_chart(rows)).float().div(255.0).unsqueeze(0)


class TernaryReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxReport",
            display_name="Ternary Report",
            category="model/ternary",
            description="Times a FLUX MODEL (usually the ternary one) at one resolution: "
            "weight bytes, peak VRAM (GPU only), seconds per model call, and, with a bf16 "
            "reference connected, the relative error of its prediction. Unloads the other "
            "models first so each is measured alone.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to measure (a ternary FLUX model)."),
                io.Int.Input(
                    "width",
                    default=1024,
                    min=64,
                    max=4096,
                    step=16,
                    tooltip="Image width in pixels the model call is sized for.",
                ),
                io.Int.Input(
                    "height",
                    default=1024,
                    min=64,
                    max=4096,
                    step=16,
                    tooltip="Image height in pixels the model call is sized for.",
                ),
                io.Int.Input(
                    "steps",
                    default=4,
                    min=1,
                    max=100,
                    tooltip="Timed model calls per model, after one untimed warm-up call; "
                    "the report shows their median.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Seed of the noise latent and of the random conditioning.",
                ),
                io.Model.Input(
                    "reference",
                    optional=True,
                    tooltip="The bf16 FLUX MODEL the ternary one was made from: adds its row "
                    "and the relative error of the ternary model against it.",
                ),
                io.Conditioning.Input(
                    "conditioning",
                    optional=True,
                    tooltip="FLUX conditioning (CLIPTextEncode, FluxGuidance) to run with. "
                    "Without it: seeded random text embeddings of FLUX's shapes, guidance 3.5.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="chart"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # never equal: timings are measured anew on every run

    @classmethod
    def execute(
        cls,
        model,
        width: int,
        height: int,
        steps: int,
        seed: int,
        reference=None,
        conditioning=None,
    ) -> io.NodeOutput:
        config = detect_config(logical_shapes(model))  # NotFluxError names what is missing
        inputs = step_inputs(model, config, width, height, seed, conditioning)
        rows, reference_name, reference_output = [], None, None
        if reference is not None:
            if ternary_modules(reference):
                raise ValueError("reference: connect the dense bf16 FLUX model, not a ternary one")
            if detect_config(logical_shapes(reference)) != config:
                raise ValueError("reference: not the same FLUX architecture as the model")
            reference_name = f"{model_label(reference)} (reference)"
            row, reference_output = measure(reference, inputs, steps, reference_name)
            rows.append(row)
        row, _ = measure(model, inputs, steps, model_label(model), reference_output)
        rows.insert(0, row)
        source = "random" if conditioning is None else "given"
        text = (
            f"{width}x{height}, first sampling step (sigma {SIGMA:g}), {source} conditioning, "
            f"median of {steps} calls on {model.load_device}\n"
            + format_report(rows, reference=reference_name)
        )
        return io.NodeOutput(chart_image(rows), text, ui=ui.PreviewText(text))
