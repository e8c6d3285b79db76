"""Bit layouts of ternary weights.

Two layouts, one per job:

* ``2bit`` (compute layout, what the kernels read). A ternary matrix T [N, K] with values
  in {-1, 0, +1} is stored as ``uint8 [N, ceil(K / 128) * 32]``. Each value is coded as
  ``c = t + 1`` (0, 1 or 2; code 3 never occurs). K is cut into groups of 128 columns;
  group g owns the 32 bytes ``[32 g, 32 g + 32)`` of its row, and byte ``32 g + b``
  (b = 0..31) holds, from the least significant bits up::

      bits 0-1: c[n, 128 g +  0 + b]
      bits 2-3: c[n, 128 g + 32 + b]
      bits 4-5: c[n, 128 g + 64 + b]
      bits 6-7: c[n, 128 g + 96 + b]

  Columns past K are coded 1 (value 0), so a kernel may read whole groups without masks
  on the weight. Why this shape: one contiguous 32-byte load per row and group yields,
  with a shift and a mask, four [rows, 32] tiles that each match a contiguous 32-column
  slice of the activations, so a tensor-core kernel needs no gather or interleave.

* ``base3`` (storage layout, 1.6 bits per value). Five values per byte:
  ``byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4`` with ``c_i = t[n, 5 j + i] + 1``, stored as
  ``uint8 [N, ceil(K / 5)]``; columns past K are coded 1. About 20 % smaller than
  ``2bit``; converted to ``2bit`` when a file is loaded.
"""

from __future__ import annotations

import torch

GROUP = 128  # columns per 2-bit group
GROUP_BYTES = GROUP // 4
TRITS_PER_BYTE = 5
PACKINGS = ("2bit", "base3")


def packed_shape(packing: str, out_features: int, in_features: int) -> tuple[int, int]:
    """Physical shape of a packed [out_features, in_features] ternary matrix."""
    if packing == "2bit":
        return out_features, -(-in_features // GROUP) * GROUP_BYTES
    if packing == "base3":
        return out_features, -(-in_features // TRITS_PER_BYTE)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def _check_ternary(t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D ternary matrix, got shape {tuple(t.shape)}")
    if t.dtype != torch.int8:
        raise TypeError(f"expected int8 ternary values, got {t.dtype}")
    if t.numel() and bool(((t < -1) | (t > 1)).any()):
        raise ValueError("ternary values must be -1, 0 or 1")


def pack_2bit(t: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in {-1, 0, 1} of shape [N, K] into the ``2bit`` layout."""
    _check_ternary(t)
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


def pack_base3(t: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in {-1, 0, 1} of shape [N, K] into the ``base3`` layout."""
    _check_ternary(t)
    n, k = t.shape
    width = -(-k // TRITS_PER_BYTE)
    codes = torch.ones(n, width * TRITS_PER_BYTE, dtype=torch.int16, device=t.device)
    codes[:, :k] = t.to(torch.int16) + 1
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=t.device)
    return (codes.view(n, width, TRITS_PER_BYTE) * powers).sum(-1).to(torch.uint8)


def _base3_digits(device: torch.device) -> torch.Tensor:
    """[256, 5] table: the five base-3 digits of every byte value (rows past 242 unused)."""
    values = torch.arange(256, dtype=torch.int16, device=device)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=device)
    return ((values[:, None] // powers) % 3).to(torch.int8)


def unpack_base3(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: int8 [N, K] values in {-1, 0, 1}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"not a base3-packed matrix: {packed.dtype} {tuple(packed.shape)}")
    n, width = packed.shape
    if -(-in_features // TRITS_PER_BYTE) != width:
        raise ValueError(f"packed width {width} does not fit in_features={in_features}")
    if bool((packed > 242).any()):
        raise ValueError("base3 byte above 242: the data is corrupt")
    codes = _base3_digits(packed.device)[packed.long()].view(n, width * TRITS_PER_BYTE)
    return codes[:, :in_features] - 1


def pack(t: torch.Tensor, packing: str) -> torch.Tensor:
    """Pack a ternary int8 matrix in the named layout."""
    if packing == "2bit":
        return pack_2bit(t)
    if packing == "base3":
        return pack_base3(t)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def unpack(packed: torch.Tensor, packing: str, in_features: int) -> torch.Tensor:
    """Unpack a matrix of the named layout to int8 values in {-1, 0, 1}."""
    if packing == "2bit":
        return unpack_2bit(packed, in_features)
    if packing == "base3":
        return unpack_base3(packed, in_features)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def base3_to_2bit(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Convert storage layout to compute layout (done once, at load time)."""
    return pack_2bit(unpack_base3(packed, in_features))
