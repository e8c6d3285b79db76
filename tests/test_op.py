"""kernels/op.py: the registered op is well formed and torch.compile traces ternary models
without a graph break, matching eager execution."""

from __future__ import annotations

import pytest
import torch

from comfyui_ternary_flux.kernels import plan
from comfyui_ternary_flux.kernels.layout import pack_2bit
from comfyui_ternary_flux.kernels.op import ternary_linear
from comfyui_ternary_flux.kernels.weight import LoraBranch, TernaryWeight
from comfyui_ternary_flux.models.flux1 import FluxConfig, random_flux_state_dict
from comfyui_ternary_flux.models.flux1_torch import flux_from_state_dict, quantize_model
from comfyui_ternary_flux.ternary.module import TernaryLinear

SMALL_FLUX = FluxConfig(
    hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, in_channels=64,
    context_in_dim=32, vec_in_dim=16, mlp_ratio=2.0,
)  # fmt: skip


def op_args(gen, m=5, k=160, n=24, rank=3, dtype=torch.float32, grad=False):
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) + 0.5).requires_grad_(grad)
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_(grad)
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_(grad)
    down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype).requires_grad_(grad)
    up = torch.randn(n, rank, generator=gen).to(dtype).requires_grad_(grad)
    return x, pack_2bit(t), scale, k, bias, down, up, 0.7


@pytest.mark.parametrize("act_bits", [16, 8])
def test_op_passes_torch_library_checks(act_bits):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    gen = torch.Generator().manual_seed(0)
    x, packed, scale, k, bias, down, up, lora_scale = op_args(gen, grad=True)
    args = (x, packed, scale, k, bias, down, up, lora_scale, act_bits, None, None)
    torch.library.opcheck(torch.ops.ternary_flux.linear.default, args)


def compiled_matches_eager(module, args, grads=False):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.set_grad_enabled(grads):
        eager = module(*args)
        out = compiled(*args)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    err = float((out.double() - eager.double()).norm() / eager.double().norm())
    return err, eager, out


@pytest.mark.parametrize("act_bits", [16, 8])
def test_compiled_tiny_flux_matches_eager(act_bits):
    """The whole ternary FLUX (with a LoRA on every ternary layer) in one graph on the CPU."""
    state = random_flux_state_dict(SMALL_FLUX, seed=1)
    model = quantize_model(flux_from_state_dict(state, torch.float32), lora_rank=4).eval()
    for layer in model.modules():
        if isinstance(layer, TernaryLinear):
            layer.act_bits = act_bits
    gen = torch.Generator().manual_seed(2)
    args = (
        torch.randn(1, 16, 8, 8, generator=gen),
        torch.tensor([0.6]),
        torch.randn(1, 5, 32, generator=gen),
        torch.randn(1, 16, generator=gen),
        torch.tensor([3.5]),
    )
    err, _, _ = compiled_matches_eager(model, args)
    assert err < 1e-5


def test_compiled_training_step_matches_eager():
    """Forward and backward of a ternary layer in one compiled graph: the backward products
    are registered ops too, and the gradients equal eager ones."""
    gen = torch.Generator().manual_seed(3)
    layer = TernaryLinear.from_dense(torch.randn(24, 160, generator=gen), torch.randn(24),
                                     lora_rank=3, dtype=torch.float32)  # fmt: skip
    x = torch.randn(2, 5, 160, generator=gen, requires_grad=True)

    def step(inp):
        return (layer(inp) ** 2).sum()

    eager_grads = torch.autograd.grad(step(x), [x, layer.weight_scale, layer.lora_up])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(x), [x, layer.weight_scale, layer.lora_up])
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_a8_quantizes_in_the_graph(monkeypatch):
    """On the Triton paths (here the interpreter) a compiled A8 layer makes the fp8 codes in
    plain torch ops before the op, for Inductor to fuse: the same result as eager, where the
    Triton quantizer runs inside the op."""
    from comfyui_ternary_flux.kernels import op

    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan.clear_cache()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(-1, 2, (48, 256), generator=gen, dtype=torch.int8)
    weight = TernaryWeight(
        pack_2bit(t).to(device), (torch.rand(48, generator=gen) + 0.5).to(device), 256
    )
    lora = LoraBranch(torch.randn(2, 256, generator=gen).bfloat16().to(device),
                      torch.randn(48, 2, generator=gen).bfloat16().to(device), 0.5)  # fmt: skip
    x = torch.randn(3, 256, generator=gen).bfloat16().to(device)
    seen = []
    original = op._fp8_codes
    monkeypatch.setattr(op, "_fp8_codes", lambda v: seen.append(v.shape) or original(v))

    def layer(inp):
        return ternary_linear(inp * 2.0, weight, None, lora, act_bits=8)

    err, eager, _ = compiled_matches_eager(layer, (x,))
    assert seen, "the compiled graph did not quantize before the op"
    assert err < 1e-6, err  # the same fp8 codes: equal up to the order of bf16 sums
    plan.clear_cache()


@pytest.mark.parametrize("act_bits", [16, 8])
def test_compiled_dense_plan_is_traced_ops_with_the_dense_path_s_arithmetic(monkeypatch, act_bits):
    """Compiled inference on the dense plan writes the product in traceable ops (unpack as
    torch bit operations, cuBLAS): the same result as the eager Triton dense path."""
    from comfyui_ternary_flux.kernels import op, tuning

    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setitem(tuning.DENSE_MIN_TOKENS, plan.family_of(torch.device(device)), 1)
    plan.clear_cache()
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(-1, 2, (48, 256), generator=gen, dtype=torch.int8)
    scale = (torch.rand(48, generator=gen) + 0.5).to(device)
    weight = TernaryWeight(pack_2bit(t).to(device), scale, 256)
    lora = LoraBranch(torch.randn(2, 256, generator=gen).bfloat16().to(device),
                      torch.randn(48, 2, generator=gen).bfloat16().to(device), 0.5)  # fmt: skip
    bias = torch.randn(48, generator=gen).bfloat16().to(device)
    x = torch.randn(2, 3, 256, generator=gen).bfloat16().to(device)
    traced = []
    original = op._dense_in_graph
    monkeypatch.setattr(op, "_dense_in_graph", lambda *a: traced.append(1) or original(*a))

    def layer(inp):
        return ternary_linear(inp, weight, bias, lora, act_bits=act_bits)

    with torch.no_grad():
        err, _, _ = compiled_matches_eager(layer, (x,))
    assert traced, "the compiled graph did not take the traced dense path"
    assert err < 1e-2, err  # bf16 outputs (the eager path rounds the merged weight likewise)
    plan.clear_cache()
