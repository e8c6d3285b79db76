"""Triton kernels against a float64 reference.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and these run the
kernels on the CPU through Triton's interpreter (small shapes). On a GPU they run compiled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_ternary_flux.kernels import dispatch, triton_ops
from comfyui_ternary_flux.kernels.reference import (
    quantize_activations,
    ternary_linear_reference,
)
from comfyui_ternary_flux.kernels.triton_linear import input_grad, ternary_linear_triton
from comfyui_ternary_flux.kernels.tuning import DxConfig, GemvConfig, MatmulConfig, m_bucket
from comfyui_ternary_flux.ternary.packing import pack_2bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||out - ref|| / ||ref|| bounds: the output's own rounding dominates.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 bit patterns as integers in tl.dot; feed
    it float32 values instead (the compiled kernels are not affected)."""
    if not triton_ops.interpreting():
        return
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype.scalar.name != "bf16":
            return handle
        values = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(values, interpreter.tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_float32(a), as_float32(b), d, input_precision, None)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def fresh_configs(monkeypatch):
    """Forget chosen configs so a test can swap in its own."""
    monkeypatch.setattr(triton_ops, "_chosen", {})
    return monkeypatch


def ternary_layer(n: int, k: int, gen: torch.Generator):
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) + 0.5
    return t, pack_2bit(t).to(DEVICE), scale.to(DEVICE)


def expected(x, t, scale, bias=None, down=None, up=None, lora_scale=1.0, act_bits=16):
    """float64 y from the unpacked ternary matrix (8-bit: the reference's fp8 codes)."""
    x64 = x.double().cpu()
    if act_bits == 8:
        codes, token_scale = quantize_activations(x.cpu())
        y = (codes.double() @ t.double().t()) * token_scale.double()
    else:
        y = x64 @ t.double().t()
    y = y * scale.double().cpu()
    if bias is not None:
        y = y + bias.double().cpu()
    if down is not None:
        y = y + lora_scale * (x64 @ down.double().cpu().t()) @ up.double().cpu().t()
    return y


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm()).item()


FORWARD_CASES = [
    # M, K, N, dtype, bias, lora rank, act_bits
    (1, 256, 32, torch.bfloat16, True, 0, 16),
    (1, 200, 45, torch.float16, False, 8, 16),
    (7, 131, 33, torch.bfloat16, True, 5, 16),
    (20, 384, 64, torch.float16, True, 0, 16),
    (3, 77, 19, torch.float32, True, 4, 16),
    (1, 300, 70, torch.float32, False, 0, 16),
    (5, 256, 40, torch.bfloat16, True, 16, 8),
    (1, 129, 31, torch.float16, False, 0, 8),
    (9, 250, 48, torch.float32, True, 3, 8),
]


