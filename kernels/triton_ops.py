"""Launchers of the Triton kernels: shape checks, dtype policy, config choice.

Dtypes: fp16 / bf16 activations run the tensor cores in their own dtype (ternary values are
exact in both). fp32 activations are split into a bf16 high part and a bf16 remainder and
run twice (about 16 mantissa bits, much better than tf32); their bias and LoRA are added
in fp32 by torch. ``act_bits=8`` quantizes tokens to fp8 e4m3 (kernels/reference.py
semantics) and runs fp8 tensor cores; GPUs without fp8 (sm_80-86) run the same codes as
bf16, which holds every e4m3 value exactly.

Under ``TRITON_INTERPRET=1`` these functions run on CPU tensors (the tests use that).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from . import triton_kernels as tk
from .dispatch import device_capability
from .tuning import (
    DENSE_MIN_TOKENS,
    DX_TABLES,
    GEMV_MAX_TOKENS,
    GEMV_TABLES,
    INTERPRETER_DX,
    INTERPRETER_GEMV,
    INTERPRETER_MATMUL,
    MATMUL_TABLES,
    UNPACK_BLOCK,
    GemvConfig,
    gpu_family,
    m_bucket,
)

SPLITK_EPILOGUE_BLOCK = (64, 16)  # (BLOCK_N, BLOCK_M) of the split-K reduction kernel
QUANT_MAX_ONE_PASS = 16384  # rows up to this length are quantized from registers

_chosen: dict[tuple, Any] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _family(device: torch.device) -> str:
    if interpreting():
        return "interpreter"
    return gpu_family(device_capability(device))


def _choose(key: tuple, candidates: list, launch: Callable[[Any], None]) -> Any:
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


def _matmul_candidates(device: torch.device, m: int, x_dtype: torch.dtype) -> tuple[str, list]:
    family = _family(device)
    if m <= GEMV_MAX_TOKENS:
        return family, [INTERPRETER_GEMV] if family == "interpreter" else GEMV_TABLES[family]
    if family == "interpreter":
        return family, [INTERPRETER_MATMUL]
    width = "a8" if x_dtype == torch.float8_e4m3fn else "a16"
    return family, MATMUL_TABLES[family][width][m_bucket(m)]


def _dx_candidates(device: torch.device, m: int) -> tuple[str, list]:
    family = _family(device)
    if family == "interpreter":
        return family, [INTERPRETER_DX]
    return family, DX_TABLES[family][m_bucket(m)]


def fp8_tensor_cores(device: torch.device) -> bool:
    """fp8 e4m3 dots: sm_89+ (and the interpreter)."""
    return interpreting() or device_capability(device) >= (8, 9)


def check_packed(weight: torch.Tensor, in_features: int, x: torch.Tensor | None = None) -> int:
    """Validate a 2bit-packed weight against in_features (and x); returns out_features."""
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(
            f"weight must be a row-contiguous 2bit-packed uint8 matrix, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[1] != -(-in_features // 128) * 32:
        raise ValueError(
            f"packed weight width {weight.shape[1]} does not fit in_features={in_features} "
            f"(expected {-(-in_features // 128) * 32})"
        )
    if x is not None:
        if x.shape[-1] != in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
        if x.device != weight.device:
            raise ValueError(f"input on {x.device} but weight on {weight.device}")
    return weight.shape[0]


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


def ternary_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
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
    """
    x = _rows(x)
    n = check_packed(weight, in_features, x)
    m = x.shape[0]
    out_dtype = out_dtype or (out.dtype if out is not None else x.dtype)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{m}, {n}] matrix")
    if m == 0:
        return out
    scale = weight_scale.float().contiguous()
    xd, up, lora_scale = lora if lora is not None else (None, None, 0.0)
    if up is not None:
        xd, up = _rows(xd), _rows(up)
    rank = 0 if up is None else up.shape[1]
    lora_block = 0 if up is None else max(16, triton.next_power_of_2(rank))
    bias_arg = bias.contiguous() if bias is not None else None
    dummy = scale  # pointer for absent optional tensors (never read)

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
        common = (x, weight, target, *extras, m, n, in_features, rank, x.stride(0))
        common += (weight.stride(0), out.stride(0), *lora_strides, lora_scale)
        if isinstance(config, GemvConfig):
            tk.ternary_gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k)](
                *common, **flags, BLOCK_N=config.block_n,
                BLOCK_BYTES=config.block_bytes, SPLIT_K=config.split_k,
                EVEN_BYTES=weight.shape[1] % config.block_bytes == 0,
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

    family, candidates = _matmul_candidates(x.device, m, x.dtype)
    bucket = f"m{m}" if m <= GEMV_MAX_TOKENS else m_bucket(m)
    key = ("mm", family, bucket, n, in_features, x.dtype, out_dtype, lora_block, bias is None)
    launch(_choose(key, candidates, launch))
    return out


def ternary_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dx[M, K] = dy (T * s) for dy [M, N] fp16 / bf16 (no dense weight in memory)."""
    dy = _rows(dy)
    n = check_packed(weight, in_features)
    m = dy.shape[0]
    if dy.shape[1] != n:
        raise ValueError(f"dy has {dy.shape[1]} columns, the layer has {n} outputs")
    if out is None:
        out = torch.empty(m, in_features, dtype=out_dtype or dy.dtype, device=dy.device)
    elif out.shape != (m, in_features) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{m}, {in_features}] matrix")
    if m == 0:
        return out
    scale = weight_scale.float().contiguous()

    def launch(config) -> None:
        grid = (triton.cdiv(in_features, config.block_k) * triton.cdiv(m, config.block_m),)
        tk.ternary_dx_kernel[grid](
            dy, weight, scale, out, m, n, in_features, dy.stride(0), weight.stride(0),
            out.stride(0), BLOCK_K=config.block_k, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, EVEN_N=n % config.block_n == 0,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    family, candidates = _dx_candidates(dy.device, m)
    key = ("dx", family, m_bucket(m), n, in_features, dy.dtype)
    launch(_choose(key, candidates, launch))
    return out


def ternary_scale_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_features: int,
    dy: torch.Tensor,
    token_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """d weight_scale [N] = sum over tokens of dy * (x T^T) (* token_scale), in float32."""
    x, dy = _rows(x), _rows(dy)
    n = check_packed(weight, in_features, x)
    m = x.shape[0]
    if m == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    family = _family(x.device)
    candidates = [INTERPRETER_MATMUL]
    if family != "interpreter":
        candidates = MATMUL_TABLES[family]["a8" if x.dtype == torch.float8_e4m3fn else "a16"]
        candidates = candidates[m_bucket(m)]
    config = next((c for c in candidates if c.split_k == 1), INTERPRETER_MATMUL)
    m_tiles = triton.cdiv(m, config.block_m)
    part = torch.empty(m_tiles, n, dtype=torch.float32, device=x.device)
    tk.scale_grad_kernel[(m_tiles * triton.cdiv(n, config.block_n),)](
        x, weight, dy, token_scale if token_scale is not None else part, part, m, n,
        in_features, x.stride(0), weight.stride(0), dy.stride(0),
        HAS_TOKEN_SCALE=token_scale is not None, BLOCK_N=config.block_n,
        BLOCK_M=config.block_m, BLOCK_K=config.block_k,
        EVEN_K=in_features % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return part.sum(0)


def dense_min_tokens(device: torch.device) -> int:
    """Token count from which the dense-scratch forward path is taken on this device."""
    return DENSE_MIN_TOKENS[_family(device)]


def unpack_dense(
    weight: torch.Tensor,
    in_features: int,
    dtype: torch.dtype,
    weight_scale: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Dense [N, K] T (* s) (+ lora_scale * up down) in ``dtype`` (fp16, bf16 or fp8 e4m3).

    lora: (up [N, r], down [r, K], lora_scale) in a 16-bit dtype. A scratch tensor: the
    caller drops it after one product, so only one layer is ever dense.
    """
    n = check_packed(weight, in_features)
    out = torch.empty(n, in_features, dtype=dtype, device=weight.device)
    scale = weight_scale.float().contiguous() if weight_scale is not None else None
    up, down, lora_scale = lora if lora is not None else (None, None, 0.0)
    if up is not None:
        up, down = _rows(up), _rows(down)
    block_n, block_k = UNPACK_BLOCK
    dummy = out
    tk.unpack_dense_kernel[(triton.cdiv(n, block_n) * triton.cdiv(in_features, block_k),)](
        weight, scale if scale is not None else dummy, up if up is not None else dummy,
        down if down is not None else dummy, out, n, in_features,
        0 if up is None else up.shape[1], weight.stride(0),
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
