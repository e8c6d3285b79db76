"""FLUX.1 (dev, schnell, Kontext, Krea and fine-tunes with the same keys), in BFL / ComfyUI key
names: its configuration, detection from shapes, which linears become ternary, every
tensor's shape, and the presets used by tests, benchmarks and the default CLI job.

Kontext and Krea have exactly FLUX.1-dev's keys and shapes (ComfyUI detects both as its
``Flux`` model; Kontext's reference images reach the model as ``ref_latents``, set by the
ReferenceLatent node), so they are this family; schnell is dev without ``guidance_in``.
Ternary: every linear inside the double and single blocks, their modulation linears
included (99.44 % of FLUX.1-dev's parameters, 99.52 % of schnell's)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .family import (
    Family,
    FluxLikeConfig,
    ModelFamilyError,
    Shapes,
    TextConditioning,
    add_linear,
    check_shapes,
    flux_dimensions,
    random_weights,
)

# Every linear inside the double and single blocks, modulation included.
_BLOCK_LINEAR = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))$"
)
_REQUIRED = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_mlp.0.weight",
)


class NotFluxError(ModelFamilyError):
    """The weights are not a FLUX.1 diffusion model in BFL / ComfyUI naming."""


def is_block_linear(module_name: str) -> bool:
    """True for a module name (without ``.weight``) that the ternary format quantizes."""
    return _BLOCK_LINEAR.match(module_name) is not None


@dataclass(frozen=True)
class FluxConfig(FluxLikeConfig):
    """The shape of a FLUX.1 model, as ComfyUI's detection reads it from the weights."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    in_channels: int = 64
    context_in_dim: int = 4096
    vec_in_dim: int = 768
    mlp_ratio: float = 4.0
    guidance_embed: bool = True


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)
TINY_FLUX = FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
TINY_SCHNELL = FluxConfig(
    hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, guidance_embed=False
)


def claims(shapes: Shapes) -> bool:
    """FLUX.1's own keys: the vector_in embedder and per-block image modulation."""
    return "vector_in.in_layer.weight" in shapes and "double_blocks.0.img_mod.lin.weight" in shapes


def detect_config(shapes: Shapes) -> FluxConfig:
    """Read a FluxConfig from {key: logical shape}; raise NotFluxError naming what is missing.

    Keys must be in BFL / ComfyUI names without a checkpoint prefix; shapes must be logical
    ([out, in] for linears).
    """
    dimensions = flux_dimensions(
        shapes,
        "FLUX.1",
        _REQUIRED,
        NotFluxError,
        mlp=("double_blocks.0.img_mlp.0.weight", 0),
        widths={"vec_in_dim": ("vector_in.in_layer.weight", 1)},
    )
    config = FluxConfig(**dimensions, guidance_embed="guidance_in.in_layer.weight" in shapes)
    check_shapes(flux_shapes(config), shapes, "FLUX.1", NotFluxError)
    return config


def flux_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1 model of this config: {BFL key: shape}."""
    h, mlp, head = config.hidden_size, config.mlp_hidden, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        add_linear(shapes, name, n_out, n_in)

    linear("img_in", h, config.in_channels)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    linear("vector_in.in_layer", h, config.vec_in_dim)
    linear("vector_in.out_layer", h, h)
    if config.guidance_embed:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", h, config.context_in_dim)
    for i in range(config.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (head,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", mlp, h)
            linear(f"{p}_mlp.2", h, mlp)
    for i in range(config.depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + mlp, h)
        linear(f"{p}.linear2", h, h + mlp)
        shapes[f"{p}.norm.query_norm.scale"] = (head,)
        shapes[f"{p}.norm.key_norm.scale"] = (head,)
        linear(f"{p}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", config.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def random_flux_state_dict(
    config: FluxConfig = TINY_FLUX,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """A FLUX.1 model of this config with weights drawn from a seed (tests, benchmarks, CLI)."""
    return random_weights(flux_shapes(config), seed, dtype, device)


def describe(config: FluxConfig) -> str:
    variant = "dev" if config.guidance_embed else "schnell"
    return (
        f"FLUX.1 ({variant}-like), hidden {config.hidden_size}, {config.depth} double + "
        f"{config.depth_single_blocks} single blocks"
    )


def conditioning(config: FluxConfig) -> TextConditioning:
    """T5-XXL tokens (ComfyUI pads a prompt to 256) and CLIP-L's pooled vector."""
    return TextConditioning(config.context_in_dim, 256, config.vec_in_dim, 3.5)


FAMILY = Family(
    name="flux",
    title="FLUX.1",
    claims=claims,
    detect=detect_config,
    is_ternary=is_block_linear,
    shapes=flux_shapes,
    describe=describe,
    latent_channels=lambda config: config.in_channels // 4,
    conditioning=conditioning,
    presets={
        "dev": FLUX_DEV,
        "schnell": FLUX_SCHNELL,
        "tiny": TINY_FLUX,
        "tiny-schnell": TINY_SCHNELL,
    },
)
