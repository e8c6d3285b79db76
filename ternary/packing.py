"""Storage layouts of ternary weights, by name: ``2bit`` and ``base3``.

* ``2bit`` is the kernels' compute layout (kernels/layout.py owns it): 4 values per byte.
* ``base3`` is the storage layout, 1.6 bits per value. Five values per byte:
  ``byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4`` with ``c_i = t[n, 5 j + i] + 1``, stored as
  ``uint8 [N, ceil(K / 5)]``; columns past K are coded 1. About 20 % smaller than ``2bit``;
  converted to ``2bit`` when a file is loaded. Bytes above 242 (= 3**5 - 1) never occur.
"""

from __future__ import annotations

import torch

from ..kernels.layout import check_ternary, pack_2bit, packed_width, unpack_2bit

TRITS_PER_BYTE = 5
BASE3_MAX_BYTE = 3**TRITS_PER_BYTE - 1
PACKINGS = ("2bit", "base3")


def packed_shape(packing: str, out_features: int, in_features: int) -> tuple[int, int]:
    """Physical shape of a packed [out_features, in_features] ternary matrix."""
    if packing == "2bit":
        return out_features, packed_width(in_features)
    if packing == "base3":
        return out_features, -(-in_features // TRITS_PER_BYTE)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def pack_base3(t: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in {-1, 0, 1} of shape [N, K] into the ``base3`` layout."""
    check_ternary(t)
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
    if bool((packed > BASE3_MAX_BYTE).any()):
        raise ValueError(f"base3 byte above {BASE3_MAX_BYTE}: the data is corrupt")
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
