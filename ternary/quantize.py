"""Ternary quantization of one weight matrix: W ~ s[:, None] * T, T in {-1, 0, +1}."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import (
    CALIBRATED,
    CalibrationOptions,
    gptq_ternarize,
    output_error,
    weighted_lora,
)
from .fileformat import LORA_DTYPE
from .packing import pack

SCALE_RULES = ("absmean", "lsq")
HEADER_SCALE_RULES = (*SCALE_RULES, CALIBRATED)  # what a file's header may say
_EPS = 1e-8


def ternarize(
    weight: torch.Tensor, scale_rule: str = "absmean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight to (T int8 [N, K], s float32 [N]).

    ``absmean`` is bit for bit the rule of the 1.58-bit FLUX reproduction, computed in
    float32: ``s = mean|W_row|`` (at least 1e-8), ``T = clamp(round(W / s), -1, 1)`` with
    torch's round-half-to-even. ``lsq`` keeps that T and replaces s by the least-squares
    scale of the row, the mean of |W| over the entries where T is non-zero, which can only
    lower the row's squared error.
    """
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {scale_rule!r}; expected one of {SCALE_RULES}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    scale = w.abs().mean(dim=1, keepdim=True).clamp(min=_EPS)
    t = (w / scale).round().clamp_(-1, 1).to(torch.int8)
    if scale_rule == "lsq":
        nonzero = t != 0
        count = nonzero.sum(dim=1, keepdim=True)
        lsq = (w.abs() * nonzero).sum(dim=1, keepdim=True) / count.clamp(min=1)
        scale = torch.where(count > 0, lsq, scale).clamp(min=_EPS)
    return t, scale.squeeze(1)


def dequantize(
    t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """s[:, None] * T as a dense matrix (for references and tests, never in the hot path)."""
    return (t.to(torch.float32) * scale.float()[:, None]).to(dtype)


def residual_lora(
    weight: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of the quantization residual E = W - s T, split as sqrt(S) on each side.

    Returns (down [r, K], up [N, r]) in float32 with ``up @ down ~ E`` (the kohya / PEFT
    orientation). A seeded randomized SVD keeps large layers fast and results repeatable.
    """
    return residual_factors(weight.float() - dequantize(t, scale), rank, seed)


def residual_factors(
    residual: torch.Tensor, rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`residual_lora` of an already computed residual E [N, K] (float32)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    n, k = residual.shape
    r = min(rank, n, k)
    with torch.random.fork_rng(devices=[residual.device] if residual.is_cuda else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(residual, q=min(r + 8, n, k), niter=4)
    root = s[:r].sqrt()
    down = torch.zeros(rank, k, dtype=torch.float32, device=residual.device)
    up = torch.zeros(n, rank, dtype=torch.float32, device=residual.device)
    down[:r] = root[:, None] * v[:, :r].T
    up[:, :r] = u[:, :r] * root
    return down, up


@dataclass
class LayerError:
    """Relative Frobenius error of one layer: ||W - sT|| / ||W|| (and with the LoRA).

    Calibrated layers also carry the relative output error on their calibration inputs,
    ||X (W - What)^T|| / ||X W^T||: ``output`` of the calibrated layer, ``output_plain`` of
    what the plain rule (round to nearest, SVD LoRA of the same rank) gives on the same X.
    """

    name: str
    shape: tuple[int, int]
    ternary: float
    with_lora: float | None = None
    output: float | None = None
    output_plain: float | None = None


def quantize_layer(
    weight: torch.Tensor,
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    packing: str = "2bit",
    lora_dtype: torch.dtype = LORA_DTYPE,
    hessian: torch.Tensor | None = None,
    options: CalibrationOptions | None = None,
) -> tuple[dict[str, torch.Tensor], LayerError]:
    """The one per-layer quantizer: a dense [N, K] weight -> ({suffix: tensor}, error), the
    suffixes and dtypes of ternary/fileformat.py's layer schema.

    Without ``hessian``: T and s by ``scale_rule``, the LoRA a truncated SVD of the residual.
    With the calibration Hessian ``X^T X`` [K, K] of the layer's inputs (ternary/calibrate.py):
    GPTQ-style codes with searched and refit scales, and an activation-weighted LoRA, both
    chosen for the output error on X; ``scale_rule`` is then only the plain rule the error
    report compares with.
    """
    w = weight.float()  # torch has no isfinite for fp8 weights
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight of shape {tuple(weight.shape)} holds NaN or infinite values")
    norm = w.norm().clamp(min=1e-30)
    if hessian is None:
        t, scale = ternarize(weight, scale_rule)
    else:
        t, scale = gptq_ternarize(w, hessian, options)
    residual = w - dequantize(t, scale)
    error = LayerError("", tuple(weight.shape), float(residual.norm() / norm))
    out = {"weight": pack(t, packing), "weight_scale": scale}
    approx = w - residual
    if lora_rank:
        if hessian is None:
            down, up = residual_factors(residual, lora_rank)
        else:
            damp = (options or CalibrationOptions()).lora_damp
            down, up = weighted_lora(residual, hessian, lora_rank, damp)
        down, up = down.to(lora_dtype), up.to(lora_dtype)
        branch = up.float() @ down.float()
        error.with_lora = float((residual - branch).norm() / norm)
        approx = approx + branch
        out.update(lora_down=down, lora_up=up, lora_alpha=torch.tensor(float(lora_rank)))
    if hessian is not None:
        error.output = output_error(w, approx, hessian)
        error.output_plain = output_error(
            w, _plain_approx(w, lora_rank, scale_rule, lora_dtype), hessian
        )
    return out, error


def _plain_approx(
    w: torch.Tensor, lora_rank: int, scale_rule: str, lora_dtype: torch.dtype
) -> torch.Tensor:
    """s T (+ up down) of the plain rule: what the layer would be without calibration."""
    t, scale = ternarize(w, scale_rule)
    approx = dequantize(t, scale)
    if lora_rank:
        down, up = residual_factors(w - approx, lora_rank)
        approx = approx + up.to(lora_dtype).float() @ down.to(lora_dtype).float()
    return approx
