"""Pure-torch ternary linear: the path for CPU, MPS and old GPUs, and the tests' yardstick.

Differentiable through ordinary autograd (x, scale, LoRA); it unpacks the weight of one
layer at a time, so it needs one dense layer of scratch memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ternary.packing import unpack_2bit

FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric fp8 e4m3 quantization: (codes as float32, scale [..., 1] float32).

    ``x ~ codes * scale``; the codes are exactly representable in float8_e4m3fn. The codes
    are x times the reciprocal of the scale (one division per token, as the Triton kernel).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    codes = (xf * (1.0 / scale)).to(torch.float8_e4m3fn).float()
    return codes, scale


def ternary_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    act_bits: int = 16,
) -> torch.Tensor:
    """y = (x T^T) * s + bias + lora_scale * (x down^T) up^T, in x's dtype.

    ``act_bits=8`` first rounds x per token to fp8 e4m3, as the 8-bit kernels do.
    """
    compute = torch.float32 if x.device.type == "cpu" and x.dtype != torch.float64 else x.dtype
    t = unpack_2bit(weight, in_features, dtype=compute)
    if act_bits == 8:
        codes, token_scale = quantize_activations(x)
        y = F.linear(codes.to(compute), t) * token_scale.to(compute)
    elif act_bits == 16:
        y = F.linear(x.to(compute), t)
    else:
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits}")
    y = y * weight_scale.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    if lora_down is not None and lora_up is not None:
        xd = x.to(compute)
        y = y + lora_scale * F.linear(F.linear(xd, lora_down.to(compute)), lora_up.to(compute))
    return y.to(x.dtype)