@pytest.mark.parametrize("m,k,n,dtype,has_bias,rank,act_bits", FORWARD_CASES)
def test_forward_matches_float64(m, k, n, dtype, has_bias, rank, act_bits):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(2, m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if has_bias else None
    down = up = None
    if rank:
        down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
        up = torch.randn(n, rank, generator=gen).to(dtype).to(DEVICE)
    y = ternary_linear_triton(x, weight, scale, k, bias, down, up, 0.7, act_bits)
    assert y.shape == (2, m, n) and y.dtype == dtype
    ref = expected(x.reshape(-1, k), t, scale, bias, down, up, 0.7, act_bits).reshape(2, m, n)
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "config",
    [MatmulConfig(32, 16, 128, 1, 4, 1), MatmulConfig(16, 16, 256, 3, 4, 1)],
    ids=["one-pass", "split-k"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_writes_every_output(fresh_configs, config, dtype):
    m, k, n = 18, 650, 37
    if triton_ops.interpreting():
        fresh_configs.setattr(triton_ops, "INTERPRETER_MATMUL", config)
    else:
        family = triton_ops._family(torch.device(DEVICE))
        fresh_configs.setitem(triton_ops.MATMUL_TABLES[family]["a16"], m_bucket(m), [config])
    gen = torch.Generator().manual_seed(3)
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    down = (torch.randn(6, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    up = torch.randn(n, 6, generator=gen).to(dtype).to(DEVICE)
    xd = x @ down.t()
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    result = triton_ops.ternary_matmul(x, weight, scale, k, bias=bias, lora=(xd, up, 0.5), out=out)
    assert result.data_ptr() == out.data_ptr()
    ref = expected(x, t, scale, bias, down, up, 0.5)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "config",
    [
        GemvConfig(16, 64, 1, 1),
        GemvConfig(16, 128, 1, 4),  # 192-byte rows: the last step is masked
        GemvConfig(16, 32, 3, 4),
        GemvConfig(64, 64, 2, 4),
    ],
    ids=["one-pass", "masked-tail", "split-k", "wide"],
)
@pytest.mark.parametrize(
    "dtype,rank", [(torch.bfloat16, 0), (torch.bfloat16, 5), (torch.float16, 3)]
)
def test_gemv_writes_every_output(fresh_configs, config, dtype, rank):
    if triton_ops.interpreting():
        fresh_configs.setattr(triton_ops, "INTERPRETER_GEMV", config)
    else:
        family = triton_ops._family(torch.device(DEVICE))
        fresh_configs.setitem(triton_ops.GEMV_TABLES, family, [config])
    gen = torch.Generator().manual_seed(20 + rank)
    m, k, n = 1, 700, 45
    t, weight, scale = ternary_layer(n, k, gen)
    # large activations with a nonzero mean: accumulation must stay fp32-precise
    x = (torch.randn(m, k, generator=gen) * 300 + 100).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    lora, down, up = None, None, None
    if rank:
        down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
        up = torch.randn(n, rank, generator=gen).to(dtype).to(DEVICE)
        lora = (x @ down.t(), up, 0.4)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    triton_ops.ternary_matmul(x, weight, scale, k, bias=bias, lora=lora, out=out)
    ref = expected(x, t, scale, bias, down, up, 0.4)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.fixture
def dense_from_one_token(monkeypatch):
    """Make every token count take the dense-scratch forward path."""
    family = triton_ops._family(torch.device(DEVICE))
    monkeypatch.setitem(triton_ops.DENSE_MIN_TOKENS, family, 1)


@pytest.mark.parametrize(
    "m,k,n,dtype,rank,act_bits",
    [
        (3, 200, 45, torch.bfloat16, 0, 16),
        (6, 131, 33, torch.float16, 5, 16),
        (4, 256, 48, torch.bfloat16, 16, 8),
        (5, 160, 32, torch.bfloat16, 0, 8),
        (3, 129, 32, torch.bfloat16, 0, 8),  # K % 16 != 0: fp8 cuBLAS cannot, fused kernel
    ],
)
def test_dense_scratch_path_matches_float64(dense_from_one_token, m, k, n, dtype, rank, act_bits):
    gen = torch.Generator().manual_seed(m * 100 + k)
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    down = up = None
    if rank:
        down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
        up = torch.randn(n, rank, generator=gen).to(dtype).to(DEVICE)
    y = ternary_linear_triton(x, weight, scale, k, bias, down, up, 0.6, act_bits)
    assert y.dtype == dtype
    ref = expected(x, t, scale, bias, down, up, 0.6, act_bits)
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_ops.fp8_tensor_cores(torch.device("cuda"))),
    reason="SKIPPED: the fp8 cuBLAS path needs a GPU with fp8 tensor cores (sm_89+)",
)
def test_fp8_fast_accumulation_is_far_below_fp8_rounding(dense_from_one_token):
    """The A8 dense path accumulates in the fp8 tensor cores' fast mode; at FLUX's longest K
    its error on its own fp8 codes (accumulation plus bf16 output rounding) must stay small
    against the activation rounding that A8 introduces anyway."""
    gen = torch.Generator().manual_seed(15)
    m, k, n = 64, 15360, 256
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    x[:, ::97] *= 20  # outlier channels, as in real activations
    x = x.to(torch.bfloat16).to(DEVICE)
    y = ternary_linear_triton(x, weight, scale, k, act_bits=8)
    accumulation = rel_err(y, expected(x, t, scale, act_bits=8))
    rounding = rel_err(expected(x, t, scale, act_bits=8), expected(x, t, scale))
    assert accumulation < 0.2 * rounding, (accumulation, rounding)


def test_input_grad_dense_scratch_path(dense_from_one_token):
    gen = torch.Generator().manual_seed(9)
    m, k, n = 5, 200, 48
    t, weight, scale = ternary_layer(n, k, gen)
    dy = torch.randn(m, n, generator=gen).to(torch.float16).to(DEVICE)
    dx = input_grad(dy, weight, scale, k)
    ref = dy.double().cpu() @ (t.double() * scale.double().cpu()[:, None])
    assert dx.dtype == torch.float16
    assert rel_err(dx, ref) < TOLERANCE[torch.float16]


def test_unpack_dense_merges_scale_and_lora():
    gen = torch.Generator().manual_seed(8)
    n, k, rank = 70, 300, 6
    t, weight, scale = ternary_layer(n, k, gen)
    up = torch.randn(n, rank, generator=gen).to(torch.bfloat16).to(DEVICE)
    down = torch.randn(rank, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    dense = triton_ops.unpack_dense(weight, k, torch.bfloat16, scale, (up, down, 0.3))
    ref = t.double() * scale.double().cpu()[:, None] + 0.3 * up.double().cpu() @ down.double().cpu()
    assert rel_err(dense, ref) < TOLERANCE[torch.bfloat16]
    codes = triton_ops.unpack_dense(weight, k, torch.float8_e4m3fn)
    assert torch.equal(codes.float().cpu(), t.float())


def test_fp8_matmul_writes_every_output():
    gen = torch.Generator().manual_seed(4)
    m, k, n = 4, 390, 50
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    codes, token_scale = triton_ops.quantize_fp8(x)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    triton_ops.ternary_matmul(codes, weight, scale, k, token_scale=token_scale, out=out)
    assert rel_err(out, expected(x, t, scale, act_bits=8)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("k", [200, 5000])
def test_quantize_is_bit_exact(monkeypatch, k):
    monkeypatch.setattr(triton_ops, "QUANT_MAX_ONE_PASS", 1024)  # 5000 takes the two-pass loop
    x = (torch.randn(3, k) * torch.tensor([[1e-3], [1.0], [300.0]])).to(DEVICE)
    x[1, 7] = 0.0
    codes, token_scale = triton_ops.quantize_fp8(x)
    ref_codes, ref_scale = quantize_activations(x.cpu())
    assert torch.equal(codes.float().cpu(), ref_codes)
    assert torch.equal(token_scale.cpu(), ref_scale[:, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 256, 64), (17, 300, 45)])
def test_input_grad_writes_every_output(fresh_configs, dtype, m, k, n):
    if triton_ops.interpreting():
        fresh_configs.setattr(triton_ops, "INTERPRETER_DX", DxConfig(128, 16, 32, 4, 1))
    gen = torch.Generator().manual_seed(m + k)
    t, weight, scale = ternary_layer(n, k, gen)
    dy = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    out = torch.full((m, k), float("nan"), dtype=dtype, device=DEVICE)
    triton_ops.ternary_dx(dy, weight, scale, k, out=out)
    ref = dy.double().cpu() @ (t.double() * scale.double().cpu()[:, None])
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "dtype,act_bits,rank",
    [
        (torch.bfloat16, 16, 4),
        (torch.float16, 16, 0),
        (torch.float32, 16, 3),
        (torch.bfloat16, 8, 2),
    ],
)
def test_backward_matches_float64(dtype, act_bits, rank):
    gen = torch.Generator().manual_seed(11 + rank)
    m, k, n = 6, 160, 36
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype) if rank else None
    up = torch.randn(n, rank, generator=gen).to(dtype) if rank else None
    dy = torch.randn(m, n, generator=gen).to(dtype)

    def grads(device, cast, fn):
        leaves = [v.to(device=device, dtype=cast or v.dtype).clone().requires_grad_() for v in
                  [x, scale.float(), bias] + ([down, up] if rank else [])]  # fmt: skip
        lora = leaves[3:] if rank else [None, None]
        y = fn(leaves[0], weight.to(device), leaves[1], k, leaves[2], *lora, 0.8, act_bits)
        y.backward(dy.to(device=device, dtype=y.dtype))
        return [leaf.grad for leaf in leaves]

    ours = grads(DEVICE, None, ternary_linear_triton)
    ref = grads("cpu", torch.float64, ternary_linear_reference)
    if act_bits == 8:  # dx is straight-through: the gradient of the unquantized layer
        ref[0] = grads("cpu", torch.float64, _unquantized(ternary_linear_reference))[0]
    for name, got, want in zip(["x", "scale", "bias", "down", "up"], ours, ref, strict=False):
        assert got.dtype == (torch.float32 if name == "scale" else dtype), name
        assert rel_err(got, want) < 3 * TOLERANCE[dtype], name


