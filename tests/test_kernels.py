"""The op's Triton paths and launchers against a float64 reference.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and these run the
kernels on the CPU through Triton's interpreter (small shapes), through the op with
``TERNARY_FLUX_BACKEND=triton``. On a GPU they run compiled.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_ternary_flux.kernels import plan, triton_launch, tuning
from comfyui_ternary_flux.kernels.device import fp8_tensor_cores, interpreting
from comfyui_ternary_flux.kernels.layout import pack_2bit
from comfyui_ternary_flux.kernels.op import ternary_linear
from comfyui_ternary_flux.kernels.reference import quantize_activations
from comfyui_ternary_flux.kernels.triton_linear import input_grad
from comfyui_ternary_flux.kernels.tuning import DxConfig, GemvConfig, MatmulConfig
from comfyui_ternary_flux.kernels.weight import LoraBranch, TernaryWeight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||out - ref|| / ||ref|| bounds: the output's own rounding dominates.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every product here runs the Triton paths (under the interpreter on a CPU)."""
    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "triton")
    monkeypatch.setattr(triton_launch, "_chosen", {})
    plan.clear_cache()
    yield
    plan.clear_cache()


def triton_linear(x, weight, scale, k, bias=None, down=None, up=None, lora_scale=1.0, act_bits=16):
    """The op on a packed weight (the Triton paths: see the triton_backend fixture)."""
    lora = None if down is None else LoraBranch(down, up, lora_scale)
    return ternary_linear(x, TernaryWeight(weight, scale, k), bias, lora, act_bits)


