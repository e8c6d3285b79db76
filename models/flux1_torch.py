"""A pure-torch FLUX.1 transformer (the BFL architecture, as ComfyUI runs it) for training.

The trainer, the teacher data set builder and the tests need FLUX without ComfyUI. Module
names equal the BFL / ComfyUI state-dict keys (``double_blocks.0.img_attn.qkv`` ...), so a
ComfyUI checkpoint loads with ``load_state_dict`` and ``quantize_model`` swaps the block
linears for TernaryLinear in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ternary.module import TernaryLinear
from .family import strip_prefix
from .flux1 import FluxConfig, detect_config, is_block_linear

PATCH = 2
THETA = 10000
AXES_DIM = (16, 56, 56)  # ComfyUI's fixed FLUX.1 RoPE split of a 128-wide head

# (module name, in_features, out_features, bias) -> a linear module.
LinearFactory = Callable[[str, int, int, bool], nn.Module]


def dense_linears(dtype: torch.dtype, device=None) -> LinearFactory:
    """Factory of plain nn.Linear layers (the bf16 teacher)."""
    return lambda name, k, n, bias: nn.Linear(k, n, bias=bias, dtype=dtype, device=device)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), computed in float32 like BFL."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: torch.Tensor, axes_dim=AXES_DIM, theta: int = THETA) -> torch.Tensor:
    """Rotation (cos, sin) per position and frequency: [B, L, head_dim / 2, 2], float64.

    ids [B, L, 3] hold (index, row, column); axis i uses axes_dim[i] of the head.
    """
    parts = []
    for axis, dim in enumerate(axes_dim):
        exponent = torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64)
        omega = (1.0 / theta**exponent).to(ids.device)
        parts.append(ids[..., axis].double()[..., None] * omega)
    angles = torch.cat(parts, dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, H, L, D] by the angles of rope [B, L, D/2, 2]."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(compute).unflatten(-1, (-1, 2))
    cos, sin = rope[:, None, ..., 0].to(compute), rope[:, None, ..., 1].to(compute)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention(q, k, v, rope: torch.Tensor) -> torch.Tensor:
    """Joint attention of [B, H, L, D] heads after RoPE; returns [B, L, H * D]."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class RMSNorm(nn.Module):
    """RMSNorm with its weight named ``scale`` (BFL key); eps 1e-6 as BFL, ComfyUI and
    diffusers."""

    def __init__(self, dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim, dtype, device)
        self.key_norm = RMSNorm(head_dim, dtype, device)


class MLPEmbedder(nn.Module):
    def __init__(self, prefix: str, k: int, h: int, make: LinearFactory) -> None:
        super().__init__()
        self.in_layer = make(f"{prefix}.in_layer", k, h, True)
        self.out_layer = make(f"{prefix}.out_layer", h, h, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, prefix: str, h: int, count: int, make: LinearFactory) -> None:
        super().__init__()
        self.count = count
        self.lin = make(f"{prefix}.lin", h, count * h, True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate, ...) each [B, 1, h]."""
        return self.lin(F.silu(vec[:, None, :])).chunk(self.count, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, prefix: str, h: int, head_dim: int, make: LinearFactory, dtype, device):
        super().__init__()
        self.qkv = make(f"{prefix}.qkv", h, 3 * h, True)
        self.norm = QKNorm(head_dim, dtype, device)
        self.proj = make(f"{prefix}.proj", h, h, True)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, L, 3 * H * D] -> q, k, v each [B, H, L, D]."""
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


