"""The ternary linear on Triton kernels: forward policy per dtype, and its autograd Function.

Forward: up to ``DENSE_MIN_TOKENS`` tokens (kernels/tuning.py) the fused kernels read the
2-bit weight directly (memory-bound regime); above, the layer is unpacked into a transient
dense scratch weight (bf16/fp16 s T, or fp8 T) and cuBLAS runs the compute-bound GEMM. The
scratch lives for one product, so at most one layer is dense at a time.

Backward (for distillation): dx = dy (T * s) by a Triton kernel, or above DENSE_MIN_TOKENS
by cuBLAS on the same one-layer scratch (never a persistent dense weight);
d weight_scale = sum over tokens of dy * (x T^T), recomputed tile by tile from the saved
input (one extra GEMM, no [M, N] tensor kept from the forward pass); bias and LoRA
gradients are small products done by torch. With ``act_bits=8`` the activation rounding
is treated as identity for dx (straight-through); the scale gradient uses the same
quantized input as the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_ops import (
    check_packed,
    dense_min_tokens,
    fp8_tensor_cores,
    quantize_fp8,
    split_bf16,
    ternary_dx,
    ternary_matmul,
    ternary_scale_grad,
    unpack_dense,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_inputs(
    x: torch.Tensor, act_bits: int
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(activations, token scale) passes whose results add up to x T^T."""
    if act_bits == 8:
        return [quantize_fp8(x)]
    if x.dtype == torch.float32:
        return [(part, None) for part in split_bf16(x)]
    return [(x, None)]


def _dense_scratch_wins(x: torch.Tensor, weight_rows: int, act_bits: int) -> bool:
    """Large token counts: unpack to a dense scratch weight and let cuBLAS multiply."""
    if x.dtype == torch.float32 or x.shape[0] < dense_min_tokens(x.device):
        return False
    if act_bits == 16:
        return True
    # fp8 rowwise cuBLAS: bf16 output, K and N multiples of 16, fp8 units on the GPU
    k, n = x.shape[1], weight_rows
    fits = x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0
    return fits and fp8_tensor_cores(x.device)


def _dense_scratch_forward(
    x, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits
) -> torch.Tensor:
    """cuBLAS on a transient dense weight. A16: one bf16/fp16 GEMM on s T (+ LoRA merged in,
    rounded once). A8: fp8 T (exact) and rowwise scales in the fp8 GEMM's epilogue.

    The fp8 GEMM accumulates in the tensor cores' fast (reduced-precision) mode: 1.1-1.3x
    faster than promoting to fp32, and at K = 15360 its error (1.2e-3 relative on an H100) is
    20x below the fp8 rounding of the activations that A8 already accepts (2.6e-2)."""
    dtype = x.dtype
    bias = bias.to(dtype) if bias is not None else None
    if act_bits == 16:
        lora = None
        if lora_down is not None:
            lora = (lora_up.to(dtype), lora_down.to(dtype), lora_scale)
        dense = unpack_dense(weight, in_features, dtype, weight_scale, lora)
        return F.linear(x, dense, bias)
    codes, token_scale = quantize_fp8(x)
    ternary = unpack_dense(weight, in_features, torch.float8_e4m3fn)
    y = torch._scaled_mm(
        codes,
        ternary.t(),
        scale_a=token_scale[:, None],
        scale_b=weight_scale.float()[None, :].contiguous(),
        bias=bias,
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )
    if lora_down is not None:
        y.addmm_(F.linear(x, lora_down.to(dtype)), lora_up.to(dtype).t(), alpha=lora_scale)
    return y


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    lora_scale: float,
    act_bits: int,
) -> torch.Tensor:
    """y [M, N] in x's dtype for x [M, K]; bias and LoRA fused into the kernel for 16-bit x."""
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits}")
    args = (x, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits)
    if _dense_scratch_wins(x, weight.shape[0], act_bits):
        return _dense_scratch_forward(*args)
    return fused_forward(*args)


