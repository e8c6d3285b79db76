"""Triton kernels for ternary linears over the ``2bit`` layout of ternary/packing.py.

Every matmul computes transposed tiles, ``Y^T[n, m] = T[n, :] . X[m, :]``: the unpacked
ternary weight is the left operand, built in registers (the only wgmma operand that may come
from registers on Hopper), and the activations are the right operand, read from shared memory.

The layout's numbers (GROUP = 128 columns, GROUP_BYTES = 32 bytes per group and row, the
padding byte) come from kernels/layout.py, its one owner. Weight tiles are loaded with a
replicated address pattern: column ``c`` of a group lives in byte ``c % 32`` at bit
``2 * (c // 32)``, so a [rows, 128] tile of codes comes from
one [rows, 32]-byte block (read four times from L1/shared memory) plus a per-column shift.
This needs no reshape or interleave and lets one tensor-core dot consume 128 columns.

Kernels: ternary_mm_kernel (tensor-core tiles, optional split-K finished by
splitk_epilogue_kernel), ternary_gemv_kernel (one token), ternary_dx_kernel (dx = dy T s),
scale_grad_kernel (d weight_scale), unpack_dense_kernel (one-layer dense scratch for cuBLAS),
quantize_fp8_kernel (per-token fp8 activations), quantize_and_unpack_kernel (both inputs of
the 8-bit dense path in one launch).

This module imports only Triton and the layout constants, so kernels can be compiled for a
GPU target on a machine without one (to read their SASS).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import layout

GROUP: tl.constexpr = tl.constexpr(layout.GROUP)
GROUP_BYTES: tl.constexpr = tl.constexpr(layout.GROUP_BYTES)
PLANE: tl.constexpr = tl.constexpr(layout.GROUP // 4)  # columns per 2-bit plane of a group
PAD_BYTE: tl.constexpr = tl.constexpr(layout.PAD_BYTE)


@triton.jit
def _unpack(p, shift, dtype: tl.constexpr):
    """2-bit codes (value + 1) -> ternary values in ``dtype``.

    (2**23 + code) read as float32 bits, minus 2**23 + 1, is code - 1 exactly: an integer OR
    and a float add instead of a slow integer-to-float conversion.
    """
    code = ((p >> shift) & 3).to(tl.uint32)
    return ((code | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0).to(dtype)


@triton.constexpr_function
def _plane_asm_text(plane, half):
    """PTX for _unpack_plane_asm: two bytes -> one f16x2 / bf16x2 register of plane ``plane``.

    prmt spreads the bytes into the two 16-bit halves; lop3 keeps the plane's code bits and
    ORs in a float whose last mantissa bits they become (bf16 128 + c 4**plane; fp16 1024 +
    c 4**plane; bf16 plane 3 straddles the exponent: 0.5 + c / 4), and one packed fma maps
    that exactly onto c - 1.
    """
    mask = (0x00030003, 0x000C000C, 0x00300030, 0x00C000C0)[plane]
    if half:  # fp16: 1024 + c * 4**p; v / 4**p - (1024 / 4**p + 1)
        magic, scale, offset = (
            0x6400,
            (0x3C00, 0x3400, 0x2C00, 0x2400),
            (0xE401, 0xDC04, 0xD410, 0xCC40),
        )
        kind = "f16x2"
    else:  # bf16: 128 + c * 4**p (planes 0-2), 0.5 + c / 4 (plane 3)
        magic = 0x3F00 if plane == 3 else 0x4300
        scale, offset = (0x3F80, 0x3E80, 0x3D80, 0x4080), (0xC301, 0xC204, 0xC110, 0xC040)
        kind = "bf16x2"

    def pair(v):
        return f"0x{v * 0x10001:08X}"

    return (
        "{.reg .b32 t, s, c; cvt.u32.u16 t, $1; prmt.b32 t, t, 0, 0x4140; "
        f"lop3.b32 t, t, 0x{mask:08X}, {pair(magic)}, 0xEA; mov.b32 s, {pair(scale[plane])}; "
        f"mov.b32 c, {pair(offset[plane])}; fma.rn.{kind} $0, t, s, c;}}"
    )


@triton.jit
def _unpack_plane_asm(p, plane: tl.constexpr, dtype: tl.constexpr):
    """_unpack(p, 2 * plane, dtype) for fp16 / bf16 in inline PTX, two bytes per call (no
    interpreter support: kernels switch to _unpack under TRITON_INTERPRET=1)."""
    if dtype == tl.float16:
        asm: tl.constexpr = _plane_asm_text(plane, True)
        return tl.inline_asm_elementwise(asm, "=r,h", [p], dtype=tl.float16, is_pure=True, pack=2)
    else:
        asm: tl.constexpr = _plane_asm_text(plane, False)
        return tl.inline_asm_elementwise(asm, "=r,h", [p], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _group_columns(BLOCK_K: tl.constexpr):
    """For the columns 0..BLOCK_K-1 of a tile: their byte offset and bit shift in 2bit rows."""
    c = tl.arange(0, BLOCK_K)
    byte = (c // GROUP) * GROUP_BYTES + c % PLANE
    shift = (((c // PLANE) % 4) * 2).to(tl.uint8)
    return c, byte, shift


@triton.jit
def _tile_offsets(M, N, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile of this program: N tiles run fastest, so concurrent programs share the (larger)
    activation tiles in L2 while the small packed weight stays resident."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, offs_m


@triton.jit
def _ternary_tile(
    x_ptr,
    w_ptr,
    offs_n,
    offs_m,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    step_begin,
    step_end,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_M] = T[offs_n, k] . X[offs_m, k] over k-steps [step_begin, step_end).

    Rows past N or M are read wrapped (their results are never stored). Columns past K: the
    weight holds value 0 up to the 128-column group end; x is masked to 0.
    """
    c, byte, shift = _group_columns(BLOCK_K)
    rows_n = offs_n % N
    rows_m = offs_m % M
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + byte[None, :]
    x_ptrs = x_ptr + rows_m[None, :] * stride_xm + c[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for step in range(step_begin, step_end):
        k0 = step * BLOCK_K
        if EVEN_K:
            p = tl.load(w_ptrs + step * (BLOCK_K // 4))
            xt = tl.load(x_ptrs + k0)
        else:
            k_ok = (k0 + c) < K
            p = tl.load(w_ptrs + step * (BLOCK_K // 4), mask=k_ok[None, :], other=PAD_BYTE)
            xt = tl.load(x_ptrs + k0, mask=k_ok[:, None], other=0.0)
        w = _unpack(p, shift[None, :], xt.dtype)
        if xt.dtype == tl.float8e4nv:
            # fp8 tensor cores accumulate with reduced precision: promote to fp32 after every
            # step (the large-M path's cuBLAS GEMM uses the fast mode; see triton_linear.py).
            acc = tl.dot(w, xt, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(w, xt, acc)
    return acc


@triton.jit
def _epilogue(
    acc,
    offs_n,
    offs_m,
    M,
    N,
    scale_ptr,
    token_scale_ptr,
    bias_ptr,
    xd_ptr,
    up_ptr,
    rank,
    stride_xdm,
    stride_upn,
    lora_scale,
    HAS_TOKEN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
):
    """acc * row scale (* token scale) + bias + lora_scale * up . xd, all in fp32."""
    n_ok = offs_n < N
    m_ok = offs_m < M
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    if HAS_TOKEN_SCALE:
        acc = acc * tl.load(token_scale_ptr + offs_m, mask=m_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if LORA_BLOCK > 0:
        r = tl.arange(0, LORA_BLOCK)
        r_ok = r < rank
        up = tl.load(
            up_ptr + offs_n[:, None] * stride_upn + r[None, :],
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        xd_t = tl.load(
            xd_ptr + offs_m[None, :] * stride_xdm + r[:, None],
            mask=m_ok[None, :] & r_ok[:, None],
            other=0.0,
        )
        acc += lora_scale * tl.dot(up, xd_t)
    return acc


@triton.jit
def _store_transposed(ptr, tile, offs_n, offs_m, M, N, stride_m):
    """Store a [BLOCK_N, BLOCK_M] tile into a row-major [M, N] matrix."""
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(ptr + offs_m[None, :] * stride_m + offs_n[:, None], tile, mask=mask)


@triton.jit
def ternary_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    token_scale_ptr,
    bias_ptr,
    xd_ptr,
    up_ptr,
    M,
    N,
    K,
    rank,
    stride_xm,
    stride_wn,
    stride_om,
    stride_xdm,
    stride_upn,
    lora_scale,
    HAS_TOKEN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """y = (x T^T) * s (* token scale) + bias + LoRA; with SPLIT_K > 1 each k-slice instead
    writes raw fp32 partial sums to out[pid_k] (finished by splitk_epilogue_kernel)."""
    offs_n, offs_m = _tile_offsets(M, N, BLOCK_N, BLOCK_M)
    steps = tl.cdiv(K, BLOCK_K)
    if SPLIT_K == 1:
        step_begin = 0
        step_end = steps
    else:
        per_split = tl.cdiv(steps, SPLIT_K)
        step_begin = tl.program_id(1) * per_split
        step_end = tl.minimum(step_begin + per_split, steps)
    acc = _ternary_tile(
        x_ptr, w_ptr, offs_n, offs_m, M, N, K, stride_xm, stride_wn, step_begin, step_end,
        BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K,
    )  # fmt: skip
    if SPLIT_K == 1:
        y = _epilogue(
            acc, offs_n, offs_m, M, N, scale_ptr, token_scale_ptr, bias_ptr, xd_ptr, up_ptr,
            rank, stride_xdm, stride_upn, lora_scale, HAS_TOKEN_SCALE, HAS_BIAS, LORA_BLOCK,
        )  # fmt: skip
        _store_transposed(out_ptr, y.to(out_ptr.dtype.element_ty), offs_n, offs_m, M, N, stride_om)
    else:
        part_ptr = out_ptr + tl.program_id(1).to(tl.int64) * M * N
        _store_transposed(part_ptr, acc, offs_n, offs_m, M, N, N)


@triton.jit
def ternary_gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    token_scale_ptr,
    bias_ptr,
    xd_ptr,
    up_ptr,
    M,
    N,
    K,
    rank,
    stride_xm,
    stride_wn,
    stride_om,
    stride_xdm,
    stride_upn,
    lora_scale,
    HAS_TOKEN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_BYTES: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """One token (M == 1) on tensor cores, the token padded to a [K, 16] operand of zeros.

    The padding wastes tensor-core work, which is idle here anyway; the MACs leave the ALUs,
    and with USE_ASM (compiled GPUs) _unpack_plane_asm unpacks two weights in ~2.5
    instructions: the loop runs ~2-2.5 SASS instructions per weight (sm_90a) where
    unpack-and-FMA on CUDA cores took ~6.5. Products are exact (ternary times fp16 / bf16),
    sums fp32. Each step reads BLOCK_BYTES bytes of BLOCK_N rows (EVEN_BYTES: the packed row
    width is a multiple of BLOCK_BYTES) and runs one dot per 2-bit plane against the
    matching 32-column slices of x. With SPLIT_K == 1 the epilogue runs here; otherwise
    out[pid_k] gets fp32 partial sums (finished by splitk_epilogue_kernel). stride_xm is
    unused (one row).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, 1)
    b = tl.arange(0, BLOCK_BYTES)
    group_start = (b // GROUP_BYTES) * GROUP
    col = group_start + b % GROUP_BYTES  # column of plane 0 held by byte b
    token = tl.arange(0, 16)
    w_ptrs = w_ptr + (offs_n % N)[:, None] * stride_wn + b[None, :]
    # fp8 codes (A8) are exact in bf16; fp16 keeps its own dtype (more mantissa than bf16)
    dot_dtype = tl.float16 if x_ptr.dtype.element_ty == tl.float16 else tl.bfloat16
    steps = tl.cdiv(K, 4 * BLOCK_BYTES)
    per_split = tl.cdiv(steps, SPLIT_K)
    step_begin = tl.program_id(1) * per_split
    step_end = tl.minimum(step_begin + per_split, steps)
    acc = tl.zeros((BLOCK_N, 16), tl.float32)
    for step in range(step_begin, step_end):
        k0 = step * 4 * BLOCK_BYTES
        if EVEN_BYTES:  # no mask: a masked load's fill value costs a select per byte
            p = tl.load(w_ptrs + step * BLOCK_BYTES)
        else:
            p = tl.load(
                w_ptrs + step * BLOCK_BYTES, mask=(k0 + group_start < K)[None, :], other=PAD_BYTE
            )
        for plane in tl.static_range(4):
            k = k0 + col + PLANE * plane
            x_mask = (k < K)[:, None] & (token == 0)[None, :]
            xt = tl.load(x_ptr + k[:, None] + token[None, :] * 0, mask=x_mask, other=0.0)
            if USE_ASM:
                w = _unpack_plane_asm(p, plane, dot_dtype)
            else:
                w = _unpack(p, 2 * plane, dot_dtype)
            acc = tl.dot(w, xt.to(dot_dtype), acc)
    y = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]: only token column 0 is nonzero
    if SPLIT_K == 1:
        y = _small_epilogue(
            y, offs_n, offs_m, M, N, scale_ptr, token_scale_ptr, bias_ptr, xd_ptr, up_ptr,
            rank, stride_xdm, stride_upn, lora_scale, HAS_TOKEN_SCALE, HAS_BIAS, LORA_BLOCK,
        )  # fmt: skip
        _store_transposed(out_ptr, y.to(out_ptr.dtype.element_ty), offs_n, offs_m, M, N, stride_om)
    else:
        part_ptr = out_ptr + tl.program_id(1).to(tl.int64) * N
        _store_transposed(part_ptr, y, offs_n, offs_m, M, N, N)


@triton.jit
def _small_epilogue(
    acc,
    offs_n,
    offs_m,
    M,
    N,
    scale_ptr,
    token_scale_ptr,
    bias_ptr,
    xd_ptr,
    up_ptr,
    rank,
    stride_xdm,
    stride_upn,
    lora_scale,
    HAS_TOKEN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
):
    """_epilogue for tiles too small for tensor cores: the LoRA product as a broadcast sum."""
    acc = _epilogue(
        acc, offs_n, offs_m, M, N, scale_ptr, token_scale_ptr, bias_ptr, xd_ptr, up_ptr,
        rank, stride_xdm, stride_upn, lora_scale, HAS_TOKEN_SCALE, HAS_BIAS, 0,
    )  # fmt: skip
    if LORA_BLOCK > 0:
        r = tl.arange(0, LORA_BLOCK)
        r_ok = r < rank
        n_ok = offs_n < N
        m_ok = offs_m < M
        up = tl.load(
            up_ptr + offs_n[:, None] * stride_upn + r[None, :],
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        xd = tl.load(
            xd_ptr + offs_m[:, None] * stride_xdm + r[None, :],
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += lora_scale * tl.sum(up[:, None, :] * xd[None, :, :], axis=2)
    return acc


@triton.jit
def splitk_epilogue_kernel(
    part_ptr,
    out_ptr,
    scale_ptr,
    token_scale_ptr,
    bias_ptr,
    xd_ptr,
    up_ptr,
    M,
    N,
    rank,
    stride_om,
    stride_xdm,
    stride_upn,
    lora_scale,
    HAS_TOKEN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Sum the SPLIT_K fp32 partial products, then the same epilogue as ternary_mm_kernel."""
    offs_n, offs_m = _tile_offsets(M, N, BLOCK_N, BLOCK_M)
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    ptrs = part_ptr + offs_m[None, :] * N + offs_n[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(ptrs + split * M * N, mask=mask, other=0.0)
    y = _epilogue(
        acc, offs_n, offs_m, M, N, scale_ptr, token_scale_ptr, bias_ptr, xd_ptr, up_ptr,
        rank, stride_xdm, stride_upn, lora_scale, HAS_TOKEN_SCALE, HAS_BIAS, LORA_BLOCK,
    )  # fmt: skip
    _store_transposed(out_ptr, y.to(out_ptr.dtype.element_ty), offs_n, offs_m, M, N, stride_om)


@triton.jit
def scale_grad_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    token_scale_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_dym,
    HAS_TOKEN_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """part[m_tile, n] = sum over the tile's tokens of dy[m, n] * (x T^T)[m, n].

    Recomputes x T^T tile by tile instead of saving it in the forward pass: no [M, N]
    buffer, one extra GEMM (the cost of a dense linear's weight gradient). Partial sums per
    token tile keep the reduction deterministic.
    """
    offs_n, offs_m = _tile_offsets(M, N, BLOCK_N, BLOCK_M)
    acc = _ternary_tile(
        x_ptr, w_ptr, offs_n, offs_m, M, N, K, stride_xm, stride_wn, 0, tl.cdiv(K, BLOCK_K),
        BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K,
    )  # fmt: skip
    m_ok = offs_m < M
    n_ok = offs_n < N
    if HAS_TOKEN_SCALE:
        acc = acc * tl.load(token_scale_ptr + offs_m, mask=m_ok, other=0.0)[None, :]
    dy_t = tl.load(
        dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None],
        mask=n_ok[:, None] & m_ok[None, :],
        other=0.0,
    )
    part = tl.sum(acc * dy_t.to(tl.float32), axis=1)
    tl.store(part_ptr + (tl.program_id(0) // tl.cdiv(N, BLOCK_N)) * N + offs_n, part, mask=n_ok)


@triton.jit
def ternary_dx_kernel(
    dy_ptr,
    w_ptr,
    scale_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_wn,
    stride_dxm,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """dx = dy (T * s): tiles dx^T[k, m] = sum_n (s T)^T[k, n] . dy^T[n, m].

    The scaled weight s[n] * T[n, k] is rounded once to dy's dtype in registers (no dense
    weight in memory); the reduction runs over N in fp32.
    """
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k0 = (pid % k_tiles) * BLOCK_K
    offs_m = (pid // k_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    c, byte, shift = _group_columns(BLOCK_K)
    n = tl.arange(0, BLOCK_N)
    w_ptrs = w_ptr + n[None, :] * stride_wn + (k0 // 4 + byte)[:, None]
    dy_ptrs = dy_ptr + (offs_m % M)[None, :] * stride_dym + n[:, None]
    acc = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        if EVEN_N:
            p = tl.load(w_ptrs + n0 * stride_wn)
            s = tl.load(scale_ptr + n0 + n)
            dy_t = tl.load(dy_ptrs + n0)
        else:
            n_ok = (n0 + n) < N
            p = tl.load(w_ptrs + n0 * stride_wn, mask=n_ok[None, :], other=PAD_BYTE)
            s = tl.load(scale_ptr + n0 + n, mask=n_ok, other=0.0)
            dy_t = tl.load(dy_ptrs + n0, mask=n_ok[:, None], other=0.0)
        w = (_unpack(p, shift[:, None], tl.float32) * s[None, :]).to(dy_t.dtype)
        acc = tl.dot(w, dy_t, acc)
    offs_k = k0 + c
    mask = (offs_k[:, None] < K) & (offs_m[None, :] < M)
    ptrs = dx_ptr + offs_m[None, :] * stride_dxm + offs_k[:, None]
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def unpack_dense_kernel(
    w_ptr,
    scale_ptr,
    up_ptr,
    down_ptr,
    out_ptr,
    N,
    K,
    rank,
    stride_wn,
    stride_upn,
    stride_downr,
    stride_on,
    lora_scale,
    HAS_SCALE: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[N, K] = T (* s per row) (+ lora_scale * up . down), rounded once to out's dtype.

    A transient scratch weight for large token counts, where cuBLAS on a dense operand beats
    the fused kernel; the LoRA product is merged here so the GEMM needs no second branch.
    """
    _unpack_tile(
        tl.program_id(0), w_ptr, scale_ptr, up_ptr, down_ptr, out_ptr, N, K, rank, stride_wn,
        stride_upn, stride_downr, stride_on, lora_scale, HAS_SCALE, LORA_BLOCK, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _unpack_tile(
    pid,
    w_ptr,
    scale_ptr,
    up_ptr,
    down_ptr,
    out_ptr,
    N,
    K,
    rank,
    stride_wn,
    stride_upn,
    stride_downr,
    stride_on,
    lora_scale,
    HAS_SCALE: tl.constexpr,
    LORA_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile ``pid`` of unpack_dense_kernel."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_n = (pid // k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = (pid % k_tiles) * BLOCK_K
    c, byte, shift = _group_columns(BLOCK_K)
    n_ok = offs_n < N
    k_ok = (k0 + c) < K
    p = tl.load(
        w_ptr + offs_n[:, None] * stride_wn + (k0 // 4 + byte)[None, :],
        mask=n_ok[:, None],
        other=PAD_BYTE,
    )
    w = _unpack(p, shift[None, :], tl.float32)
    if HAS_SCALE:
        w = w * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    if LORA_BLOCK > 0:
        r = tl.arange(0, LORA_BLOCK)
        r_ok = r < rank
        up = tl.load(
            up_ptr + offs_n[:, None] * stride_upn + r[None, :],
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        down = tl.load(
            down_ptr + r[:, None] * stride_downr + (k0 + c)[None, :],
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w += lora_scale * tl.dot(up, down)
    ptrs = out_ptr + offs_n[:, None] * stride_on + (k0 + c)[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _round_to_e4m3(v):
    """Round float32 |v| <= 448 to the nearest fp8 e4m3 value (ties to even), in float32.

    Adding and removing 1.5 * 2**(e + 20) leaves v on multiples of its e4m3 spacing 2**(e - 3)
    (2**-9 below 2**-6, the subnormals). The codes then convert exactly to fp8 or bf16:
    the same kernel serves GPUs without fp8 and the interpreter, whose own fp32->fp8
    rounding is wrong at binade edges (Triton 3.9).
    """
    exponent = tl.maximum((v.to(tl.uint32, bitcast=True) >> 23) & 0xFF, 121)
    magic = ((exponent + 20) << 23 | 0x400000).to(tl.float32, bitcast=True)
    return (v + magic) - magic


@triton.jit
def quantize_fp8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    """Per-token fp8 e4m3: scale = max|x| / 448, q = x * (1 / scale) (as the reference).

    Launched with fp fusion off: x * (1 / scale) must round before the e4m3 rounding adds.

    q is stored as fp8 or, for GPUs without fp8 tensor cores, as the same values in bf16.
    One program per token; a row that fits in BLOCK_K stays in registers (one read of x).
    """
    _quantize_row(
        tl.program_id(0).to(tl.int64), x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
        BLOCK_K, ONE_PASS,
    )  # fmt: skip


@triton.jit
def _quantize_row(
    row,
    x_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    """Row ``row`` of quantize_fp8_kernel."""
    cols = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if ONE_PASS:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax = tl.max(amax, axis=0)
    scale = tl.div_rn(tl.maximum(amax, 1e-12), 448.0)
    tl.store(scale_ptr + row, scale)
    inverse = tl.div_rn(1.0, scale)  # one division per row: a division per element halves the speed
    if ONE_PASS:
        q = _round_to_e4m3(x * inverse)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
            q = _round_to_e4m3(x * inverse)
            tl.store(q_row + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=(k0 + cols) < K)


@triton.jit
def quantize_and_unpack_kernel(
    x_ptr,
    q_ptr,
    token_scale_ptr,
    w_ptr,
    codes_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qm,
    stride_wn,
    stride_cn,
    QUANT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The two inputs of the 8-bit dense path in one launch: programs [0, M) quantize one
    token each (quantize_fp8_kernel, one pass), the rest unpack one tile each of the fp8
    ternary scratch (unpack_dense_kernel without scale or LoRA). Two independent jobs, one
    launch: the Python launcher costs about 40 us a launch on the H200 host."""
    pid = tl.program_id(0)
    if pid < M:
        _quantize_row(
            pid.to(tl.int64), x_ptr, q_ptr, token_scale_ptr, K, stride_xm, stride_qm,
            QUANT_BLOCK, True,
        )  # fmt: skip
    else:
        _unpack_tile(
            pid - M, w_ptr, w_ptr, w_ptr, w_ptr, codes_ptr, N, K, 0, stride_wn, 0, 0, stride_cn,
            0.0, False, 0, BLOCK_N, BLOCK_K,
        )  # fmt: skip