def family() -> str:
    return plan.family_of(torch.device(DEVICE))


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
    y = triton_linear(x, weight, scale, k, bias, down, up, 0.7, act_bits)
    assert y.shape == (2, m, n) and y.dtype == dtype
    ref = expected(x.reshape(-1, k), t, scale, bias, down, up, 0.7, act_bits).reshape(2, m, n)
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "config",
    [MatmulConfig(32, 16, 128, 1, 4, 1), MatmulConfig(16, 16, 256, 3, 4, 1)],
    ids=["one-pass", "split-k"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_writes_every_output(config, dtype):
    m, k, n = 18, 650, 37
    gen = torch.Generator().manual_seed(3)
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    down = (torch.randn(6, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    up = torch.randn(n, 6, generator=gen).to(dtype).to(DEVICE)
    xd = x @ down.t()
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    result = triton_launch.ternary_matmul(
        x, TernaryWeight(weight, scale, k), (config,), family(), bias=bias, lora=(xd, up, 0.5),
        out=out,
    )  # fmt: skip
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
def test_gemv_writes_every_output(config, dtype, rank):
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
    triton_launch.ternary_matmul(
        x, TernaryWeight(weight, scale, k), (config,), family(), bias=bias, lora=lora, out=out
    )
    ref = expected(x, t, scale, bias, down, up, 0.4)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.fixture
def dense_from_one_token(monkeypatch):
    """Make every token count take the dense-scratch forward path."""
    monkeypatch.setitem(tuning.DENSE_MIN_TOKENS, family(), 1)
    plan.clear_cache()


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
    y = triton_linear(x, weight, scale, k, bias, down, up, 0.6, act_bits)
    assert y.dtype == dtype
    ref = expected(x, t, scale, bias, down, up, 0.6, act_bits)
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_tensor_cores(torch.device("cuda"))),
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
    y = triton_linear(x, weight, scale, k, act_bits=8)
    accumulation = rel_err(y, expected(x, t, scale, act_bits=8))
    rounding = rel_err(expected(x, t, scale, act_bits=8), expected(x, t, scale))
    assert accumulation < 0.2 * rounding, (accumulation, rounding)


def test_input_grad_dense_scratch_path(dense_from_one_token):
    gen = torch.Generator().manual_seed(9)
    m, k, n = 5, 200, 48
    t, weight, scale = ternary_layer(n, k, gen)
    dy = torch.randn(m, n, generator=gen).to(torch.float16).to(DEVICE)
    dense = plan.plan_input_grad(m, n, k, dy.dtype, dy.device)
    assert dense.path == "dense"
    dx = input_grad(dy, TernaryWeight(weight, scale, k), dense)
    ref = dy.double().cpu() @ (t.double() * scale.double().cpu()[:, None])
    assert dx.dtype == torch.float16
    assert rel_err(dx, ref) < TOLERANCE[torch.float16]


def test_unpack_dense_merges_scale_and_lora():
    gen = torch.Generator().manual_seed(8)
    n, k, rank = 70, 300, 6
    t, weight, scale = ternary_layer(n, k, gen)
    up = torch.randn(n, rank, generator=gen).to(torch.bfloat16).to(DEVICE)
    down = torch.randn(rank, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    dense = triton_launch.unpack_dense(
        TernaryWeight(weight, scale, k), torch.bfloat16, lora=(up, down, 0.3)
    )
    ref = t.double() * scale.double().cpu()[:, None] + 0.3 * up.double().cpu() @ down.double().cpu()
    assert rel_err(dense, ref) < TOLERANCE[torch.bfloat16]
    codes = triton_launch.unpack_dense(
        TernaryWeight(weight, scale, k), torch.float8_e4m3fn, scaled=False
    )
    assert torch.equal(codes.float().cpu(), t.float())


def test_fp8_matmul_writes_every_output():
    gen = torch.Generator().manual_seed(4)
    m, k, n = 4, 390, 50
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    codes, token_scale = triton_launch.quantize_fp8(x)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    configs = plan.plan_linear(m, n, k, torch.bfloat16, 8, torch.device(DEVICE)).configs
    triton_launch.ternary_matmul(
        codes, TernaryWeight(weight, scale, k), configs, family(), token_scale=token_scale,
        out=out,
    )  # fmt: skip
    assert rel_err(out, expected(x, t, scale, act_bits=8)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("k", [200, 5000])
def test_quantize_is_bit_exact(monkeypatch, k):
    monkeypatch.setattr(triton_launch, "QUANT_MAX_ONE_PASS", 1024)  # 5000: the two-pass loop
    x = (torch.randn(3, k) * torch.tensor([[1e-3], [1.0], [300.0]])).to(DEVICE)
    x[1, 7] = 0.0
    codes, token_scale = triton_launch.quantize_fp8(x)
    ref_codes, ref_scale = quantize_activations(x.cpu())
    assert torch.equal(codes.float().cpu(), ref_codes)
    assert torch.equal(token_scale.cpu(), ref_scale[:, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 256, 64), (17, 300, 45)])
def test_input_grad_writes_every_output(dtype, m, k, n):
    config = DxConfig(128, 16, 32, 4, 1) if interpreting() else None
    configs = (
        (config,) if config else plan.plan_input_grad(m, n, k, dtype, torch.device(DEVICE)).configs
    )
    gen = torch.Generator().manual_seed(m + k)
    t, weight, scale = ternary_layer(n, k, gen)
    dy = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    out = torch.full((m, k), float("nan"), dtype=dtype, device=DEVICE)
    triton_launch.ternary_dx(dy, TernaryWeight(weight, scale, k), configs, family(), out=out)
    ref = dy.double().cpu() @ (t.double() * scale.double().cpu()[:, None])
    assert rel_err(out, ref) < TOLERANCE[dtype]


def float64_grads(x, t, scale, bias, down, up, lora_scale, act_bits, dy):
    """Gradients of the layer in float64 by plain autograd on the dense matrix. 8-bit: the
    forward sees the fp8-rounded x, dx is straight-through (the unrounded layer's)."""
    leaves = [v.double().cpu().clone().requires_grad_() for v in [x, scale, bias]]
    if down is not None:
        leaves += [down.double().cpu().clone().requires_grad_(), up.double().cpu().clone()]
        leaves[-1].requires_grad_()
    x64, s64, b64 = leaves[:3]
    xq = x64
    if act_bits == 8:
        codes, token_scale = quantize_activations(x.cpu())
        xq = x64 + ((codes.double() * token_scale.double()) - x64).detach()
    y = (xq @ t.double().t()) * s64 + b64
    if down is not None:
        y = y + lora_scale * (x64 @ leaves[3].t()) @ leaves[4].t()
    y.backward(dy.double().cpu())
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(
    "dtype,act_bits,rank",
    [
        (torch.bfloat16, 16, 4),
        (torch.float16, 16, 0),
        (torch.float32, 16, 3),
        (torch.bfloat16, 8, 2),
    ],
)
def test_backward_matches_float64(monkeypatch, backend, dtype, act_bits, rank):
    monkeypatch.setenv("TERNARY_FLUX_BACKEND", backend)
    gen = torch.Generator().manual_seed(11 + rank)
    m, k, n = 6, 160, 36
    t, weight, scale = ternary_layer(n, k, gen)
    x = torch.randn(2, m // 2, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype) if rank else None
    up = torch.randn(n, rank, generator=gen).to(dtype) if rank else None
    dy = torch.randn(2, m // 2, n, generator=gen).to(dtype)
    device = DEVICE if backend == "triton" else "cpu"
    leaves = [v.to(device).clone().requires_grad_() for v in [x, scale.float(), bias]]
    leaves += [v.to(device).clone().requires_grad_() for v in ([down, up] if rank else [])]
    lora = leaves[3:] if rank else [None, None]
    y = triton_linear(leaves[0], weight.to(device), leaves[1], k, leaves[2], *lora, 0.8, act_bits)
    y.backward(dy.to(device=device, dtype=y.dtype))
    ref = float64_grads(x, t, scale, bias, down, up, 0.8, act_bits, dy)
    for name, leaf, want in zip(["x", "scale", "bias", "down", "up"], leaves, ref, strict=False):
        assert leaf.grad.dtype == (torch.float32 if name == "scale" else dtype), name
        assert rel_err(leaf.grad, want) < 3 * TOLERANCE[dtype], name


def test_backend_choice(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    t, weight, scale = ternary_layer(24, 100, gen)
    x = torch.randn(3, 100, generator=gen)
    monkeypatch.delenv("TERNARY_FLUX_BACKEND")
    cpu = torch.device("cpu")
    assert plan.plan_linear(3, 24, 100, torch.float32, 16, cpu).path == "reference"
    assert plan.backend(torch.device(DEVICE), torch.float64) == "reference"  # any device
    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "reference")
    assert plan.backend(torch.device(DEVICE), torch.bfloat16) == "reference"
    y = triton_linear(x, weight.cpu(), scale.cpu(), 100)
    assert rel_err(y, expected(x, t, scale)) < TOLERANCE[torch.float32]
    monkeypatch.setenv("TERNARY_FLUX_BACKEND", "fast")
    with pytest.raises(ValueError, match="TERNARY_FLUX_BACKEND"):
        plan.backend(cpu, torch.float32)


def test_gpus_without_tables_get_the_conservative_plan():
    assert tuning.gpu_family((10, 0)) is None and tuning.gpu_family((12, 0)) is None
    assert tuning.gpu_family((9, 0)) == "hopper" and tuning.gpu_family((8, 6)) == "ampere"
    gpu = torch.device("cuda", 0)
    untuned = plan._plan_for_family
    for m in (1, 16, 4096):
        assert untuned(m, 64, 128, torch.bfloat16, 16, gpu, None) == plan.Plan("dense", None)
        assert untuned(m, 64, 128, torch.float32, 16, gpu, None).path == "reference"
    assert untuned(16, 64, 120, torch.bfloat16, 8, gpu, None).path == "reference"  # K % 16


def test_float64_runs_the_reference_exactly():
    gen = torch.Generator().manual_seed(6)
    t, weight, scale = ternary_layer(8, 130, gen)
    x = torch.randn(2, 130, dtype=torch.float64)
    y = triton_linear(x, weight.cpu(), scale.cpu().double(), 130)
    torch.testing.assert_close(y, expected(x, t, scale), rtol=1e-12, atol=1e-12)


def test_bad_inputs_have_clear_errors():
    gen = torch.Generator().manual_seed(6)
    _, weight, scale = ternary_layer(8, 130, gen)
    x = torch.randn(2, 130).to(DEVICE)
    with pytest.raises(ValueError, match="does not fit in_features"):
        triton_linear(x[:, :120], weight, scale, 120)
    with pytest.raises(ValueError, match="input has 120 features, the layer expects 130"):
        triton_linear(x[:, :120], weight, scale, 130)
    with pytest.raises(ValueError, match="act_bits"):
        triton_linear(x, weight, scale, 130, act_bits=4)


def test_autotuning_waits_for_queued_work_before_timing_on_its_own_stream(monkeypatch):
    """Candidates are timed on triton's side stream and write the caller's output, whose
    memory may still be in use by work queued on the caller's stream: sync first."""
    events = []
    monkeypatch.setattr(triton_launch.torch.cuda, "synchronize", lambda *a: events.append("sync"))

    def timed(fn, **kwargs):
        events.append("time")
        fn()
        return float(len(events))  # later candidates look slower: the first one wins

    monkeypatch.setattr(triton_launch.triton.testing, "do_bench_cudagraph", timed)
    launched = []
    chosen = triton_launch._choose(("key",), ("a", "b"), launched.append)
    assert chosen == "a" and launched == ["a", "b"]
    assert events[0] == "sync" and events.count("time") == 2


@pytest.mark.parametrize("m,k,n", [(3, 200, 45), (1, 384, 70)])
def test_quantize_and_unpack_in_one_launch_equals_the_two_kernels(m, k, n):
    gen = torch.Generator().manual_seed(m + k)
    t, weight, scale = ternary_layer(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    w = TernaryWeight(weight, scale, k)
    q, token_scale, codes = triton_launch.quantize_and_unpack(x, w)
    ref_q, ref_scale = triton_launch.quantize_fp8(x)
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(token_scale, ref_scale)
    assert torch.equal(codes.float().cpu(), t.float())


def test_the_compiler_s_dense_rule_agrees_with_the_plan(monkeypatch):
    """kernels.plan.dense_min_tokens (asked at trace time) and plan_linear pick the dense path
    for the same token counts."""
    device = torch.device(DEVICE)
    for dtype, act_bits in ((torch.bfloat16, 16), (torch.bfloat16, 8), (torch.float32, 16)):
        for m in (1, 16, 64, 65, 4096):
            path = plan.plan_linear(m, 64, 256, dtype, act_bits, device).path
            threshold = plan.dense_min_tokens(device, dtype, act_bits)
            assert (path == "dense") == (threshold >= 0 and m >= threshold), (dtype, act_bits, m)