def fused_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    lora_scale: float,
    act_bits: int,
) -> torch.Tensor:
    """The fused Triton kernels at any token count (the small-M path of linear_forward)."""
    dtype = x.dtype
    fused = dtype != torch.float32
    lora = None
    if lora_down is not None and fused:
        lora = (F.linear(x, lora_down.to(dtype)), lora_up.to(dtype), lora_scale)
    y = None
    for i, (xin, token_scale) in enumerate(_kernel_inputs(x, act_bits)):
        part = ternary_matmul(
            xin,
            weight,
            weight_scale,
            in_features,
            token_scale=token_scale,
            bias=bias if fused else None,
            lora=lora,
            out_dtype=dtype,
        )
        y = part if i == 0 else y + part
    if not fused:
        if bias is not None:
            y = y + bias.float()
        if lora_down is not None:
            y = y + lora_scale * F.linear(F.linear(x, lora_down.float()), lora_up.float())
    return y


def input_grad(dy: torch.Tensor, weight, weight_scale, in_features: int) -> torch.Tensor:
    """dx = dy (T * s): the Triton kernel, or cuBLAS on a one-layer dense scratch at large M."""
    if dy.dtype != torch.float32:
        if dy.shape[0] >= dense_min_tokens(dy.device):
            return dy @ unpack_dense(weight, in_features, dy.dtype, weight_scale)
        return ternary_dx(dy, weight, weight_scale, in_features)
    # fp32: scale dy first so the weight stays exact, then two bf16 passes.
    ones = torch.ones_like(weight_scale, dtype=torch.float32)
    hi, lo = split_bf16(dy * weight_scale.float())
    return sum(ternary_dx(part, weight, ones, in_features, out_dtype=dy.dtype) for part in (hi, lo))


def _scale_grad(x: torch.Tensor, weight, in_features: int, dy, act_bits: int) -> torch.Tensor:
    return sum(
        ternary_scale_grad(xin, weight, in_features, dy, token_scale)
        for xin, token_scale in _kernel_inputs(x, act_bits)
    )


class TernaryLinearFunction(torch.autograd.Function):
    """Autograd for the Triton path; inputs: x [M, K], weight, weight_scale, bias, lora_down,
    lora_up, in_features, lora_scale, act_bits."""

    @staticmethod
    def forward(
        ctx, x, weight, weight_scale, bias, lora_down, lora_up, in_features, lora_scale, act_bits
    ):  # noqa: E501
        ctx.save_for_backward(x, weight, weight_scale, lora_down, lora_up)
        ctx.config = (in_features, lora_scale, act_bits)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return linear_forward(
            x, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, weight_scale, down, up = ctx.saved_tensors
        in_features, lora_scale, act_bits = ctx.config
        need_x, _, need_scale, need_bias, need_down, need_up = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        dx = d_scale = d_bias = d_down = d_up = None
        if need_x:
            dx = input_grad(dy, weight, weight_scale, in_features)
            if down is not None:
                dx = dx + lora_scale * (dy @ up.to(dy.dtype)) @ down.to(dy.dtype)
            dx = dx.to(x.dtype)
        if need_scale:
            d_scale = _scale_grad(x, weight, in_features, dy, act_bits).to(weight_scale.dtype)
        if need_bias:
            d_bias = dy.float().sum(0).to(ctx.bias_dtype)
        if need_down or need_up:
            xd = F.linear(x, down.to(x.dtype))
            d_up = (lora_scale * dy.t() @ xd.to(dy.dtype)).to(up.dtype)
            d_down = (lora_scale * (dy @ up.to(dy.dtype)).t() @ x.to(dy.dtype)).to(down.dtype)
        return dx, None, d_scale, d_bias, d_down, d_up, None, None, None


def ternary_linear_triton(
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
    """Same contract as kernels.dispatch.ternary_linear, always on the Triton kernels.

    The tests call it directly on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if x.dtype not in DTYPES:
        raise TypeError(f"Triton ternary linear takes {DTYPES} inputs, got {x.dtype}")
    check_packed(weight, in_features, x)
    if lora_down is None or lora_up is None:
        lora_down = lora_up = None
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    args = (x2d, weight, weight_scale, bias, lora_down, lora_up)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        y = TernaryLinearFunction.apply(*args, in_features, lora_scale, act_bits)
    else:
        y = linear_forward(
            x2d, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits
        )
    return y.reshape(*lead, y.shape[-1])
