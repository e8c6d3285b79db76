"""One entry point for every ternary linear: picks the Triton kernels or the torch reference.

Triton runs on NVIDIA GPUs of compute capability 8.0+ (Ampere, Ada, Hopper) for fp16 / bf16 /
fp32 inputs; everything else (CPU, MPS, ROCm, older GPUs, float64) takes the reference.
``TERNARY_FLUX_BACKEND=reference`` forces the reference path (for comparisons).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .reference import ternary_linear_reference

BACKENDS = ("auto", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _requested_backend() -> str:
    backend = os.environ.get("TERNARY_FLUX_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"TERNARY_FLUX_BACKEND={backend!r}: expected one of {BACKENDS}")
    return backend


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, asked of the driver once per GPU: the query costs
    microseconds, and every ternary linear needs it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _triton_device(device: torch.device) -> bool:
    """NVIDIA GPUs of compute capability 8.0+."""
    return torch.version.hip is None and device_capability(device) >= (8, 0)


def backend_for(x: torch.Tensor) -> str:
    """Name of the path a tensor on this device would take: 'triton' or 'reference'."""
    if _requested_backend() == "reference":
        return "reference"
    if x.is_cuda and x.dtype in TRITON_DTYPES and _triton_device(x.device) and _triton_installed():
        return "triton"
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
    weight_scale, bias and the LoRA factors. ``act_bits=8`` rounds x per token to fp8 e4m3.
    """
    if backend_for(x) == "triton":
        from .triton_linear import ternary_linear_triton

        return ternary_linear_triton(
            x, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits
        )
    return ternary_linear_reference(
        x, weight, weight_scale, in_features, bias, lora_down, lora_up, lora_scale, act_bits
    )