class DoubleStreamBlock(nn.Module):
    def __init__(self, prefix: str, config: FluxConfig, make: LinearFactory, dtype, device):
        super().__init__()
        h, mlp = config.hidden_size, config.mlp_hidden
        self.heads = config.num_heads
        head_dim = h // self.heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(f"{prefix}.{s}_mod", h, 6, make))
            attn = SelfAttention(f"{prefix}.{s}_attn", h, head_dim, make, dtype, device)
            setattr(self, f"{s}_attn", attn)
            layers = [
                make(f"{prefix}.{s}_mlp.0", h, mlp, True),
                nn.GELU(approximate="tanh"),
                make(f"{prefix}.{s}_mlp.2", mlp, h, True),
            ]
            setattr(self, f"{s}_mlp", nn.Sequential(*layers))

    def forward(self, img, txt, vec, rope):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        qkv = []
        for x, mod, attn in ((txt, txt_mod, self.txt_attn), (img, img_mod, self.img_attn)):
            q, k, v = split_heads(attn.qkv(modulate(layer_norm(x), mod[0], mod[1])), self.heads)
            qkv.append((attn.norm.query_norm(q).to(v), attn.norm.key_norm(k).to(v), v))
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkv, strict=True))
        joint = attention(q, k, v, rope)
        txt_attn, img_attn = joint[:, : txt.shape[1]], joint[:, txt.shape[1] :]
        img = self._residual(img, img_attn, img_mod, self.img_attn.proj, self.img_mlp)
        txt = self._residual(txt, txt_attn, txt_mod, self.txt_attn.proj, self.txt_mlp)
        return img, txt

    @staticmethod
    def _residual(x, attn_out, mod, proj, mlp):
        x = x + mod[2] * proj(attn_out)
        return x + mod[5] * mlp(modulate(layer_norm(x), mod[3], mod[4]))