def _unquantized(fn):
    return lambda *args: fn(*args[:-1], 16)


def test_dispatch_uses_reference_off_gpu(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    t, weight, scale = ternary_layer(24, 100, gen)
    x = torch.randn(3, 100, generator=gen)
    if DEVICE == "cpu":
        assert dispatch.backend_for(x) == "reference"
    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "reference")
    assert dispatch.backend_for(x.to(DEVICE)) == "reference"
    y = dispatch.ternary_linear(x, weight.cpu(), scale.cpu(), 100)
    assert rel_err(y, expected(x, t, scale)) < TOLERANCE[torch.float32]
    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "fast")
    with pytest.raises(ValueError, match="TERNARY_FLUX_BACKEND"):
        dispatch.backend_for(x)


def test_bad_inputs_have_clear_errors():
    gen = torch.Generator().manual_seed(6)
    _, weight, scale = ternary_layer(8, 130, gen)
    x = torch.randn(2, 130).to(DEVICE)
    with pytest.raises(ValueError, match="does not fit in_features"):
        ternary_linear_triton(x[:, :120], weight, scale, 120)
    with pytest.raises(ValueError, match="act_bits"):
        ternary_linear_triton(x, weight, scale, 130, act_bits=4)
    with pytest.raises(TypeError, match="float64"):
        ternary_linear_triton(x.double(), weight, scale, 130)


def test_autotuning_waits_for_queued_work_before_timing_on_its_own_stream(monkeypatch):
    """Candidates are timed on triton's side stream and write the caller's output, whose
    memory may still be in use by work queued on the caller's stream: sync first."""
    events = []
    monkeypatch.setattr(triton_ops, "_chosen", {})
    monkeypatch.setattr(triton_ops.torch.cuda, "synchronize", lambda *a: events.append("sync"))

    def timed(fn, **kwargs):
        events.append("time")
        fn()
        return float(len(events))  # later candidates look slower: the first one wins

    monkeypatch.setattr(triton_ops.triton.testing, "do_bench_cudagraph", timed)
    launched = []
    chosen = triton_ops._choose(("key",), ["a", "b"], launched.append)
    assert chosen == "a" and launched == ["a", "b"]
    assert events[0] == "sync" and events.count("time") == 2
