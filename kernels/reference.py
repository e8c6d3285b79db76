"""Pure-torch ternary linear: the path for CPU, MPS and old GPUs, and the tests' yardstick.

Forward and the two backward products the op needs (dx and d scale); the other gradients
(bias, LoRA) are ordinary torch products in kernels/op.py. Each unpacks the weight of one
layer at a time, so it needs one dense layer of scratch memory. On the CPU 16-bit inputs are
computed in float32 (CPU half-precision matmuls are slow and round more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import unpack_2bit
from .weight import LoraBranch, TernaryWeight

FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def fp8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric fp8 e4m3 quantization: (float8_e4m3fn codes, scale [..., 1] float32).

    ``x ~ codes * scale``. The codes are x times the reciprocal of the scale (one division
    per token, as the Triton kernel). Plain torch ops: under torch.compile (kernels/op.py)
    Inductor fuses them into the op that produced x.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf * (1.0 / scale)).to(torch.float8_e4m3fn), scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_codes` with the codes as float32 (exactly the fp8 values)."""
    codes, scale = fp8_codes(x)
    return codes.float(), scale


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "cpu" and x.dtype != torch.float64 else x.dtype


def linear_reference(
    x: torch.Tensor,
    weight: TernaryWeight,
    bias: torch.Tensor | None = None,
    lora: LoraBranch | None = None,
    act_bits: int = 16,
) -> torch.Tensor:
    """y = (x T^T) * s + bias + lora.scale * (x down^T) up^T, in x's dtype.

    ``act_bits=8`` first rounds x per token to fp8 e4m3, as the 8-bit kernels do.
    """
    compute = compute_dtype(x)
    t = unpack_2bit(weight.packed, weight.in_features, dtype=compute)
    if act_bits == 8:
        codes, token_scale = quantize_activations(x)
        y = F.linear(codes.to(compute), t) * token_scale.to(compute)
    elif act_bits == 16:
        y = F.linear(x.to(compute), t)
    else:
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits}")
    y = y * weight.scale.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    if lora is not None:
        xd = x.to(compute)
        y = y + lora.scale * F.linear(F.linear(xd, lora.down.to(compute)), lora.up.to(compute))
    return y.to(x.dtype)


def input_grad_reference(dy: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    """dx = dy (T * s) in dy's dtype."""
    compute = compute_dtype(dy)
    t = unpack_2bit(weight.packed, weight.in_features, dtype=compute)
    return ((dy.to(compute) * weight.scale.to(compute)) @ t).to(dy.dtype)


def scale_grad_reference(
    x: torch.Tensor, weight: TernaryWeight, dy: torch.Tensor, act_bits: int
) -> torch.Tensor:
    """d scale [N] = sum over tokens of dy * (x T^T), float32; with ``act_bits=8`` x is
    first rounded as the forward pass rounded it (float64 inputs: float64)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = unpack_2bit(weight.packed, weight.in_features, dtype=compute)
    if act_bits == 8:
        codes, token_scale = quantize_activations(x)
        product = (codes.to(compute) @ t.t()) * token_scale.to(compute)
    else:
        product = x.to(compute) @ t.t()
    return (product * dy.to(compute)).reshape(-1, weight.out_features).sum(0)
