"""FLUX.2 (dev and klein 4B / 9B), in BFL / ComfyUI key names: its configuration, detection
from shapes, which linears become ternary, every tensor's shape and the presets.

What differs from FLUX.1 (ComfyUI's ``image_model`` "flux2", model_detection.py:237-251):
no biases anywhere, a SwiGLU MLP of ratio 3 (``mlp.0`` / ``linear1`` hold gate and up
fused), head size 128 over 4 RoPE axes, 128 latent channels at 1/16 of the image with patch
size 1, no pooled vector (no ``vector_in``), ``guidance_in`` in dev only (klein has none),
and *global* modulation: three linears outside the blocks
(``double_stream_modulation_img.lin``, ``double_stream_modulation_txt.lin``,
``single_stream_modulation.lin``) compute the modulation once per step for every block.

Ternary: every linear inside the double and single blocks, and those three global
modulation linears. They are FLUX.1's per-block modulation linears moved out of the blocks
(the same role: matrix-vector products on one conditioning vector per sample), so the rule
"the blocks' linears, modulation included" is the same rule; they hold 1.76 % of FLUX.2-dev
(566 M parameters, 1.13 GB in bf16), and quantizing them is what brings the dev file under
9 GB (8.51 GB instead of 9.50 GB in the 2bit layout). Shares quantized: dev 99.22 %, klein 4B
98.62 %, klein 9B 98.87 %. Everything else (embedders, final layer, norms) stays 16-bit.

The klein sizes are those of the published klein models as other tools list them (hidden
3072 / 4096, 5 + 20 / 8 + 24 blocks, Qwen3-4B / 8B text widths 7680 / 12288); ComfyUI reads
them from the weights, so any size with a head of 128 loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .family import (
    Family,
    FluxLikeConfig,
    ModelFamilyError,
    Shapes,
    TextConditioning,
    add_linear,
    check_shapes,
    flux_dimensions,
)

GLOBAL_MODULATION = (
    "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.lin",
    "single_stream_modulation.lin",
)
_TERNARY = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    r"|single_blocks\.\d+\.(linear1|linear2)"
    r"|double_stream_modulation_(img|txt)\.lin|single_stream_modulation\.lin)$"
)
_REQUIRED = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "final_layer.linear.weight",
    *(f"{name}.weight" for name in GLOBAL_MODULATION),
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_mlp.0.weight",
)
LATENT_CHANNELS = 128  # ComfyUI's latent_formats.Flux2, at 1/16 of the image


class NotFlux2Error(ModelFamilyError):
    """The weights are not a FLUX.2 diffusion model in BFL / ComfyUI naming."""


def is_ternary(module_name: str) -> bool:
    """True for a module name (without ``.weight``) that the ternary format quantizes."""
    return _TERNARY.match(module_name) is not None


@dataclass(frozen=True)
class Flux2Config(FluxLikeConfig):
    """The shape of a FLUX.2 model, as ComfyUI's detection reads it from the weights."""

    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    in_channels: int = 128
    context_in_dim: int = 15360  # Mistral-Small-3 24B: 3 hidden states of 5120
    mlp_ratio: float = 3.0
    guidance_embed: bool = True


FLUX2_DEV = Flux2Config()
FLUX2_KLEIN_4B = Flux2Config(3072, 24, 5, 20, context_in_dim=7680, guidance_embed=False)
FLUX2_KLEIN_9B = Flux2Config(4096, 32, 8, 24, context_in_dim=12288, guidance_embed=False)
TINY_FLUX2 = Flux2Config(256, 2, 2, 2, context_in_dim=512)
TINY_KLEIN = Flux2Config(256, 2, 2, 2, context_in_dim=512, guidance_embed=False)


def claims(shapes: Shapes) -> bool:
    """FLUX.2's own key: the global image-stream modulation (as ComfyUI's detection)."""
    return "double_stream_modulation_img.lin.weight" in shapes


def detect_config(shapes: Shapes) -> Flux2Config:
    """Read a Flux2Config from {key: logical shape}; raise NotFlux2Error naming what is
    missing or of the wrong shape."""
    dimensions = flux_dimensions(
        shapes, "FLUX.2", _REQUIRED, NotFlux2Error, mlp=("double_blocks.0.img_mlp.2.weight", 1)
    )
    config = Flux2Config(**dimensions, guidance_embed="guidance_in.in_layer.weight" in shapes)
    check_shapes(flux2_shapes(config), shapes, "FLUX.2", NotFlux2Error)
    return config


def flux2_shapes(config: Flux2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.2 model of this config: {BFL key: shape}, in ComfyUI's module
    order. No linear has a bias."""
    h, mlp, head = config.hidden_size, config.mlp_hidden, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        add_linear(shapes, name, n_out, n_in, bias=False)

    linear("img_in", h, config.in_channels)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    if config.guidance_embed:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", h, config.context_in_dim)
    for i in range(config.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linear(f"{p}_attn.qkv", 3 * h, h)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (head,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", 2 * mlp, h)  # SwiGLU: gate and up
            linear(f"{p}_mlp.2", h, mlp)
    for i in range(config.depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + 2 * mlp, h)  # qkv, gate, up
        linear(f"{p}.linear2", h, h + mlp)
        shapes[f"{p}.norm.query_norm.scale"] = (head,)
        shapes[f"{p}.norm.key_norm.scale"] = (head,)
    linear("final_layer.linear", config.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    linear("double_stream_modulation_img.lin", 6 * h, h)
    linear("double_stream_modulation_txt.lin", 6 * h, h)
    linear("single_stream_modulation.lin", 3 * h, h)
    return shapes


def describe(config: Flux2Config) -> str:
    variant = "dev-like" if config.guidance_embed else "klein-like, no guidance embedder"
    return (
        f"FLUX.2 ({variant}), hidden {config.hidden_size}, {config.depth} double + "
        f"{config.depth_single_blocks} single blocks, text width {config.context_in_dim}"
    )


def conditioning(config: Flux2Config) -> TextConditioning:
    """The text encoder's hidden states (ComfyUI pads them to 512 tokens), no pooled vector;
    FluxGuidance 4 as in ComfyUI's FLUX.2 template (klein ignores it)."""
    return TextConditioning(config.context_in_dim, 512, None, 4.0)


FAMILY = Family(
    name="flux2",
    title="FLUX.2",
    claims=claims,
    detect=detect_config,
    is_ternary=is_ternary,
    shapes=flux2_shapes,
    describe=describe,
    latent_channels=lambda config: config.in_channels,
    conditioning=conditioning,
    presets={
        "dev": FLUX2_DEV,
        "klein-4b": FLUX2_KLEIN_4B,
        "klein-9b": FLUX2_KLEIN_9B,
        "tiny": TINY_FLUX2,
        "tiny-klein": TINY_KLEIN,
    },
)
