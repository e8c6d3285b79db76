"""Facts about the device a ternary linear runs on, asked once and cached.

``TERNARY_FLUX_BACKEND`` chooses the implementation: ``auto`` (the default: Triton on NVIDIA
GPUs of compute capability 8.0+, the torch reference elsewhere), ``reference`` (always the
torch reference, for comparisons) or ``triton`` (always Triton; on CPU tensors this needs
``TRITON_INTERPRET=1``, which is how CI tests the kernels).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")


def requested_backend() -> str:
    backend = os.environ.get("TERNARY_FLUX_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"TERNARY_FLUX_BACKEND={backend!r}: expected one of {BACKENDS}")
    return backend


def interpreting() -> bool:
    """Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, asked of the driver once per GPU: the query costs
    microseconds, and every ternary linear needs it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def triton_capable(device: torch.device) -> bool:
    """NVIDIA GPUs of compute capability 8.0+ (the kernels use bf16 tensor cores)."""
    return (
        device.type == "cuda"
        and torch.version.hip is None
        and device_capability(device) >= (8, 0)
        and triton_installed()
    )


def fp8_tensor_cores(device: torch.device) -> bool:
    """fp8 e4m3 dots: sm_89+ (and the interpreter, which emulates them)."""
    if device.type != "cuda":
        return interpreting()
    return device_capability(device) >= (8, 9)
