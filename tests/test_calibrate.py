"""ternary/calibrate.py and quantize_layer's calibrated path, against float64 references."""

from __future__ import annotations

import pytest
import torch

from comfyui_ternary_flux.ternary.calibrate import (
    DEFAULT_MULTIPLIERS,
    CalibrationError,
    CalibrationOptions,
    HessianAccumulator,
    _gptq_codes,
    _inverse_cholesky_upper,
    accumulate_hessian,
    damped_hessian,
    gptq_ternarize,
    output_error,
    refit_scale,
    row_output_error,
    weighted_lora,
)
from comfyui_ternary_flux.ternary.packing import unpack
from comfyui_ternary_flux.ternary.quantize import (
    dequantize,
    quantize_layer,
    residual_factors,
    ternarize,
)


def activations(m: int, k: int, seed: int, alpha: float = 0.6, outliers: int = 2) -> torch.Tensor:
    """Correlated, anisotropic float64 activations with a mean and a few x20 outlier channels
    (the shape of a transformer's linear inputs)."""
    g = torch.Generator().manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    sigma = (1.0 + torch.arange(k, dtype=torch.float64)) ** -alpha
    x = torch.randn(m, k, generator=g, dtype=torch.float64) @ (sigma[:, None] * v.T)
    x = x + 0.3 * torch.randn(k, generator=g, dtype=torch.float64)
    x[:, torch.randperm(k, generator=g)[:outliers]] *= 20
    return x


def weights(n: int, k: int, seed: int, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if heavy:  # Student-t, 3 degrees of freedom: heavier tails, as trained weights
        w = w / (torch.randn(3, n, k, generator=g).pow(2).sum(0) / 3).sqrt()
    return w / k**0.5


CASES = [(48, 96, 1, False), (64, 160, 2, True)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"N{c[0]}-K{c[1]}-heavy{c[3]}")
def case(request):
    n, k, seed, heavy = request.param
    x = activations(4 * k, k, seed)
    return weights(n, k, seed, heavy), x, x.T @ x


def dense(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return t.double() * s.double()[:, None]


# --------------------------------------------------------------------------- Hessian


def test_hessian_streams_to_the_float64_reference():
    x = activations(1000, 48, 0).float()
    acc = HessianAccumulator(48, chunk=128)
    for part in (x[:300].reshape(3, 100, 48), x[300:301], x[301:]):
        acc.add(part)
    ref = x.double().T @ x.double()
    assert acc.hessian.dtype == torch.float64 and acc.tokens == 1000
    torch.testing.assert_close(
        acc.hessian, ref, rtol=1e-5, atol=1e-6 * float(ref.diagonal().mean())
    )
    torch.testing.assert_close(
        accumulate_hessian([x[:10], x[10:]]), acc.hessian, rtol=1e-5, atol=1e-3
    )
    with pytest.raises(CalibrationError, match="width 47, expected 48"):
        acc.add(x[:, :47])


# --------------------------------------------------------------------------- GPTQ


def test_identity_hessian_gives_round_to_nearest_codes_and_the_lsq_scale():
    """H = I: no error feedback (U is diagonal), so the codes are round to nearest; the refit
    scale t.w / t.t is then the pack's lsq rule (mean |w| over the non-zeros)."""
    w = weights(64, 256, 5, heavy=True)
    t_ref, s_ref = ternarize(w, "lsq")
    eye = torch.eye(256, dtype=torch.float64)
    for act_order in (True, False):
        options = CalibrationOptions(act_order=act_order, guard=False, multipliers=(1.0,))
        t, s = gptq_ternarize(w, eye, options)
        assert torch.equal(t, t_ref)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)


def _reference_obq(w: torch.Tensor, s: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """Textbook sequential OBQ / GPTQ in float64 with explicit inverse-Hessian downdates."""
    w, hinv = w.clone(), hinv.clone()
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = (w[:, j] / s).round().clamp(-1, 1)
        err = (w[:, j] - q[:, j] * s) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


def test_blocked_cholesky_sweep_equals_textbook_obq():
    k = 96
    x = activations(400, k, 8)
    h, _ = damped_hessian(x.T @ x, 0.01)
    w = weights(40, k, 8).double()
    s = w.abs().mean(1) * 1.3
    upper = _inverse_cholesky_upper(h.clone())
    ref = _reference_obq(w, s, torch.linalg.inv(h))
    for block in (7, 32, 128):
        q = _gptq_codes(w, s, upper, None, block)
        assert torch.equal(q.double(), ref), block


def test_gptq_output_error_is_below_absmean_on_the_calibration_set(case):
    w, x, h = case
    t_abs, s_abs = ternarize(w)
    absmean = output_error(w, dense(t_abs, s_abs), h)
    for options in (
        CalibrationOptions(guard=False, multipliers=(1.0,)),
        CalibrationOptions(guard=False, act_order=False),
        CalibrationOptions(),
    ):
        t, s = gptq_ternarize(w, h, options)
        assert t.dtype == torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1}
        assert output_error(w, dense(t, s), h) < 0.8 * absmean, options
    # the Hessian form is the output error on the tokens themselves
    e = w.double() - dense(t, s)
    direct = float((x @ e.T).norm() / (x @ w.double().T).norm())
    assert direct == pytest.approx(output_error(w, dense(t, s), h), rel=1e-9)


def test_guard_makes_every_row_at_least_as_good_as_round_to_nearest(case):
    w, _, h = case
    t_rtn, s_rtn = ternarize(w)
    reference = row_output_error(w, dense(t_rtn, refit_scale(w, t_rtn, h)), h)
    t, s = gptq_ternarize(w, h, CalibrationOptions(damp=1.0))  # weak GPTQ: the guard matters
    assert bool((row_output_error(w, dense(t, s), h) <= reference * (1 + 1e-9)).all())


def test_refit_scale_is_the_closed_form_optimum(case):
    w, x, h = case
    t, _ = gptq_ternarize(w, h, CalibrationOptions(guard=False))
    s = refit_scale(w, t, h)
    xt, xw = x @ t.double().T, x @ w.double().T  # float64 from the tokens: <Xt, Xw> / <Xt, Xt>
    torch.testing.assert_close(s.double(), (xt * xw).sum(0) / (xt * xt).sum(0), rtol=1e-5, atol=0)
    best = row_output_error(w, dense(t, s), h)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert bool((row_output_error(w, dense(t, s * factor), h) > best).all()), factor


def test_scale_search_is_never_worse_than_the_absmean_start_per_row(case):
    w, _, h = case
    assert 1.0 in DEFAULT_MULTIPLIERS
    one = gptq_ternarize(w, h, CalibrationOptions(guard=False, multipliers=(1.0,)))
    searched = gptq_ternarize(w, h, CalibrationOptions(guard=False))
    e_one, e_search = (row_output_error(w, dense(*ts), h) for ts in (one, searched))
    assert bool((e_search <= e_one * (1 + 1e-9)).all())


def test_hessian_scale_does_not_matter_and_dead_inputs_get_zero_codes():
    x = activations(512, 128, 9)
    x[:, [3, 77]] = 0.0  # inputs that never fire
    h = x.T @ x
    w = weights(48, 128, 9)
    t1, s1 = gptq_ternarize(w, h)
    t2, s2 = gptq_ternarize(w, h * 1e6)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=0)
    assert bool((t1[:, [3, 77]] == 0).all()) and bool(torch.isfinite(s1).all())


