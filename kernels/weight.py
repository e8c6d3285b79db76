"""The objects a ternary linear is made of: the packed weight and the optional LoRA branch.

They travel together through every layer of the kernels (op, plan, reference, Triton), so a
new field is added in one place instead of in every signature. NamedTuples: cheap to build
per call, and torch.compile traces them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TernaryWeight(NamedTuple):
    """A ternary matrix T [N, K] in the 2bit layout (kernels/layout.py) with per-row scales.

    The layer computes ``(x T^T) * scale``; ``scale`` is float32 [N].
    """

    packed: torch.Tensor  # uint8 [N, ceil(K / 128) * 32]
    scale: torch.Tensor  # float32 [N]
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]


class LoraBranch(NamedTuple):
    """A low-rank branch ``scale * (x down^T) up^T`` beside the ternary product."""

    down: torch.Tensor  # [r, K]
    up: torch.Tensor  # [N, r]
    scale: float
