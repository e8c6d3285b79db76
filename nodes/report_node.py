"""Ternary Report: time a ternary MODEL (and a bf16 reference) at one resolution -> table + chart.

Each model runs the same model call ComfyUI's samplers make (``BaseModel.apply_model``,
after ``load_models_gpu``): the first sampling step of a generation, pure noise at sigma 1,
with the given or seeded random conditioning. Every model is measured alone (the other
models are unloaded first), so its peak VRAM is its own weights plus the activations.
The error is that of the ternary model's prediction (the flow's velocity) against the
reference's on identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management as mm
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..models.family import Family
from ..models.registry import detect_family
from ..ternary.measure import ReportRow, format_report, measure_step, render_chart
from .model_io import logical_shapes
from .ternary_ops import ternary_modules

SIGMA = 1.0
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# ComfyUI's text encoders of each family, for the message when other conditioning is given.
TEXT_ENCODERS = {
    "flux": "DualCLIPLoader type flux -> CLIPTextEncode",
    "flux2": "CLIPLoader type flux2 -> CLIPTextEncode",
    "chroma": "CLIPLoader type chroma -> CLIPTextEncode",
}


@dataclass(frozen=True)
class StepInputs:
    """The inputs of one model call (CPU tensors; each run moves them to its device)."""

    noise: torch.Tensor  # [1, latent channels, H / downscale, W / downscale]
    context: torch.Tensor  # [1, tokens, context_dim]
    pooled: torch.Tensor | None  # [1, pooled_dim]; None for families without one
    guidance: float


def model_family(patcher) -> tuple[Family, object]:
    """(family, config) of a MODEL's diffusion model (ModelFamilyError names what it is)."""
    return detect_family(logical_shapes(patcher))


def step_inputs(patcher, width: int, height: int, seed: int, conditioning=None) -> StepInputs:
    """Noise of the model's latent size, and conditioning of its family's shapes: the given
    one, or seeded random (text width, tokens, pooled vector or not, default guidance from
    the family; latent channels and downscale from ComfyUI's latent format)."""
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16, got {width}x{height}")
    family, config = model_family(patcher)
    text = family.conditioning(config)
    latent = patcher.model.latent_format
    down = latent.spacial_downscale_ratio
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, latent.latent_channels, height // down, width // down, generator=gen)
    if conditioning is None:
        context = torch.randn(1, text.tokens, text.context_dim, generator=gen)
        pooled = None if text.pooled_dim is None else torch.randn(1, text.pooled_dim, generator=gen)
        return StepInputs(noise, context, pooled, text.guidance)
    context, extras = conditioning[0]
    encoder = TEXT_ENCODERS.get(family.name, f"a {family.title} text encoder")
    pooled = extras.get("pooled_output")
    if text.pooled_dim is not None and pooled is None:
        raise ValueError(
            f"the conditioning has no pooled output: connect a {family.title} text encoding "
            f"({encoder})"
        )
    if context.shape[-1] != text.context_dim:
        raise ValueError(
            f"the conditioning has {context.shape[-1]} channels; this {family.title} model takes "
            f"{text.context_dim} ({encoder})"
        )
    guidance = float(extras.get("guidance", text.guidance))
    pooled = None if text.pooled_dim is None else pooled[:1]
    return StepInputs(noise, context[:1], pooled, guidance)


def model_kwargs(patcher, inputs: StepInputs, device) -> dict:
    """The model's inputs as ComfyUI's sampler builds them from a conditioning: the model's
    own ``extra_conds`` (FLUX.2 pads the text to 512 tokens, Chroma's guidance input...) and
    the sampler's ``cond_cat``."""
    conds = patcher.model.extra_conds(
        cross_attn=inputs.context,
        pooled_output=inputs.pooled,
        guidance=inputs.guidance,
        noise=inputs.noise,
        device=device,
    )
    batch = {k: c.process_cond(batch_size=1, area=None, device=device) for k, c in conds.items()}
    return comfy.samplers.cond_cat([batch], device)


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
    kwargs = model_kwargs(patcher, inputs, device)

    @torch.inference_mode()
    def step() -> torch.Tensor:
        denoised = patcher.model.apply_model(noise, sigma, **kwargs)
        return (noise - denoised) / SIGMA  # the flow's velocity: denoised = x - sigma * v

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
            description="Times a FLUX.1, FLUX.2 or Chroma MODEL (usually the ternary one) at "
            "one resolution: "
            "weight bytes, peak VRAM (GPU only), seconds per model call, and, with a bf16 "
            "reference connected, the relative error of its prediction. Unloads the other "
            "models first so each is measured alone.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to measure (a ternary model)."),
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
                    tooltip="The bf16 MODEL the ternary one was made from: adds its row "
                    "and the relative error of the ternary model against it.",
                ),
                io.Conditioning.Input(
                    "conditioning",
                    optional=True,
                    tooltip="The model's text conditioning (CLIPTextEncode, FluxGuidance) to run "
                    "with. Without it: seeded random text embeddings of the model family's "
                    "shapes, its default guidance (FLUX.1 3.5, FLUX.2 4, Chroma 0).",
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
        family, config = model_family(model)  # ModelFamilyError names what was found
        inputs = step_inputs(model, width, height, seed, conditioning)
        rows, reference_name, reference_output = [], None, None
        if reference is not None:
            if ternary_modules(reference):
                raise ValueError("reference: connect the dense bf16 model, not a ternary one")
            if model_family(reference) != (family, config):
                raise ValueError(
                    f"reference: not the same {family.title} architecture as the model"
                )
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
