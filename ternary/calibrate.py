"""Calibrated ternary quantization of one layer: T, s and LoRA chosen for the layer's output.

A ternary layer computes ``y = x (s T + up down)^T``. Given its calibration inputs ``X``
[M, K] (tokens as rows), the functions here minimise the layer's *output* error on them,

    ||X W^T - X (s T + up down)^T||_F^2 = tr(E H E^T),   E = W - s T - up down,  H = X^T X,

instead of the weight error ``||E||_F`` that :func:`ternary.quantize.ternarize` minimises.
Everything needs only the K x K matrix ``H``, which :class:`HessianAccumulator` sums from
streamed activation batches. Nothing here knows a model: the caller captures the inputs.

* :func:`gptq_ternarize`: GPTQ / OPTQ error feedback on the grid ``{-s, 0, +s}`` of each row.
  Columns are rounded one at a time (in descending ``diag(H)`` order, "act-order"); the
  rounding error of a column is pushed onto the columns not yet rounded along the rows of
  the upper Cholesky factor of ``H^-1`` (lazy block updates). The per-row scale is chosen
  before the sweep by a search over multiples of absmean (GPTQ runs for every multiple at
  once, rows stacked; each row keeps the multiple with the lowest output error), and refit
  after it in closed form, ``s = t^T H w / t^T H t``. A guard keeps round-to-nearest absmean
  codes on any row where they do better, so the result is never worse than absmean on the
  calibration inputs, row by row.
* :func:`weighted_lora`: the rank-r ``up @ down`` minimising ``||(R - up down) X^T||_F`` for a
  residual R: ``P_r P_r^T R`` with ``P_r`` the top eigenvectors of ``R H R^T`` (the
  activation-weighted SVD of ASVD / SVD-LLM, written without ``H^1/2``, so a singular H is
  fine). With ``H = I`` it is the truncated SVD of R, the pack's plain residual LoRA.

Precision: H and every K x K factorisation are float64; the N x K sweep runs in float32 (as
GPTQ does). Every function runs on the tensors' device (CPU or CUDA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

#: Multiples of the absmean scale tried per row before the GPTQ sweep. Error feedback widens
#: the values it rounds, so rows prefer scales well above absmean (the median row of the
#: prototype's bench picked about 1.9x, the 90th percentile 2.5-3x).
DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.4, 2.8, 3.2)
#: The ``scale_rule`` a file header records for calibrated layers.
CALIBRATED = "calibrated"
_EPS = 1e-8


class CalibrationError(ValueError):
    """Calibration cannot run as asked (a Hessian of the wrong shape, no usable inputs)."""


@dataclass(frozen=True)
class CalibrationOptions:
    """How :func:`gptq_ternarize` and :func:`weighted_lora` run (defaults from the bench).

    ``damp``: GPTQ damping relative to ``mean(diag H)``; 0.1 generalised best to held-out
    tokens at 1-16 calibration tokens per input channel. ``lora_damp``: the same for the
    LoRA's weighting (it ties the LoRA to the weight error where the calibration inputs
    never point).
    """

    damp: float = 0.1
    lora_damp: float = 0.1
    multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS
    act_order: bool = True
    block: int = 128
    guard: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.damp) and self.damp >= 0):
            raise CalibrationError(f"damp must be a finite number >= 0, got {self.damp}")
        if not (math.isfinite(self.lora_damp) and self.lora_damp >= 0):
            raise CalibrationError(f"lora_damp must be >= 0, got {self.lora_damp}")
        if not self.multipliers or any(not m > 0 for m in self.multipliers):
            raise CalibrationError(f"multipliers must be positive, got {self.multipliers}")
        if self.block < 1:
            raise CalibrationError(f"block must be at least 1, got {self.block}")

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- Hessian


@contextlib.contextmanager
def _tf32_products(enabled: bool) -> Iterator[None]:
    """TF32 matrix products on CUDA while ``enabled``: exact for bf16 / fp16 inputs (their
    mantissas fit TF32's) with float32 accumulation, at tensor-core speed."""
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class HessianAccumulator:
    """``H = sum x^T x`` over streamed activation batches ``x`` [..., K], float64.

    Products are taken in float32 (float64 for float64 inputs) on chunks of ``chunk``
    tokens (TF32 on CUDA for 16-bit inputs, which it represents exactly) and summed in
    float64. The scale of H (a sum, not a mean) does not matter downstream: damping is
    relative to ``mean(diag H)`` and every objective is a ratio or an argmin.
    """

    def __init__(self, k: int, device: torch.device | str = "cpu", chunk: int = 8192) -> None:
        self.k, self.chunk = k, chunk
        self.hessian = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.k:
            raise CalibrationError(f"activations of width {x.shape[-1]}, expected {self.k}")
        rows = x.detach().reshape(-1, self.k)
        sixteen = rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16)
        dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        with _tf32_products(sixteen):
            for start in range(0, rows.shape[0], self.chunk):
                part = rows[start : start + self.chunk].to(self.hessian.device, dtype)
                self.hessian.add_((part.T @ part).double())
        self.tokens += rows.shape[0]