def test_bad_hessians_are_refused_by_name():
    w = weights(8, 16, 0)
    with pytest.raises(CalibrationError, match=r"shape \[15, 15\], expected \[16, 16\]"):
        gptq_ternarize(w, torch.eye(15, dtype=torch.float64))
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        gptq_ternarize(w, torch.full((16, 16), float("nan"), dtype=torch.float64))
    with pytest.raises(CalibrationError, match="never reached the layer"):
        gptq_ternarize(w, torch.zeros(16, 16, dtype=torch.float64))
    with pytest.raises(CalibrationError, match="damp"):
        CalibrationOptions(damp=-1.0)


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("shape", [(72, 160), (160, 72)])  # both sides of the eigenproblem
def test_weighted_lora_with_identity_hessian_is_the_plain_residual_svd(shape):
    n, k = shape
    w = weights(n, k, 10, heavy=True)
    t, s = ternarize(w)
    e = w.double() - dense(t, s)
    u, sv, vh = torch.linalg.svd(e, full_matrices=False)
    r = 12
    for damp in (0.0, 0.05):  # a damped identity is still isotropic
        down, up = weighted_lora(e, torch.eye(k, dtype=torch.float64), r, damp=damp)
        torch.testing.assert_close(
            up.double() @ down.double(), (u[:, :r] * sv[:r]) @ vh[:r], rtol=0, atol=1e-6
        )
        # sqrt(S) on each side, as the pack's residual_lora, up to the sign of each component
        ref_down, ref_up = sv[:r, None].sqrt() * vh[:r], u[:, :r] * sv[:r].sqrt()
        sign = torch.sign((down.double() * ref_down).sum(1))
        torch.testing.assert_close(down.double() * sign[:, None], ref_down, rtol=0, atol=1e-5)
        torch.testing.assert_close(up.double() * sign[None, :], ref_up, rtol=0, atol=1e-5)
    # the pack's plain LoRA is a randomized SVD: at best the same residual, never better
    plain_down, plain_up = residual_factors(e.float(), r)
    plain = (e - (plain_up @ plain_down).double()).norm()
    assert (e - up.double() @ down.double()).norm() <= plain * (1 + 1e-6)


