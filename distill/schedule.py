"""FLUX.1's resolution-dependent time shift, its Euler sampling schedule, and seeds.

FLUX samples with sigma(u) = e^mu / (e^mu + 1/u - 1), u uniform in (0, 1], where mu grows
with the number of image tokens (0.5 at 256 tokens, 1.15 at 4096 = 1024x1024 pixels). The
teacher data set and the trainer both use it, so training times match sampling times.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_TOKENS, MAX_TOKENS = 256, 4096


def resolution_shift(width: int, height: int) -> float:
    """mu for an image of width x height pixels (ComfyUI's ModelSamplingFlux / BFL rule)."""
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height}")
    tokens = (width // 16) * (height // 16)
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (tokens - BASE_TOKENS)


def shift_time(u: torch.Tensor, mu: float) -> torch.Tensor:
    """sigma(u) = e^mu / (e^mu + 1/u - 1); maps 0 to 0 and 1 to 1."""
    u = u.double()
    out = math.exp(mu) / (math.exp(mu) + (1 / u.clamp(min=1e-12) - 1))
    return torch.where(u > 0, out, torch.zeros_like(out))


def sampling_sigmas(steps: int, mu: float) -> torch.Tensor:
    """Euler schedule from 1 to 0 in ``steps`` steps: [steps + 1] float64."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), mu)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, prompt index, point index ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def seeded_normal(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 N(0, 1) noise drawn on the CPU from a seed: the same on every machine."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def seeded_uniform(seed: int, count: int) -> torch.Tensor:
    """float64 U(0, 1) values drawn on the CPU from a seed."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
