"""Model families: detection from shapes is bounded by what the weights hold, and every
tensor of a FLUX.1 model is checked against the configuration read from its embedders."""

import time

import pytest

from comfyui_ternary_flux.models.family import ModelFamilyError, block_indices
from comfyui_ternary_flux.models.flux1 import (
    TINY_FLUX,
    NotFluxError,
    detect_config,
    flux_shapes,
)
from comfyui_ternary_flux.models.registry import detect_family, family_named


def test_block_count_is_bounded_by_the_keys_not_by_the_indices():
    shapes = {"double_blocks.0.a": (1,), "double_blocks.1000000000000.a": (1,)}
    start = time.perf_counter()
    with pytest.raises(ModelFamilyError, match=r"double blocks \[1, 2, 3, 4\] are missing"):
        block_indices(shapes, "double_blocks", "double")
    assert time.perf_counter() - start < 0.1
    assert block_indices({"single_blocks.1.a": (1,), "single_blocks.0.b": (1,)}, "single_blocks",
                         "single") == 2  # fmt: skip


@pytest.mark.parametrize("index", ["x", "-1", "1e9", "\u0661", ""])
def test_block_indices_must_be_ascii_numbers(index):
    with pytest.raises(ModelFamilyError, match="is not a number"):
        block_indices({f"double_blocks.{index}.a": (1,)}, "double_blocks", "double")


def test_every_tensor_is_checked_against_the_detected_size():
    shapes = flux_shapes(TINY_FLUX)
    assert detect_config(shapes) == TINY_FLUX
    # A file claiming hidden 65536 in its embedders but holding tiny blocks.
    claims = dict(shapes, **{"img_in.weight": (65536, 64)})
    with pytest.raises(NotFluxError, match=r"img_in.bias has shape \[256\], expected \[65536\]"):
        detect_config(claims)
    short = dict(shapes)
    del short["single_blocks.1.linear2.bias"]
    with pytest.raises(NotFluxError, match="single_blocks.1.linear2.bias is missing"):
        detect_config(short)


def test_families_are_found_by_name_and_by_shape():
    family, config = detect_family(flux_shapes(TINY_FLUX))
    assert family is family_named("flux") and config == TINY_FLUX
    with pytest.raises(ModelFamilyError, match="unknown model family 'sd3'"):
        family_named("sd3")