def test_weighted_lora_reaches_the_weighted_svd_optimum(case):
    w, _, h = case
    t, s = gptq_ternarize(w, h)
    e = w.double() - dense(t, s)
    tail = torch.linalg.svdvals(e @ torch.linalg.cholesky(h)).pow(2)  # Eckart-Young under H
    for r in (1, 4, 16):
        for exact_up_to in (4096, 0):  # exact eigendecomposition, then subspace iteration
            down, up = weighted_lora(e, h, r, damp=0.0, exact_up_to=exact_up_to)
            got = float(row_output_error(e, up.double() @ down.double(), h).sum())
            assert got == pytest.approx(float(tail[r:].sum()), rel=1e-6 if exact_up_to else 1e-3)


def test_weighted_lora_beats_the_plain_lora_on_the_calibration_set(case):
    w, _, h = case
    t, s = gptq_ternarize(w, h)
    e = w.double() - dense(t, s)
    for r in (4, 16):
        down, up = residual_factors(e.float(), r)
        plain = float(row_output_error(e, up.double() @ down.double(), h).sum())
        down, up = weighted_lora(e, h, r)
        assert float(row_output_error(e, up.double() @ down.double(), h).sum()) < plain


def test_lora_ranks_beyond_the_matrix_are_zero():
    e = weights(8, 16, 11)
    down, up = weighted_lora(e, torch.eye(16, dtype=torch.float64), 12)
    assert down.shape == (12, 16) and up.shape == (8, 12)
    assert bool((down[8:] == 0).all()) and bool((up[:, 8:] == 0).all())


# --------------------------------------------------------------------------- quantize_layer


def test_quantize_layer_with_a_hessian_lowers_the_output_error_and_reports_both(case):
    w, x, h = case
    for rank in (0, 8):
        plain, plain_error = quantize_layer(w, rank, packing="2bit")
        parts, error = quantize_layer(w, rank, packing="base3", hessian=h)
        assert set(parts) == set(plain)  # the same layer schema
        k = w.shape[1]
        approx = dequantize(unpack(parts["weight"], "base3", k), parts["weight_scale"]).double()
        plain_approx = dequantize(unpack(plain["weight"], "2bit", k), plain["weight_scale"])
        if rank:
            approx += parts["lora_up"].double() @ parts["lora_down"].double()
            plain_approx = plain_approx + plain["lora_up"].float() @ plain["lora_down"].float()
        assert error.output == pytest.approx(output_error(w, approx, h), rel=1e-6)
        assert error.output_plain == pytest.approx(output_error(w, plain_approx, h), rel=1e-4)
        assert error.output < 0.8 * error.output_plain
        assert plain_error.output is None and plain_error.output_plain is None
        # also on the tokens: the calibrated layer's outputs are closer to the dense ones
        ref = x @ w.double().T
        assert (x @ approx.T - ref).norm() < (x @ plain_approx.double().T - ref).norm()


def test_quantize_layer_refuses_a_hessian_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected \[16, 16\]"):
        quantize_layer(weights(8, 16, 0), hessian=torch.eye(8, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_result():
    w = weights(64, 256, 12)
    x = activations(1024, 256, 12).float()
    h = accumulate_hessian(x)
    t_cpu, s_cpu = gptq_ternarize(w, h)
    h_gpu = accumulate_hessian(x.cuda().to(torch.bfloat16))  # TF32 products of bf16 inputs
    t_gpu, s_gpu = gptq_ternarize(w.cuda(), h_gpu)
    assert t_gpu.is_cuda and s_gpu.is_cuda
    # GPTQ's greedy choices may flip with rounding: compare what they achieve
    cpu = output_error(w, dense(t_cpu, s_cpu), h)
    assert output_error(w, dense(t_gpu.cpu(), s_gpu.cpu()), h) == pytest.approx(cpu, rel=0.03)
    down, up = weighted_lora(w.cuda() - dense(t_gpu, s_gpu).float(), h_gpu, 8)
    assert down.is_cuda and up.is_cuda
