"""Chroma (Chroma1-HD / Base and its fine-tunes with the same keys), in BFL / ComfyUI key
names: its configuration, detection from shapes, which linears become ternary, every
tensor's shape and the presets.

Chroma is FLUX.1-schnell's transformer without its modulation: the blocks are FLUX.1's
double and single blocks built without their ``*_mod.lin`` / ``modulation.lin``, there is no
``vector_in`` (no pooled CLIP vector: T5-XXL only) and no ``guidance_in``. Every block's
modulation vectors come instead from a small separate network, the ``distilled_guidance_layer``
(ComfyUI's ``Approximator``: 64 -> 5120, 5 residual MLP layers, -> 3072, computed once per
step on 344 position rows).

Ternary: every linear inside the double and single blocks (228 linears at full size,
96.70 % of the parameters). The distilled_guidance_layer stays 16-bit: it is outside the
blocks, a small share (278 M parameters, 3.1 %), and every block's shift / scale / gate comes
out of it, so its error would reach every block at once; that is the role the rule keeps
16-bit in FLUX.1 too (the embedders and the final layer).

ComfyUI's detection fixes the distilled_guidance_layer at 64 / 5120 / 5 layers / 3072
(model_detection.py:293-298), so a Chroma that ComfyUI loads has hidden size 3072; the pack
reads those sizes from the weights, so narrow test models work in the file code (``tiny``)
but only ``tiny-comfy`` (3072 wide, 1 + 1 blocks, 619 M parameters) loads in ComfyUI.
Chroma Radiance (pixel space, ``nerf_blocks``) is a different model and not supported.
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
    block_indices,
    check_shapes,
    flux_dimensions,
)

APPROXIMATOR = "distilled_guidance_layer"
APPROXIMATOR_IN = 64  # 16 + 16 + 32 sinusoidal features (timestep, guidance, position)
_BLOCK_LINEAR = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    r"|single_blocks\.\d+\.(linear1|linear2))$"
)
_REQUIRED = (
    "img_in.weight",
    "txt_in.weight",
    f"{APPROXIMATOR}.in_proj.weight",
    f"{APPROXIMATOR}.out_proj.weight",
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_mlp.0.weight",
)
_NORM0 = (f"{APPROXIMATOR}.norms.0.scale", f"{APPROXIMATOR}.norms.0.weight")


class NotChromaError(ModelFamilyError):
    """The weights are not a Chroma diffusion model in BFL / ComfyUI naming."""


def is_block_linear(module_name: str) -> bool:
    """True for a module name (without ``.weight``) that the ternary format quantizes."""
    return _BLOCK_LINEAR.match(module_name) is not None


@dataclass(frozen=True)
class ChromaConfig(FluxLikeConfig):
    """The shape of a Chroma model (ComfyUI fixes the approximator at 5120 / 5 layers)."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    in_channels: int = 64
    context_in_dim: int = 4096
    mlp_ratio: float = 4.0
    approximator_hidden: int = 5120
    approximator_layers: int = 5


CHROMA = ChromaConfig()
# The smallest Chroma ComfyUI detects and runs: full width, one block of each kind.
TINY_COMFY_CHROMA = ChromaConfig(depth=1, depth_single_blocks=1, context_in_dim=64)
# Narrow, for the file code only (ComfyUI's detection cannot build it).
TINY_CHROMA = ChromaConfig(
    256, 2, 2, 2, context_in_dim=64, approximator_hidden=256, approximator_layers=2
)


def claims(shapes: Shapes) -> bool:
    """Chroma's own keys: the distilled guidance network beside a latent ``img_in`` (Chroma
    Radiance has a pixel patch embedder instead and is not claimed)."""
    return any(k in shapes for k in _NORM0) and "img_in.weight" in shapes


def detect_config(shapes: Shapes) -> ChromaConfig:
    """Read a ChromaConfig from {key: logical shape}; raise NotChromaError naming what is
    missing or of the wrong shape."""
    dimensions = flux_dimensions(
        shapes,
        "Chroma",
        _REQUIRED,
        NotChromaError,
        mlp=("double_blocks.0.img_mlp.0.weight", 0),
        widths={"approximator_hidden": (f"{APPROXIMATOR}.in_proj.weight", 0)},
    )
    layers = block_indices(
        shapes, f"{APPROXIMATOR}.layers", "distilled guidance layer", NotChromaError
    )
    config = ChromaConfig(**dimensions, approximator_layers=layers)
    check_shapes(chroma_shapes(config), shapes, "Chroma", NotChromaError)
    return config


def chroma_shapes(config: ChromaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Chroma model of this config: {BFL key: shape}, in ComfyUI's module
    order."""
    h, mlp, head = config.hidden_size, config.mlp_hidden, config.head_dim
    a = config.approximator_hidden
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        add_linear(shapes, name, n_out, n_in)

    linear("img_in", h, config.in_channels)
    linear("txt_in", h, config.context_in_dim)
    linear(f"{APPROXIMATOR}.in_proj", a, APPROXIMATOR_IN)
    for i in range(config.approximator_layers):
        linear(f"{APPROXIMATOR}.layers.{i}.in_layer", a, a)
        linear(f"{APPROXIMATOR}.layers.{i}.out_layer", a, a)
    for i in range(config.approximator_layers):
        shapes[f"{APPROXIMATOR}.norms.{i}.scale"] = (a,)
    linear(f"{APPROXIMATOR}.out_proj", h, a)
    for i in range(config.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
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
    linear("final_layer.linear", config.in_channels, h)
    return shapes


def describe(config: ChromaConfig) -> str:
    return (
        f"Chroma, hidden {config.hidden_size}, {config.depth} double + "
        f"{config.depth_single_blocks} single blocks"
    )


def conditioning(config: ChromaConfig) -> TextConditioning:
    """T5-XXL only (ComfyUI's Chroma tokenizer does not pad), no pooled vector; the
    guidance input is 0, as ComfyUI's Chroma sends it."""
    return TextConditioning(config.context_in_dim, 256, None, 0.0)


FAMILY = Family(
    name="chroma",
    title="Chroma",
    claims=claims,
    detect=detect_config,
    is_ternary=is_block_linear,
    shapes=chroma_shapes,
    describe=describe,
    latent_channels=lambda config: config.in_channels // 4,
    conditioning=conditioning,
    presets={"full": CHROMA, "tiny-comfy": TINY_COMFY_CHROMA, "tiny": TINY_CHROMA},
)