class SingleStreamBlock(nn.Module):
    def __init__(self, prefix: str, config: FluxConfig, make: LinearFactory, dtype, device):
        super().__init__()
        h, mlp = config.hidden_size, config.mlp_hidden
        self.heads, self.hidden, self.mlp_hidden = config.num_heads, h, mlp
        self.linear1 = make(f"{prefix}.linear1", h, 3 * h + mlp, True)
        self.linear2 = make(f"{prefix}.linear2", h + mlp, h, True)
        self.norm = QKNorm(h // self.heads, dtype, device)
        self.modulation = Modulation(f"{prefix}.modulation", h, 3, make)

    def forward(self, x, vec, rope):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split(
            [3 * self.hidden, self.mlp_hidden], dim=-1
        )
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm.query_norm(q).to(v), self.norm.key_norm(k).to(v)
        out = self.linear2(
            torch.cat((attention(q, k, v, rope), F.gelu(mlp, approximate="tanh")), dim=2)
        )
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, config: FluxConfig, make: LinearFactory) -> None:
        super().__init__()
        h = config.hidden_size
        self.linear = make("final_layer.linear", h, config.in_channels, True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), make("final_layer.adaLN_modulation.1", h, 2 * h, True)
        )

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class FluxTransformer(nn.Module):
    """FLUX.1 velocity model: (latent [B,16,H,W], t, T5 context, pooled, guidance) -> v."""

    def __init__(
        self,
        config: FluxConfig,
        make_linear: LinearFactory | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if config.head_dim != sum(AXES_DIM):
            raise ValueError(
                f"FLUX.1 RoPE needs a head size of {sum(AXES_DIM)}, got "
                f"{config.hidden_size} / {config.num_heads} heads"
            )
        make = make_linear or dense_linears(dtype, device)
        h = config.hidden_size
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.img_in = make("img_in", config.in_channels, h, True)
        self.time_in = MLPEmbedder("time_in", 256, h, make)
        self.vector_in = MLPEmbedder("vector_in", config.vec_in_dim, h, make)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder("guidance_in", 256, h, make)
        self.txt_in = make("txt_in", config.context_in_dim, h, True)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(f"double_blocks.{i}", config, make, dtype, device)
            for i in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(f"single_blocks.{i}", config, make, dtype, device)
            for i in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(config, make)

    @property
    def dtype(self) -> torch.dtype:
        return self.txt_in.bias.dtype

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the first block sees: image tokens, text tokens, the conditioning vector and
        the RoPE angles (img [B, h*w/4, hidden], txt [B, L, hidden], vec [B, hidden])."""
        b, _, height, width = x.shape
        if height % PATCH or width % PATCH:
            raise ValueError(f"latent height and width must be even, got {height}x{width}")
        dtype = self.dtype
        img = self.img_in(patchify(x).to(dtype))
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.config.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(context.to(dtype))
        return img, txt, vec, rope_for(b, context.shape[1], height, width, dtype, x.device)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latents x [B, C, H, W] (H, W even) at t in [0, 1] ([B])."""
        height, width = x.shape[-2:]
        img, txt, vec, rope = self.embed(x, timesteps, context, y, guidance)
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rope)
        joint = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            joint = self._run(block, joint, vec, rope)
        out = self.final_layer(joint[:, txt.shape[1] :], vec)
        return unpatchify(out, height, width)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4] tokens of 2x2 patches, channel-major."""
    b, c, height, width = x.shape
    x = x.view(b, c, height // PATCH, PATCH, width // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * PATCH * PATCH)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def rope_for(
    batch: int, txt_len: int, height: int, width: int, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """RoPE angles of a latent height x width after txt_len text tokens, in the precision the
    blocks use (float64 for a float64 model, else float32)."""
    rope = rope_angles(position_ids(batch, txt_len, height, width, device))
    return rope.to(torch.float64 if dtype == torch.float64 else torch.float32)


def position_ids(batch: int, txt_len: int, height: int, width: int, device=None) -> torch.Tensor:
    """RoPE ids [B, txt_len + h*w, 3]: zeros for text, (0, row, column) for image patches."""
    h, w = height // PATCH, width // PATCH
    img = torch.zeros(h, w, 3, device=device)
    img[..., 1] = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    img[..., 2] = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    txt = torch.zeros(txt_len, 3, device=device)
    return torch.cat((txt, img.flatten(0, 1)), dim=0).expand(batch, -1, -1)


def flux_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    device=None,
    gradient_checkpointing: bool = False,
) -> FluxTransformer:
    """A dense FLUX model holding these BFL-named weights (prefixes allowed)."""
    state_dict = {strip_prefix(k): v for k, v in state_dict.items()}
    config = detect_config({k: tuple(v.shape) for k, v in state_dict.items()})
    dtype = dtype or state_dict["img_in.weight"].dtype
    with torch.device("meta"):
        model = FluxTransformer(config, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def quantize_model(model: nn.Module, lora_rank: int = 0, scale_rule: str = "absmean") -> nn.Module:
    """Replace every block linear (``is_block_linear``) by a TernaryLinear, in place.

    LoRA factors (if rank > 0) fit the quantization residual; they share the old weight's dtype.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_block_linear(name):
            parent_name, _, child = name.rpartition(".")
            ternary = TernaryLinear.from_dense(
                module.weight.data, module.bias.data, lora_rank, scale_rule
            )
            setattr(model.get_submodule(parent_name), child, ternary)
    return model


def ternary_flux_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    layers: dict[str, tuple[int, int]],
    dtype: torch.dtype = torch.bfloat16,
    device=None,
    gradient_checkpointing: bool = False,
) -> FluxTransformer:
    """A ternary FLUX model from a format-v1 state dict ({L.weight packed, L.weight_scale, ...}).

    ``layers`` maps each quantized module name to its logical [N, K].
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name, (n, k) in layers.items():
        shapes[f"{name}.weight"] = (n, k)
    config = detect_config(shapes)

    def make(name: str, k: int, n: int, bias: bool) -> nn.Module:
        if name not in layers:
            return nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
        down = state_dict.get(f"{name}.lora_down")
        rank = 0 if down is None else down.shape[0]
        return TernaryLinear(k, n, bias=bias, lora_rank=rank, dtype=dtype, device=device)

    model = FluxTransformer(config, make, dtype, device, gradient_checkpointing)
    model.load_state_dict(state_dict, strict=True)
    return model
