import numpy as np
import pytest
import torch

from comfyui_ternary_flux.ternary.quantize import dequantize, residual_lora, ternarize


def reproduction_rule(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reproduction's absmean rule, written independently in numpy float32."""
    w = w.astype(np.float32)
    s = np.maximum(np.abs(w).mean(axis=1, keepdims=True, dtype=np.float32), np.float32(1e-8))
    return np.clip(np.round(w / s), -1, 1).astype(np.int8), s[:, 0]


def test_absmean_matches_reproduction_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 333, generator=gen).to(torch.bfloat16)
    t, s = ternarize(w)
    # The reproduction's own op sequence (models/ternary.py, _ternary_quant) on W.float().
    wf = w.float()
    s_repro = wf.abs().mean(dim=1, keepdim=True).clamp(min=1e-8)
    t_repro = (wf / s_repro).round().clamp_(-1, 1).to(torch.int8)
    assert torch.equal(t, t_repro)
    assert torch.equal(s, s_repro[:, 0])
    # An independent numpy version agrees up to float32 summation order.
    t_ref, s_ref = reproduction_rule(wf.numpy())
    assert np.array_equal(t.numpy(), t_ref)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=2e-7)


def test_ties_round_half_to_even():
    # Row mean |w| is 1, so w / s is w itself: 0.5 -> 0, -0.5 -> 0, 1.5 -> 2 -> clamp 1.
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 1.0, 0.5]])
    t, s = ternarize(w)
    assert s.tolist() == [pytest.approx(5.5 / 6)]
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 2.0, 0.0]])  # mean |w| = 1 exactly
    t, s = ternarize(w)
    assert s.tolist() == [1.0]
    assert t.tolist() == [[0, 0, 1, -1, 1, 0]]


def test_zero_row_gives_zero_codes():
    t, s = ternarize(torch.zeros(2, 8))
    assert not t.any()
    assert torch.all(s == 1e-8)


def test_lsq_scale_is_the_least_squares_optimum_for_fixed_codes():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((32, 200)).double()
    t_abs, s_abs = ternarize(w, "absmean")
    t_lsq, s_lsq = ternarize(w, "lsq")
    assert torch.equal(t_abs, t_lsq)
    td = t_lsq.double()
    optimum = (w * td).sum(1) / (td * td).sum(1)
    torch.testing.assert_close(s_lsq.double(), optimum, rtol=1e-6, atol=0)
    err_abs = (w - dequantize(t_abs, s_abs, torch.float64)).norm(dim=1)
    err_lsq = (w - dequantize(t_lsq, s_lsq, torch.float64)).norm(dim=1)
    assert torch.all(err_lsq <= err_abs + 1e-9)
    assert err_lsq.sum() < err_abs.sum()


def test_residual_lora_is_the_best_rank_r_fit():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 80, generator=gen)
    t, s = ternarize(w)
    down, up = residual_lora(w, t, s, rank=6)
    assert down.shape == (6, 80) and up.shape == (48, 6)
    residual = (w - dequantize(t, s)).double()
    sv = torch.linalg.svdvals(residual)
    best = sv[6:].square().sum().sqrt()  # Eckart-Young: the optimal rank-6 error
    got = (residual - up.double() @ down.double()).norm()
    assert got <= best * 1.01
    # Balanced split: both factors carry sqrt of the singular values.
    torch.testing.assert_close(down.norm(dim=1), up.norm(dim=0), rtol=1e-4, atol=1e-6)


def test_residual_lora_rank_above_matrix_size_pads_with_zeros():
    w = torch.randn(4, 6)
    t, s = ternarize(w)
    down, up = residual_lora(w, t, s, rank=8)
    assert down.shape == (8, 6) and not down[4:].any() and not up[:, 4:].any()
    torch.testing.assert_close(up @ down, w - dequantize(t, s), atol=1e-5, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale rule"):
        ternarize(torch.zeros(2, 2), "max")
    with pytest.raises(ValueError, match="2-D"):
        ternarize(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="rank"):
        residual_lora(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8), torch.ones(2), 0)
