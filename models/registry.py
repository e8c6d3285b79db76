"""The model families this pack knows, and how a file or a set of weights finds its family.

A family is one :class:`~.family.Family` made by one module of models/ and listed in
:data:`FAMILIES`. The ternary format names the family of a file in its ``architecture``
field; readers look it up with :func:`family_named`, and sources without a name (a dense
model to quantize) are matched by :func:`detect_family`. Adding a family means adding one
module and one entry to that list.
"""

from __future__ import annotations

from typing import Any

from . import chroma, flux1, flux2
from .family import Family, ModelFamilyError, Shapes

FAMILIES: tuple[Family, ...] = (flux1.FAMILY, flux2.FAMILY, chroma.FAMILY)


def supported() -> str:
    return ", ".join(f"{f.title} ({f.name})" for f in FAMILIES)


def family_named(name: str) -> Family:
    """The family a file's ``architecture`` names."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelFamilyError(f"unknown model family {name!r}; this pack supports {supported()}")


def detect_family(shapes: Shapes) -> tuple[Family, Any]:
    """(family, config) of weights given as {key: logical shape}, BFL / ComfyUI names."""
    claimed = [f for f in FAMILIES if f.claims(shapes)]
    if not claimed:
        found = sorted({key.split(".")[0] for key in shapes})
        listed = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise ModelFamilyError(
            f"not a model this pack knows (top-level keys: {listed or 'none'}); "
            f"supported: {supported()}"
        )
    if len(claimed) > 1:
        names = ", ".join(f.title for f in claimed)
        raise ModelFamilyError(f"the weights look like several families at once ({names})")
    return claimed[0], claimed[0].detect(shapes)


def random_spec(spec: str) -> tuple[Family, str, Any, int]:
    """(family, preset name, config, seed) of ``FAMILY:PRESET[:SEED]`` (``flux2:dev``,
    ``chroma:tiny:3``): a model of seeded random weights, for tests and benchmarks."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
        raise ModelFamilyError(f"{spec!r}: expected FAMILY:PRESET or FAMILY:PRESET:SEED")
    family = family_named(parts[0])
    return family, parts[1], family.preset(parts[1]), int(parts[2]) if len(parts) == 3 else 0
