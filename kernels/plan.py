"""The one place that decides how a ternary linear runs: path and launch candidates.

Paths:

* ``reference``: the pure-torch implementation (kernels/reference.py). CPU, MPS, ROCm, GPUs
  older than sm_80, float64, no Triton installed, or ``TERNARY_FLUX_BACKEND=reference``.
* ``gemv``: one token, the Triton GEMV that reads the 2-bit weight (memory-bound).
* ``fused``: a few tokens, the fused Triton tensor-core kernel that reads the 2-bit weight,
  with scales, bias and LoRA in its epilogue. Also float32 inputs at any size (two bf16
  passes, see kernels/triton_launch.py).
* ``dense``: many tokens (compute-bound): the layer is unpacked into a transient dense scratch
  weight (s T with the LoRA merged for 16-bit activations, fp8 T for 8-bit) and cuBLAS
  multiplies. One layer is dense at a time.

GPUs of a family with measured tables (kernels/tuning.py) get its candidates. A GPU of no
known family (Blackwell and later) gets the stated conservative plan, never another
family's table: ``dense`` at every token count for fp16 / bf16 (the unpack kernel has one
fixed, portable tile; cuBLAS does the rest), and ``reference`` for float32 and for 8-bit
activations that fp8 cuBLAS cannot take. Under ``TRITON_INTERPRET=1`` (CPU tests) the
interpreter's small tiles are used and ``dense`` is never chosen unless a test asks for it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import tuning
from .device import fp8_tensor_cores, interpreting, requested_backend, triton_capable

PATHS = ("reference", "gemv", "fused", "dense")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Plan(NamedTuple):
    """How one product runs: the path, the tuning family, and the kernel's launch candidates
    (timed once per shape by the launcher; empty where the path launches no tuned kernel)."""

    path: str
    family: str | None
    configs: tuple = ()


def backend(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' or 'reference' for tensors of this device and dtype."""
    requested = requested_backend()
    if requested == "reference" or dtype not in TRITON_DTYPES:
        return "reference"
    if requested == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"TERNARY_FLUX_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1"
            )
        return "triton"
    return "triton" if triton_capable(device) else "reference"


def family_of(device: torch.device) -> str | None:
    """The tuning family of a device ('interpreter' under TRITON_INTERPRET=1)."""
    if interpreting():
        return "interpreter"
    from .device import device_capability

    return tuning.gpu_family(device_capability(device))


def dense_sizes_fit(n: int, k: int, act_bits: int) -> bool:
    """The dense path's GEMM takes these sizes: fp8 rowwise cuBLAS needs K and N multiples of
    16 (16-bit cuBLAS takes any)."""
    return act_bits == 16 or (k % 16 == 0 and n % 16 == 0)


def _dense_capable(dtype: torch.dtype, act_bits: int, device: torch.device) -> bool:
    """The dense path's GEMM runs these inputs: 16-bit for 16-bit activations; bf16 on fp8
    tensor cores for 8-bit ones (fp8 rowwise cuBLAS, bf16 out). float32 never."""
    if act_bits == 16:
        return dtype != torch.float32
    return dtype == torch.bfloat16 and fp8_tensor_cores(device)


def plan_linear(
    m: int, n: int, k: int, dtype: torch.dtype, act_bits: int, device: torch.device
) -> Plan:
    """The forward plan of an [m, k] x [n, k]^T ternary product (cached: the host budget of
    a layer is a few tens of microseconds)."""
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits}")
    return _plan_linear(m, n, k, dtype, act_bits, device, requested_backend(), interpreting())


@functools.lru_cache(maxsize=4096)
def _plan_linear(m, n, k, dtype, act_bits, device, requested, interpreter) -> Plan:
    if backend(device, dtype) == "reference":
        return Plan("reference", None)
    return _plan_for_family(m, n, k, dtype, act_bits, device, family_of(device))


def _plan_for_family(m, n, k, dtype, act_bits, device, family) -> Plan:
    dense_ok = dense_sizes_fit(n, k, act_bits) and _dense_capable(dtype, act_bits, device)
    if family is None:  # no measured tables: the conservative plan
        return Plan("dense" if dense_ok else "reference", None)
    if dense_ok and m >= tuning.DENSE_MIN_TOKENS[family]:
        return Plan("dense", family)
    if m <= tuning.GEMV_MAX_TOKENS:
        configs = (tuning.INTERPRETER_GEMV,) if family == "interpreter" else None
        return Plan("gemv", family, configs or tuple(tuning.GEMV_TABLES[family]))
    if family == "interpreter":
        return Plan("fused", family, (tuning.INTERPRETER_MATMUL,))
    width = "a8" if act_bits == 8 and fp8_tensor_cores(device) else "a16"
    return Plan("fused", family, tuple(tuning.MATMUL_TABLES[family][width][tuning.m_bucket(m)]))


def dense_min_tokens(device: torch.device, dtype: torch.dtype, act_bits: int) -> int:
    """Tokens from which the forward takes the ``dense`` path on this device and dtype, for
    a layer whose sizes fit (:func:`dense_sizes_fit`); -1 for never. What torch.compile asks
    at trace time, when the token count may be symbolic (plan_linear gives the same answer)."""
    if backend(device, dtype) == "reference" or not _dense_capable(dtype, act_bits, device):
        return -1
    family = family_of(device)
    return 0 if family is None else tuning.DENSE_MIN_TOKENS[family]


def plan_input_grad(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> Plan:
    """The plan of dx = dy (T s) for dy [m, n]: the Triton dx kernel, or a dense scratch."""
    if backend(device, dtype) == "reference":
        return Plan("reference", None)
    family = family_of(device)
    if family is None:
        return Plan("dense" if dtype != torch.float32 else "reference", None)
    if dtype != torch.float32 and m >= tuning.DENSE_MIN_TOKENS[family]:
        return Plan("dense", family)
    if family == "interpreter":
        return Plan("fused", family, (tuning.INTERPRETER_DX,))
    return Plan("fused", family, tuple(tuning.DX_TABLES[family][tuning.m_bucket(m)]))


def plan_scale_grad(
    m: int, n: int, k: int, dtype: torch.dtype, act_bits: int, device: torch.device
) -> Plan:
    """The plan of d scale = sum over tokens of dy * (x T^T) for x of ``dtype``: the Triton
    kernel (one candidate without split-K from the forward table), or the reference."""
    if backend(device, dtype) == "reference":
        return Plan("reference", None)
    family = family_of(device)
    if family is None:
        return Plan("reference", None)
    if family == "interpreter":
        return Plan("fused", family, (tuning.INTERPRETER_MATMUL,))
    width = "a8" if act_bits == 8 and fp8_tensor_cores(device) else "a16"
    table = tuning.MATMUL_TABLES[family][width][tuning.m_bucket(m)]
    config = next((c for c in table if c.split_k == 1), tuning.INTERPRETER_MATMUL)
    return Plan("fused", family, (config,))


def clear_cache() -> None:
    """Forget cached plans (after a test changed a table)."""
    _plan_linear.cache_clear()
