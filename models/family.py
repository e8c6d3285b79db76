"""What the pack needs to know of a model family: the :class:`Family` record, and helpers
the family modules share (random weights, block counting). The list of families is in
models/registry.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Shapes = Mapping[str, tuple[int, ...]]


class ModelFamilyError(ValueError):
    """The weights are not a model of the family asked for, or of any family the pack knows;
    the message says what was found."""


@dataclass(frozen=True)
class Family:
    """What the pack needs to know of one model family, in its own (BFL / ComfyUI) key names.

    ``claims`` is a cheap look at the keys that only this family has; ``detect`` reads the
    full configuration from the logical shapes (ternary weights as [N, K]) and raises
    ModelFamilyError naming what does not fit. ``is_ternary`` says which linear (module
    name, without ``.weight``) becomes ternary: the linears inside the transformer blocks.
    """

    name: str  # the file header's ``architecture``
    title: str  # for people: "FLUX.1"
    claims: Callable[[Shapes], bool]
    detect: Callable[[Shapes], Any]
    is_ternary: Callable[[str], bool]
    shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # config -> every tensor's shape
    describe: Callable[[Any], str]  # config -> one line for reports
    latent_channels: Callable[[Any], int]
    presets: Mapping[str, Any]  # named configurations (full sizes, tiny test models)


def random_weights(
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    ones: Callable[[str], bool] = lambda key: key.endswith(".scale"),
) -> dict[str, torch.Tensor]:
    """Weights drawn from a seed for tests and benchmarks (nothing is ever downloaded).

    Matrices are N(0, 1/fan_in) so activations keep their size through the blocks, biases
    are small, and norm weights (``ones``) are 1.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if ones(key):
            tensor = torch.ones(shape, device=device)
        elif key.endswith(".bias") or len(shape) == 1:
            tensor = 0.02 * torch.randn(shape, generator=gen, device=device)
        else:
            tensor = torch.randn(shape, generator=gen, device=device) / shape[1] ** 0.5
        state[key] = tensor.to(dtype)
    return state


def block_indices(shapes: Shapes, prefix: str, kind: str) -> int:
    """How many blocks ``prefix.<i>.`` the keys hold, checking that none is missing.

    Bounded by the number of keys, whatever indices a (damaged) file claims.
    """
    found = set()
    for key in shapes:
        if key.startswith(f"{prefix}."):
            index = key.split(".")[1]
            if not (index.isascii() and index.isdigit()):
                raise ModelFamilyError(f"{key}: block index {index!r} is not a number")
            found.add(int(index))
    count = len(found)
    if found and max(found) != count - 1:
        gaps = [i for i in range(min(max(found), count + 4)) if i not in found][:4]
        raise ModelFamilyError(f"not a complete model: {kind} blocks {gaps} are missing")
    return count
