"""One entry point for every ternary linear: picks the Triton kernels or the torch reference.

``TERNARY_FLUX_BACKEND=reference`` forces the reference path (for comparisons).
"""

from __future__ import annotations

import os

import torch

from .reference import ternary_linear_reference


def backend_for(x: torch.Tensor) -> str:
    """Name of the path a tensor on this device would take: 'triton' or 'reference'."""
    if os.environ.get("TERNARY_FLUX_BACKEND") == "reference":
        return "reference"
    return "reference"


def ternary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    act_bits: int = 16,
) -> torch.Tensor:
    """y = (x T^T) * s + bias + lora_scale * (x down^T) up^T for a 2bit-packed T [N, K].

    x: [..., K] float16 / bfloat16 / float32; returns x's dtype. Differentiable in x,
    weight_scale, bias and the LoRA factors.
    """
    return ternary_linear_reference(
        x, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits
    )