def accumulate_hessian(batches: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``X^T X`` (float64 [K, K]) of one activation tensor or a sequence of batches."""
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    if not batches:
        raise CalibrationError("no activations to accumulate")
    acc = HessianAccumulator(batches[0].shape[-1], batches[0].device)
    for x in batches:
        acc.add(x)
    return acc.hessian


def check_hessian(hessian: torch.Tensor, k: int) -> None:
    """A float [K, K] matrix with finite values and a positive trace, or CalibrationError."""
    if hessian.shape != (k, k):
        raise CalibrationError(f"Hessian of shape {list(hessian.shape)}, expected [{k}, {k}]")
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError("Hessian holds NaN or infinite values")
    if not float(torch.diagonal(hessian).sum()) > 0:
        raise CalibrationError("Hessian is zero: the calibration inputs never reached the layer")


def damped_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 ``H + damp * mean(diag H) * I`` with dead inputs decoupled and set to 1,
    bool mask of the dead inputs: channels whose diagonal is 0, which never carried signal)."""
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1.0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag.add_(damp * mean)
    return h, dead


def _inverse_cholesky_upper(h: torch.Tensor, tries: int = 6) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = h^-1`` (float64), adding damping until ``h`` factors.

    ``h`` is consumed: extra damping is added to it in place. At most two K x K float64
    matrices beyond ``h`` live at once (15360^2: 1.9 GB each)."""
    mean = float(torch.diagonal(h).mean())
    extra = 0.0
    lower: torch.Tensor | None = None
    for _ in range(tries):
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        lower = None
        step = 1e-6 if extra == 0.0 else 9 * extra
        torch.diagonal(h).add_(step * mean)
        extra += step
    if lower is None:
        raise CalibrationError("the Hessian is not positive definite, even after extra damping")
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info):
        raise CalibrationError("the inverse Hessian is not positive definite (ill-conditioned)")
    return upper


# --------------------------------------------------------------------------- errors, scales


def row_output_error(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """Per-row ``e^T H e`` with ``e = weight_row - approx_row`` (float64 [N])."""
    e = weight.to(torch.float64) - approx.to(torch.float64)
    return ((e @ hessian.to(torch.float64)) * e).sum(dim=1)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(E H E^T) / tr(W H W^T))`` = ``||X E^T|| / ||X W^T||``."""
    w = weight.to(torch.float64)
    h = hessian.to(torch.float64)
    num = float(row_output_error(w, approx, h).sum())
    den = float(((w @ h) * w).sum())
    return math.sqrt(max(num, 0.0) / max(den, 1e-300))


def _absmean(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean(dim=1).clamp(min=_EPS)


def _quadratic_terms(
    t: torch.Tensor, hw: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t^T H w, t^T H t)`` per row (float64), given the rows ``hw = W H``."""
    t64 = t.to(torch.float64)
    return (t64 * hw).sum(dim=1), ((t64 @ hessian) * t64).sum(dim=1)


def _refit_from_terms(thw: torch.Tensor, tht: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    scale = thw / tht.clamp(min=1e-300)
    ok = (tht > 1e-30 * tht.abs().max().clamp(min=1e-300)) & (scale > _EPS) & scale.isfinite()
    return torch.where(ok, scale, fallback.to(torch.float64)).to(torch.float32)


def refit_scale(
    weight: torch.Tensor,
    t: torch.Tensor,
    hessian: torch.Tensor,
    fallback: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form per-row scale minimising ``(w - s t)^T H (w - s t)``: ``t^T H w / t^T H t``.

    Rows where the optimum is undefined or not positive (all-zero t, ``t^T H t`` ~ 0, t
    anti-correlated with w under H) keep ``fallback`` (default: absmean). float32 [N].
    """
    w = weight.to(torch.float64)
    h = hessian.to(device=w.device, dtype=torch.float64)
    thw, tht = _quadratic_terms(t, w @ h, h)
    return _refit_from_terms(thw, tht, fallback if fallback is not None else _absmean(w))


# --------------------------------------------------------------------------- GPTQ


def _gptq_sweep(
    wt: torch.Tensor, scale: torch.Tensor, upper: torch.Tensor, block: int
) -> torch.Tensor:
    """Ternary GPTQ over the columns of W, given transposed: ``wt`` = W^T (float32 [K, R],
    rows in the sweep's order, so that each column of W is contiguous), updated in place.

    ``upper``: the upper Cholesky factor of the (permuted, damped) inverse Hessian, float32.
    Column j is rounded to ``s * clamp(round(w_j / s), -1, 1)``; its error ``(w_j - q_j) /
    U_jj`` is pushed onto the columns after it along row j of U: eagerly inside the block,
    lazily (one product) for the columns after the block. Returns T^T (int8 [K, R]).
    """
    k = wt.shape[0]
    inv_scale = 1.0 / scale
    q = torch.empty(wt.shape, dtype=torch.int8, device=wt.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2]  # a view: updated in place
        u1 = upper[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = w1[i]
            qi = torch.mul(col, inv_scale).round_().clamp_(-1, 1)
            q[i1 + i] = qi
            e = torch.addcmul(col, qi, scale, value=-1.0).div_(u1[i, i])
            err1[i] = e
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1.0)
        if i2 < k:
            wt[i2:].addmm_(upper[i1:i2, i2:].T, err1, alpha=-1.0)
    return q


def _gptq_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    upper: torch.Tensor,
    perm: torch.Tensor | None,
    block: int,
    copies: int = 1,
) -> torch.Tensor:
    """GPTQ ternary codes of float32 rows ``w`` [N, K], int8 [copies * N, K] in the original
    column order: ``copies`` sweeps at once, copy j with the scales ``scale[j*N:(j+1)*N]``."""
    wt = w.T if perm is None else w.T[perm]
    wt = wt.repeat(1, copies) if copies > 1 else wt.contiguous().clone()
    qt = _gptq_sweep(wt, scale, upper, block)
    del wt
    if perm is not None:
        out = torch.empty_like(qt)
        out[perm] = qt
        qt = out
    return qt.T.contiguous()


def _sweep_factor(
    h_raw: torch.Tensor, options: CalibrationOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(float32 upper Cholesky factor of the damped, permuted inverse Hessian, dead-input
    mask, act-order permutation or None)."""
    h, dead = damped_hessian(h_raw, options.damp)
    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        h = h[perm]
        h = h[:, perm]
    upper = _inverse_cholesky_upper(h)
    del h
    return upper.to(torch.float32), dead, perm


def gptq_ternarize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    options: CalibrationOptions | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary GPTQ of a [N, K] weight for the calibration Hessian ``H = X^T X`` [K, K].

    The per-row scale before the sweep is ``scale`` when given, else searched over
    ``options.multipliers`` x absmean; after the sweep it is refit in closed form on the
    undamped H (the exact calibration optimum for the codes). Returns ``(T int8 [N, K],
    s float32 [N])`` on the weight's device; with ``options.guard`` no row has a higher
    calibration output error than round-to-nearest absmean codes with a refit scale.
    """
    options = options or CalibrationOptions()
    if weight.dim() != 2:
        raise CalibrationError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_hessian(hessian, k)
    device = weight.device
    h_raw = hessian.to(device=device, dtype=torch.float64)
    upper, dead, perm = _sweep_factor(h_raw, options)
    w = weight.float().clone()
    w[:, dead] = 0.0  # inputs that never fire have no effect on the output: code them 0

    w64 = weight.to(torch.float64)
    hw = w64 @ h_raw  # rows H w: t^T H w costs O(NK) per candidate
    whw = (hw * w64).sum(dim=1)
    del w64
    absmean = _absmean(weight.float())

    def evaluate(t: torch.Tensor, s_sweep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(refit scale, calibration error) of codes t."""
        thw, tht = _quadratic_terms(t, hw, h_raw)
        s = _refit_from_terms(thw, tht, s_sweep)
        s64 = s.double()
        return s, whw - 2 * s64 * thw + s64 * s64 * tht

    if scale is not None:
        s0 = scale.to(device=device, dtype=torch.float32).clamp(min=_EPS)
        t = _gptq_codes(w, s0, upper, perm, options.block)
        s, err = evaluate(t, s0)
    else:
        mults = torch.tensor(options.multipliers, dtype=torch.float32, device=device)
        g = len(options.multipliers)
        s_stack = (absmean[None, :] * mults[:, None]).reshape(-1)  # [G * N], multiple-major
        t_stack = _gptq_codes(w, s_stack, upper, perm, options.block, copies=g)
        t, s, err = None, None, None
        for j in range(g):
            t_j = t_stack[j * n : (j + 1) * n]
            s_j, err_j = evaluate(t_j, s_stack[j * n : (j + 1) * n])
            if t is None:
                t, s, err = t_j.clone(), s_j, err_j
            else:
                better = err_j < err
                t[better] = t_j[better]
                s = torch.where(better, s_j, s)
                err = torch.where(better, err_j, err)
        del t_stack
    if options.guard:
        t_rtn = (w / absmean[:, None]).round().clamp_(-1, 1).to(torch.int8)
        s_rtn, err_rtn = evaluate(t_rtn, absmean)
        better = err_rtn < err
        if bool(better.any()):
            t[better] = t_rtn[better]
            s = torch.where(better, s_rtn, s)
    return t, s


# --------------------------------------------------------------------------- LoRA


def _top_eigvecs_randomized(
    residual: torch.Tensor, h: torch.Tensor, r: int, oversample: int = 16, niter: int = 6
) -> torch.Tensor:
    """Top-r eigenvectors of ``R H R^T`` by seeded subspace iteration (products only)."""
    n = residual.shape[0]
    q = min(n, r + oversample)
    gen = torch.Generator(device="cpu").manual_seed(0)
    y = torch.randn(n, q, generator=gen, dtype=torch.float64).to(residual.device)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return residual @ (h @ (residual.T @ v))

    basis = torch.linalg.qr(apply(y)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(apply(basis)).Q
    small = basis.T @ apply(basis)
    vals, vecs = torch.linalg.eigh((small + small.T) / 2)
    return basis @ vecs[:, torch.argsort(vals, descending=True)[:r]]


def _top_left_vectors(res: torch.Tensor, h: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors of ``R H R^T`` (float64 [N, r]) by an exact eigendecomposition of
    the smaller side: ``R H R^T`` itself when N <= K, else ``M^T M`` with ``M = R L``,
    ``L L^T = H`` (the left singular vectors of M are the eigenvectors sought)."""
    n, k = res.shape
    if n > k:
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            m = res @ lower
            vals, vecs = torch.linalg.eigh(m.T @ m)
            top = torch.argsort(vals, descending=True)[:r]
            p = m @ vecs[:, top]
            return p / p.norm(dim=0).clamp(min=1e-300)
    gram = (res @ h) @ res.T
    vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    return vecs[:, torch.argsort(vals, descending=True)[:r]]


def weighted_lora(
    residual: torch.Tensor,
    hessian: torch.Tensor,
    rank: int,
    damp: float = 0.1,
    exact_up_to: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r ``(down [rank, K], up [N, rank])`` minimising ``tr((R - up down) H' (R - up
    down)^T)``, ``H' = H + damp * mean(diag H) * I``; float32 on the residual's device.

    With ``P_r`` the top-r eigenvectors of ``R H' R^T`` the optimum is ``P_r P_r^T R``:
    ``up = P_r c``, ``down = c^-1 P_r^T R`` with c the square roots of the row norms of
    ``P_r^T R`` (both factors carry the same norm per rank, as the pack's residual LoRA splits
    sqrt(S) to each side). Exact eigendecomposition when ``min(N, K) <= exact_up_to``, seeded
    subspace iteration above. Ranks beyond ``min(N, K)`` are zero.
    """
    if rank < 1:
        raise CalibrationError(f"LoRA rank must be at least 1, got {rank}")
    n, k = residual.shape
    check_hessian(hessian, k)
    device = residual.device
    r = min(rank, n, k)
    res = residual.to(torch.float64)
    h = hessian.to(device=device, dtype=torch.float64)
    if damp > 0:
        h = damped_hessian(h, damp)[0]
    if min(n, k) <= exact_up_to:
        p = _top_left_vectors(res, h, r)
    else:
        p = _top_eigvecs_randomized(res, h, r)
    proj = p.T @ res  # [r, K]
    c = proj.norm(dim=1).sqrt().clamp(min=1e-30)
    down = torch.zeros(rank, k, dtype=torch.float32, device=device)
    up = torch.zeros(n, rank, dtype=torch.float32, device=device)
    down[:r] = (proj / c[:, None]).float()
    up[:, :r] = (p * c[None, :]).float()
    return down, up
