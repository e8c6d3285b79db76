"""The ternary linear's paths on Triton kernels: forward, dx and d scale (kernels/plan.py
says which path runs).

Forward ``fused`` / ``gemv``: the kernels read the 2-bit weight directly (memory-bound
regime). ``dense``: the layer is unpacked into a transient dense scratch weight (bf16/fp16
s T, or fp8 T) and cuBLAS runs the compute-bound GEMM. The scratch lives for one product, so
at most one layer is dense at a time.

Backward (for distillation): dx = dy (T * s) by a Triton kernel, or on the ``dense`` path by
cuBLAS on the same one-layer scratch (never a persistent dense weight); d scale = sum over
tokens of dy * (x T^T), recomputed tile by tile from the saved input (one extra GEMM, no
[M, N] tensor kept from the forward pass). The scale gradient of 8-bit activations uses the
same fp8 codes as the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import Plan
from .triton_launch import (
    QUANT_MAX_ONE_PASS,
    quantize_and_unpack,
    quantize_fp8,
    split_bf16,
    ternary_dx,
    ternary_matmul,
    ternary_scale_grad,
    unpack_dense,
)
from .weight import LoraBranch, TernaryWeight

Codes = tuple[torch.Tensor, torch.Tensor]  # fp8 codes [M, K] and their float32 scales [M]


def _kernel_inputs(x: torch.Tensor, act_bits: int, codes: Codes | None):
    """(activations, token scale) passes whose results add up to x T^T."""
    if act_bits == 8:
        return [codes if codes is not None else quantize_fp8(x)]
    if x.dtype == torch.float32:
        return [(part, None) for part in split_bf16(x)]
    return [(x, None)]


def _dense_forward(x, weight, bias, lora, act_bits, codes) -> torch.Tensor:
    """cuBLAS on a transient dense weight. A16: one bf16/fp16 GEMM on s T (+ LoRA merged in,
    rounded once). A8: fp8 T (exact) and rowwise scales in the fp8 GEMM's epilogue.

    The fp8 GEMM accumulates in the tensor cores' fast (reduced-precision) mode: 1.1-1.3x
    faster than promoting to fp32, and at K = 15360 its error (1.2e-3 relative on an H100) is
    20x below the fp8 rounding of the activations that A8 already accepts (2.6e-2)."""
    dtype = x.dtype
    bias = bias.to(dtype) if bias is not None else None
    if act_bits == 16:
        merged = None if lora is None else (lora.up.to(dtype), lora.down.to(dtype), lora.scale)
        return F.linear(x, unpack_dense(weight, dtype, lora=merged), bias)
    if codes is None and x.shape[1] <= QUANT_MAX_ONE_PASS:
        q, token_scale, ternary = quantize_and_unpack(x, weight)  # one launch for both
    else:
        q, token_scale = codes if codes is not None else quantize_fp8(x)
        ternary = unpack_dense(weight, torch.float8_e4m3fn, scaled=False)
    y = torch._scaled_mm(
        q,
        ternary.t(),
        scale_a=token_scale[:, None],
        scale_b=weight.scale[None, :],
        bias=bias,
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )
    if lora is not None:
        y.addmm_(F.linear(x, lora.down.to(dtype)), lora.up.to(dtype).t(), alpha=lora.scale)
    return y


def _fused_forward(x, weight, bias, lora, act_bits, codes, plan: Plan) -> torch.Tensor:
    """The fused Triton kernels (bias and LoRA in the epilogue for 16-bit x)."""
    dtype = x.dtype
    fused = dtype != torch.float32
    lora_args = None
    if lora is not None and fused:
        lora_args = (F.linear(x, lora.down.to(dtype)), lora.up.to(dtype), lora.scale)
    y = None
    for i, (xin, token_scale) in enumerate(_kernel_inputs(x, act_bits, codes)):
        part = ternary_matmul(
            xin,
            weight,
            plan.configs,
            plan.family,
            token_scale=token_scale,
            bias=bias if fused else None,
            lora=lora_args,
            out_dtype=dtype,
        )
        y = part if i == 0 else y + part
    if not fused:
        if bias is not None:
            y = y + bias.float()
        if lora is not None:
            y = y + lora.scale * F.linear(F.linear(x, lora.down.float()), lora.up.float())
    return y


def forward(
    x: torch.Tensor,
    weight: TernaryWeight,
    bias: torch.Tensor | None,
    lora: LoraBranch | None,
    act_bits: int,
    plan: Plan,
    codes: Codes | None = None,
) -> torch.Tensor:
    """y [M, N] in x's dtype for x [M, K] on the plan's path (``codes``: x's fp8 codes when
    the caller already made them)."""
    if plan.path == "dense":
        return _dense_forward(x, weight, bias, lora, act_bits, codes)
    return _fused_forward(x, weight, bias, lora, act_bits, codes, plan)


def input_grad(dy: torch.Tensor, weight: TernaryWeight, plan: Plan) -> torch.Tensor:
    """dx = dy (T * s) [M, K]: the Triton kernel, or cuBLAS on a one-layer dense scratch."""
    if plan.path == "dense":
        return dy @ unpack_dense(weight, dy.dtype)
    if dy.dtype != torch.float32:
        return ternary_dx(dy, weight, plan.configs, plan.family)
    # fp32: scale dy first so the weight stays exact, then two bf16 passes.
    unscaled = TernaryWeight(weight.packed, torch.ones_like(weight.scale), weight.in_features)
    hi, lo = split_bf16(dy * weight.scale)
    return sum(
        ternary_dx(part, unscaled, plan.configs, plan.family, out_dtype=dy.dtype)
        for part in (hi, lo)
    )


def scale_grad(
    x: torch.Tensor,
    weight: TernaryWeight,
    dy: torch.Tensor,
    act_bits: int,
    plan: Plan,
    codes: Codes | None = None,
) -> torch.Tensor:
    """d scale [N] float32 = sum over tokens of dy * (x T^T)."""
    return sum(
        ternary_scale_grad(xin, weight, dy, plan.configs[0], token_scale)
        for xin, token_scale in _kernel_inputs(x, act_bits, codes)
    )
