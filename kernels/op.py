"""The one ternary linear: ``ternary_flux::linear``, a registered PyTorch custom op.

Everything that runs a ternary linear calls :func:`ternary_linear` (the module, ComfyUI's
layers, the trainer, the benchmarks). Eager inference calls the op's implementation
directly (the dispatcher would add 6-20 us to each of the ~300 calls of a step); training
and compiled graphs call the registered op. The op has a fake (meta) implementation and
registered autograd, so torch.compile traces a ternary model without a graph break at a
ternary layer and Inductor schedules the op as one opaque kernel call. Its implementation asks
kernels/plan.py for the path: the Triton paths of kernels/triton_linear.py on NVIDIA GPUs,
the torch reference of kernels/reference.py elsewhere (CPU included). The two backward
products are custom ops too (``linear_input_grad``, ``linear_scale_grad``), so a compiled
training step traces as well.

8-bit activations: in eager mode the op quantizes x itself with one fused Triton kernel.
Under torch.compile the per-token quantization is written in plain torch ops before the op
(:func:`kernels.reference.quantize_activations`'s arithmetic), so that Inductor fuses it into
the kernel that produced x (norm + modulation, GELU, concatenation) instead of reading x
again; the op then receives the codes.

Compiled inference graphs and the ``dense`` plan (many tokens): the product is written in traceable
ops instead of the op, the unpack of the layer into its one-layer scratch as torch bit
operations that Inductor turns into one kernel, then cuBLAS (``torch._scaled_mm`` for 8-bit
activations, ``F.linear`` for 16-bit): kernels/triton_linear.py's dense path (except that a
16-bit layer's LoRA runs as a low-rank branch instead of merged into the scratch), but
launched by Inductor's generated code instead of ~150 us of Python and
Triton launcher per layer (measured on the H200 host).

The op's arguments are the flattened weight objects of kernels/weight.py; nothing else
should call ``torch.ops.ternary_flux.*`` directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import unpack_2bit
from .plan import (
    backend,
    dense_min_tokens,
    dense_sizes_fit,
    plan_input_grad,
    plan_linear,
    plan_scale_grad,
)
from .reference import (
    fp8_codes,
    input_grad_reference,
    linear_reference,
    scale_grad_reference,
)
from .weight import LoraBranch, TernaryWeight

try:  # Triton is optional (CPU-only installs); plan.py never picks its paths without it
    from . import triton_linear
except ImportError:
    triton_linear = None

Tensor = torch.Tensor


def _weight(packed: Tensor, scale: Tensor, in_features: int) -> TernaryWeight:
    return TernaryWeight(packed, scale if scale.dtype == torch.float32 else scale.float(),
                         in_features)  # fmt: skip


def _codes(codes: Tensor | None, token_scale: Tensor | None, k: int):
    return None if codes is None else (codes.reshape(-1, k), token_scale.reshape(-1))


def _linear_impl(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    in_features: int,
    bias: Tensor | None,
    lora_down: Tensor | None,
    lora_up: Tensor | None,
    lora_scale: float,
    act_bits: int,
    codes: Tensor | None,
    token_scale: Tensor | None,
) -> Tensor:
    if x.device != packed.device:
        raise ValueError(f"input on {x.device} but the ternary weight on {packed.device}")
    weight = _weight(packed, scale, in_features)
    lora = None if lora_down is None else LoraBranch(lora_down, lora_up, lora_scale)
    x2d = x.reshape(-1, in_features)
    plan = plan_linear(x2d.shape[0], packed.shape[0], in_features, x.dtype, act_bits, x.device)
    if plan.path == "reference":
        y = linear_reference(x2d, weight, bias, lora, act_bits)
    else:
        c = _codes(codes, token_scale, in_features)
        y = triton_linear.forward(x2d, weight, bias, lora, act_bits, plan, c)
    return y.reshape(*x.shape[:-1], packed.shape[0])


_linear = torch.library.custom_op("ternary_flux::linear", _linear_impl, mutates_args=())


@_linear.register_fake
def _linear_fake(x, packed, scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits,
                 codes, token_scale):  # fmt: skip
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("ternary_flux::linear_input_grad", mutates_args=())
def _input_grad(dy: Tensor, packed: Tensor, scale: Tensor, in_features: int) -> Tensor:
    """dx [M, K] = dy (T * s) for dy [M, N]."""
    weight = _weight(packed, scale, in_features)
    plan = plan_input_grad(dy.shape[0], packed.shape[0], in_features, dy.dtype, dy.device)
    if plan.path == "reference":
        return input_grad_reference(dy, weight)
    return triton_linear.input_grad(dy.contiguous(), weight, plan).to(dy.dtype)


@_input_grad.register_fake
def _input_grad_fake(dy, packed, scale, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("ternary_flux::linear_scale_grad", mutates_args=())
def _scale_grad(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    in_features: int,
    dy: Tensor,
    act_bits: int,
    codes: Tensor | None,
    token_scale: Tensor | None,
) -> Tensor:
    """d scale [N] (float32) = sum over tokens of dy * (x T^T), x [M, K] and dy [M, N]."""
    weight = _weight(packed, scale, in_features)
    plan = plan_scale_grad(x.shape[0], packed.shape[0], in_features, x.dtype, act_bits, x.device)
    if plan.path == "reference":
        return scale_grad_reference(x, weight, dy, act_bits).float()
    c = _codes(codes, token_scale, in_features)
    return triton_linear.scale_grad(x, weight, dy.contiguous(), act_bits, plan, c)


@_scale_grad.register_fake
def _scale_grad_fake(x, packed, scale, in_features, dy, act_bits, codes, token_scale):
    return x.new_empty(packed.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scale, in_features, bias, down, up, lora_scale, act_bits, codes, token_scale = inputs
    ctx.save_for_backward(x, packed, scale, down, up, codes, token_scale)
    ctx.config = (in_features, lora_scale, act_bits)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy: Tensor):
    """Gradients of x, scale, bias and the LoRA factors; T is frozen. With 8-bit activations
    dx is straight-through (the gradient of the unrounded layer); d scale uses the codes."""
    x, packed, scale, down, up, codes, token_scale = ctx.saved_tensors
    in_features, lora_scale, act_bits = ctx.config
    need_x, _, need_scale, _, need_bias, need_down, need_up = ctx.needs_input_grad[:7]
    lead = dy.shape[:-1]
    dy = dy.reshape(-1, dy.shape[-1])
    x2d = x.reshape(-1, in_features)
    dx = d_scale = d_bias = d_down = d_up = None
    if need_x:
        dx = torch.ops.ternary_flux.linear_input_grad(dy, packed, scale, in_features)
        if down is not None:
            dx = dx + lora_scale * (dy @ up.to(dy.dtype)) @ down.to(dy.dtype)
        dx = dx.to(x.dtype).reshape(*lead, in_features)
    if need_scale:
        d_scale = torch.ops.ternary_flux.linear_scale_grad(
            x2d, packed, scale, in_features, dy, act_bits, codes, token_scale
        ).to(scale.dtype)
    if need_bias:
        d_bias = dy.float().sum(0).to(ctx.bias_dtype)
    if need_down or need_up:
        xd = F.linear(x2d, down.to(x.dtype))
        d_up = (lora_scale * dy.t() @ xd.to(dy.dtype)).to(up.dtype)
        d_down = (lora_scale * (dy @ up.to(dy.dtype)).t() @ x2d.to(dy.dtype)).to(down.dtype)
    return dx, None, d_scale, None, d_bias, d_down, d_up, None, None, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)


def _fp8_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token fp8 codes [..., K] and float32 scales [...] (kernels.reference.fp8_codes),
    for Inductor to fuse into x's producer."""
    codes, token_scale = fp8_codes(x)
    return codes, token_scale.squeeze(-1)


