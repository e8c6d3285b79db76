"""Launchers of the Triton kernels: output buffers, strides, the timed choice of a config.

Dtypes: fp16 / bf16 activations run the tensor cores in their own dtype (ternary values are
exact in both). fp32 activations are split into a bf16 high part and a bf16 remainder and
run twice (about 16 mantissa bits, much better than tf32); their bias and LoRA are added
in fp32 by torch (kernels/triton_linear.py). 8-bit activations are per-token fp8 e4m3 codes
(kernels/reference.py semantics) on fp8 tensor cores; GPUs without fp8 (sm_80-86) run the
same codes as bf16, which holds every e4m3 value exactly.

Which kernel and which candidates: kernels/plan.py. Under ``TRITON_INTERPRET=1`` these
functions run on CPU tensors (the tests use that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from . import triton_kernels as tk
from .device import fp8_tensor_cores, interpreting
from .layout import check_packed
from .tuning import GEMV_MAX_TOKENS, UNPACK_BLOCK, GemvConfig, m_bucket
from .weight import TernaryWeight

SPLITK_EPILOGUE_BLOCK = (64, 16)  # (BLOCK_N, BLOCK_M) of the split-K reduction kernel
QUANT_MAX_ONE_PASS = 16384  # rows up to this length are quantized from registers

_chosen: dict[tuple, Any] = {}


def _choose(key: tuple, candidates: tuple, launch: Callable[[Any], None]) -> Any:
    """Fastest candidate for ``key`` (timed once per process, then remembered)."""
    if key not in _chosen:
        if len(candidates) == 1:
            _chosen[key] = candidates[0]
        else:
            # The candidates run on triton's own side stream and write the caller's output,
            # whose memory the caching allocator may just have taken from a tensor that work
            # still queued on the current stream reads or writes: let that work finish first.
            torch.cuda.synchronize()
            times = {}
            for config in candidates:
                try:
                    # graph replays: GPU time only, not the launcher's Python overhead
                    times[config] = triton.testing.do_bench_cudagraph(
                        lambda config=config: launch(config), rep=10, return_mode="median"
                    )
                except OutOfResources:
                    continue
            if not times:
                raise RuntimeError(f"no launch configuration fits this GPU for {key}")
            _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def chosen_configs() -> dict[tuple, Any]:
    """Configurations picked so far (for benchmarks and reports)."""
    return dict(_chosen)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a matrix whose rows are contiguous (no copy when they already are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 e4m3 codes [M, K] and float32 scales [M] of a [M, K] matrix.

    The codes are float8_e4m3fn, or bf16 (same values) on GPUs without fp8 tensor cores.
    """
    x = _rows(x)
    m, k = x.shape
    codes_dtype = torch.float8_e4m3fn if fp8_tensor_cores(x.device) else torch.bfloat16
    q = torch.empty(m, k, dtype=codes_dtype, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        one_pass = k <= QUANT_MAX_ONE_PASS
        block = triton.next_power_of_2(k) if one_pass else 4096
        warps = 4 if block <= 4096 else 8
        tk.quantize_fp8_kernel[(m,)](
            x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one_pass,
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return q, scale


def quantize_and_unpack(
    x: torch.Tensor, weight: TernaryWeight
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 codes [M, K], token scales [M], fp8 ternary scratch [N, K]) in one launch: the
    inputs of the 8-bit dense path (quantize_fp8 and unpack_dense(..., fp8, scaled=False)
    in one kernel). Needs fp8 tensor cores and rows quantized in one pass."""
    x = _rows(x)
    m, k = x.shape
    packed = weight.packed
    n = packed.shape[0]
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    token_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=x.device)
    block_n, block_k = UNPACK_BLOCK
    tiles = triton.cdiv(n, block_n) * triton.cdiv(k, block_k)
    quant_block = triton.next_power_of_2(k)
    tk.quantize_and_unpack_kernel[(m + tiles,)](
        x, q, token_scale, packed, codes, m, n, k, x.stride(0), q.stride(0), packed.stride(0),
        codes.stride(0), QUANT_BLOCK=quant_block, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4 if quant_block <= 4096 else 8, enable_fp_fusion=False,
    )  # fmt: skip
    return q, token_scale, codes


def ternary_matmul(
    x: torch.Tensor,
    weight: TernaryWeight,
    configs: tuple,
    family: str,
    *,
    token_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out[M, N] = (x T^T) * s (* token_scale) + bias + lora_scale * xd up^T.

    x: [M, K] fp16 / bf16, or fp8 e4m3 codes with ``token_scale`` [M] float32.
    lora: (xd [M, r], up [N, r], lora_scale), both in the output dtype (fp16 / bf16).
    out: optional preallocated [M, N] result (written completely).
    configs, family: the plan's candidates (GemvConfig for one token, else MatmulConfig).
    """
    x = _rows(x)
    in_features = weight.in_features
    n = check_packed(weight.packed, in_features)
    m = x.shape[0]
    out_dtype = out_dtype or (out.dtype if out is not None else x.dtype)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{m}, {n}] matrix")
    if m == 0:
        return out
    scale = weight.scale
    xd, up, lora_scale = lora if lora is not None else (None, None, 0.0)
    if up is not None:
        xd, up = _rows(xd), _rows(up)
    rank = 0 if up is None else up.shape[1]
    lora_block = 0 if up is None else max(16, triton.next_power_of_2(rank))
    bias_arg = bias.contiguous() if bias is not None else None
    dummy = scale  # pointer for absent optional tensors (never read)
    packed = weight.packed

    def launch(config) -> None:
        flags = dict(
            HAS_TOKEN_SCALE=token_scale is not None,
            HAS_BIAS=bias_arg is not None,
            LORA_BLOCK=lora_block,
        )
        extras = (
            scale,
            token_scale if token_scale is not None else dummy,
            bias_arg if bias_arg is not None else dummy,
            xd if xd is not None else dummy,
            up if up is not None else dummy,
        )
        lora_strides = (
            xd.stride(0) if xd is not None else 0,
            up.stride(0) if up is not None else 0,
        )
        target = out
        if config.split_k > 1:
            target = torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device)
        common = (x, packed, target, *extras, m, n, in_features, rank, x.stride(0))
        common += (packed.stride(0), out.stride(0), *lora_strides, lora_scale)
        if isinstance(config, GemvConfig):
            tk.ternary_gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k)](
                *common, **flags, BLOCK_N=config.block_n,
                BLOCK_BYTES=config.block_bytes, SPLIT_K=config.split_k,
                EVEN_BYTES=packed.shape[1] % config.block_bytes == 0,
                USE_ASM=not interpreting(), num_warps=config.num_warps,
            )  # fmt: skip
        else:
            tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
            tk.ternary_mm_kernel[(tiles, config.split_k)](
                *common, **flags, BLOCK_N=config.block_n, BLOCK_M=config.block_m,
                BLOCK_K=config.block_k, SPLIT_K=config.split_k,
                EVEN_K=in_features % config.block_k == 0,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
        if config.split_k > 1:
            bn, bm = SPLITK_EPILOGUE_BLOCK
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            tk.splitk_epilogue_kernel[grid](
                target, out, *extras, m, n, rank, out.stride(0), *lora_strides, lora_scale,
                **flags, BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=config.split_k, num_warps=4,
            )  # fmt: skip

    bucket = f"m{m}" if m <= GEMV_MAX_TOKENS else m_bucket(m)
    key = ("mm", family, bucket, n, in_features, x.dtype, out_dtype, lora_block, bias is None)
    launch(_choose(key, configs, launch))
    return out


def ternary_dx(
    dy: torch.Tensor,
    weight: TernaryWeight,
    configs: tuple,
    family: str,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dx[M, K] = dy (T * s) for dy [M, N] fp16 / bf16 (no dense weight in memory)."""
    dy = _rows(dy)
    in_features = weight.in_features
    n = check_packed(weight.packed, in_features)
    m = dy.shape[0]
    if dy.shape[1] != n:
        raise ValueError(f"dy has {dy.shape[1]} columns, the layer has {n} outputs")
    if out is None:
        out = torch.empty(m, in_features, dtype=out_dtype or dy.dtype, device=dy.device)
    elif out.shape != (m, in_features) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{m}, {in_features}] matrix")
    if m == 0:
        return out
    packed, scale = weight.packed, weight.scale

    def launch(config) -> None:
        grid = (triton.cdiv(in_features, config.block_k) * triton.cdiv(m, config.block_m),)
        tk.ternary_dx_kernel[grid](
            dy, packed, scale, out, m, n, in_features, dy.stride(0), packed.stride(0),
            out.stride(0), BLOCK_K=config.block_k, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, EVEN_N=n % config.block_n == 0,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    key = ("dx", family, m_bucket(m), n, in_features, dy.dtype)
    launch(_choose(key, configs, launch))
    return out


def ternary_scale_grad(
    x: torch.Tensor,
    weight: TernaryWeight,
    dy: torch.Tensor,
    config,
    token_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """d weight_scale [N] = sum over tokens of dy * (x T^T) (* token_scale), in float32."""
    x, dy = _rows(x), _rows(dy)
    in_features, packed = weight.in_features, weight.packed
    n = check_packed(packed, in_features)
    m = x.shape[0]
    if m == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    m_tiles = triton.cdiv(m, config.block_m)
    part = torch.empty(m_tiles, n, dtype=torch.float32, device=x.device)
    tk.scale_grad_kernel[(m_tiles * triton.cdiv(n, config.block_n),)](
        x, packed, dy, token_scale if token_scale is not None else part, part, m, n,
        in_features, x.stride(0), packed.stride(0), dy.stride(0),
        HAS_TOKEN_SCALE=token_scale is not None, BLOCK_N=config.block_n,
        BLOCK_M=config.block_m, BLOCK_K=config.block_k,
        EVEN_K=in_features % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return part.sum(0)


def unpack_dense(
    weight: TernaryWeight,
    dtype: torch.dtype,
    scaled: bool = True,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Dense [N, K] T (* s when ``scaled``) (+ lora_scale * up down) in ``dtype`` (fp16, bf16
    or fp8 e4m3).

    lora: (up [N, r], down [r, K], lora_scale) in a 16-bit dtype. A scratch tensor: the
    caller drops it after one product, so only one layer is ever dense. One fixed, portable
    tile (UNPACK_BLOCK): the kernel is memory-bound on every GPU.
    """
    in_features, packed = weight.in_features, weight.packed
    n = check_packed(packed, in_features)
    out = torch.empty(n, in_features, dtype=dtype, device=packed.device)
    scale = weight.scale if scaled else None
    up, down, lora_scale = lora if lora is not None else (None, None, 0.0)
    if up is not None:
        up, down = _rows(up), _rows(down)
    block_n, block_k = UNPACK_BLOCK
    dummy = out
    tk.unpack_dense_kernel[(triton.cdiv(n, block_n) * triton.cdiv(in_features, block_k),)](
        packed, scale if scale is not None else dummy, up if up is not None else dummy,
        down if down is not None else dummy, out, n, in_features,
        0 if up is None else up.shape[1], packed.stride(0),
        0 if up is None else up.stride(0), 0 if down is None else down.stride(0),
        out.stride(0), lora_scale, HAS_SCALE=scale is not None,
        LORA_BLOCK=0 if up is None else max(16, triton.next_power_of_2(up.shape[1])),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x = hi + lo (+ about 2**-16 relative), both bf16: two exact-weight bf16 passes."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)
