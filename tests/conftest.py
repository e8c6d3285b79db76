"""Test set-up: Triton kernels run on the CPU through the interpreter when no GPU is present."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 bit patterns as integers in tl.dot; feed
    it float32 values instead (the compiled kernels are not affected)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype.scalar.name != "bf16":
            return handle
        values = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(values, interpreter.tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_float32(a), as_float32(b), d, input_precision, None)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