@torch.compiler.assume_constant_result
def _prequantize(device: torch.device, dtype: torch.dtype) -> bool:
    """Quantize before the op (compiled graphs on GPUs with fp8 tensor cores)."""
    from .device import fp8_tensor_cores

    return backend(device, dtype) == "triton" and fp8_tensor_cores(device)


def ternary_linear(
    x: Tensor,
    weight: TernaryWeight,
    bias: Tensor | None = None,
    lora: LoraBranch | None = None,
    act_bits: int = 16,
) -> Tensor:
    """y = (x T^T) * s + bias + lora.scale * (x down^T) up^T for x [..., K]; x's dtype.

    Differentiable in x, the scales, bias and the LoRA factors. ``act_bits=8`` rounds x per
    token to fp8 e4m3 before the ternary product (the LoRA branch sees x unrounded).
    """
    if x.shape[-1] != weight.in_features:
        raise ValueError(
            f"input has {x.shape[-1]} features, the layer expects {weight.in_features}"
        )
    down, up, lora_scale = (None, None, 0.0) if lora is None else lora
    inference = not (
        torch.is_grad_enabled() and _any_requires_grad(x, weight.scale, bias, down, up)
    )
    codes = token_scale = None
    if torch.compiler.is_compiling():
        if act_bits == 8 and _prequantize(x.device, x.dtype):
            codes, token_scale = _fp8_codes(x)
        k, n = weight.in_features, weight.out_features
        min_tokens = _dense_min_tokens(x.device, x.dtype, act_bits)
        dense = min_tokens >= 0 and dense_sizes_fit(n, k, act_bits)
        if inference and dense and x.numel() // k >= min_tokens:
            return _dense_in_graph(x, weight, bias, lora, act_bits, codes, token_scale)
    elif inference:
        # Eager inference: the op's own implementation, without the dispatcher's 6-20 us per
        # call (its autograd wrapper, schema checks); ~300 ternary layers run per step.
        return _linear_impl(
            x, weight.packed, weight.scale, weight.in_features, bias, down, up,
            float(lora_scale), act_bits, None, None,
        )  # fmt: skip
    return torch.ops.ternary_flux.linear(
        x, weight.packed, weight.scale, weight.in_features, bias, down, up, float(lora_scale),
        act_bits, codes, token_scale,
    )  # fmt: skip


@torch.compiler.assume_constant_result
def _dense_min_tokens(device: torch.device, dtype: torch.dtype, act_bits: int) -> int:
    return dense_min_tokens(device, dtype, act_bits)


def _dense_in_graph(x, weight, bias, lora, act_bits, codes, token_scale) -> Tensor:
    """The dense path in traceable ops (see the module docstring); bias and LoRA as there."""
    k = weight.in_features
    x2d = x.reshape(-1, k)
    t = unpack_2bit(weight.packed, k)
    if act_bits == 8:
        y = torch._scaled_mm(
            codes.reshape(-1, k),
            t.to(torch.bfloat16).to(torch.float8_e4m3fn).t(),  # Triton casts no int8 to fp8
            scale_a=token_scale.reshape(-1, 1),
            scale_b=weight.scale[None, :],
            bias=None if bias is None else bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
    else:
        w = (t.float() * weight.scale[:, None]).to(x.dtype)
        y = F.linear(x2d, w, None if bias is None else bias.to(x.dtype))
    if lora is not None:  # a low-rank branch: no fp32 [N, K] product per layer
        y = y + lora.scale * F.linear(F.linear(x2d, lora.down.to(x.dtype)), lora.up.to(x.dtype))
    return y.reshape(*x.shape[:-1], weight.out_features)


def _any_requires_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)
