"""The ``2bit`` layout: how a ternary matrix lies in memory for the kernels.

A ternary matrix T [N, K] with values in {-1, 0, +1} is stored as
``uint8 [N, ceil(K / 128) * 32]``. Each value is coded ``c = t + 1`` (0, 1 or 2; code 3 never
occurs). K is cut into groups of 128 columns; group g owns the 32 bytes ``[32 g, 32 g + 32)``
of its row, and byte ``32 g + b`` (b = 0..31) holds, from the least significant bits up::

    bits 0-1: c[n, 128 g +  0 + b]
    bits 2-3: c[n, 128 g + 32 + b]
    bits 4-5: c[n, 128 g + 64 + b]
    bits 6-7: c[n, 128 g + 96 + b]

Columns past K are coded 1 (value 0), so a kernel may read whole groups without masks on
the weight; a masked load fills with :data:`PAD_BYTE` for the same reason. Why this shape:
one contiguous 32-byte load per row and group yields, with a shift and a mask, four
[rows, 32] tiles that each match a contiguous 32-column slice of the activations, so a
tensor-core kernel needs no gather or interleave.

This module is the layout's one owner: the Triton kernels take GROUP, GROUP_BYTES and
PAD_BYTE from here.
"""

from __future__ import annotations

import torch

GROUP = 128  # columns per group
GROUP_BYTES = GROUP // 4  # bytes per group and row: four 2-bit planes of 32 columns
PAD_BYTE = 0x55  # four codes 1: the value 0 in every plane


def packed_width(in_features: int) -> int:
    """Bytes per row of a 2bit-packed matrix with ``in_features`` columns."""
    return -(-in_features // GROUP) * GROUP_BYTES


def check_ternary(t: torch.Tensor) -> None:
    """Raise unless ``t`` is a 2-D int8 matrix of values in {-1, 0, 1}."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D ternary matrix, got shape {tuple(t.shape)}")
    if t.dtype != torch.int8:
        raise TypeError(f"expected int8 ternary values, got {t.dtype}")
    if t.numel() and bool(((t < -1) | (t > 1)).any()):
        raise ValueError("ternary values must be -1, 0 or 1")


def check_packed(packed: torch.Tensor, in_features: int) -> int:
    """Raise unless ``packed`` is a row-contiguous 2bit matrix for ``in_features``; returns N."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1:
        raise ValueError(
            f"weight must be a row-contiguous 2bit-packed uint8 matrix, got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    if packed.shape[1] != packed_width(in_features):
        raise ValueError(
            f"packed weight width {packed.shape[1]} does not fit in_features={in_features} "
            f"(expected {packed_width(in_features)})"
        )
    return packed.shape[0]


def invalid_code_bytes(packed: torch.Tensor) -> int:
    """How many bytes hold a 2-bit field of code 3, which no ternary value has (0 if valid)."""
    return int((packed & (packed >> 1) & 0x55).count_nonzero())


def pack_2bit(t: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in {-1, 0, 1} of shape [N, K] into the 2bit layout."""
    check_ternary(t)
    n, k = t.shape
    groups = -(-k // GROUP)
    codes = torch.ones(n, groups * GROUP, dtype=torch.uint8, device=t.device)
    codes[:, :k] = (t + 1).to(torch.uint8)
    codes = codes.view(n, groups, 4, GROUP_BYTES)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.reshape(n, groups * GROUP_BYTES)


def unpack_2bit(
    packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8
) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: [N, K] values in {-1, 0, 1} as ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % GROUP_BYTES:
        raise ValueError(f"not a 2bit-packed matrix: {packed.dtype} {tuple(packed.shape)}")
    n, width = packed.shape
    groups = width // GROUP_BYTES
    if not (groups - 1) * GROUP < in_features <= groups * GROUP:
        raise ValueError(f"packed width {width} does not fit in_features={in_features}")
    p = packed.view(n, groups, 1, GROUP_BYTES)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    codes = (p >> shifts) & 3
    return (codes.reshape(n, groups * GROUP)[:, :in_features].to(dtype)) - 1
