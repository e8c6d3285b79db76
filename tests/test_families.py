"""The model families without ComfyUI: detection from shapes, which layers become ternary,
the shares and file sizes at full size (from shapes alone), files of tiny random models,
unknown families, and the refusal of distillation outside FLUX.1."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_ternary_flux.cli.main import main
from comfyui_ternary_flux.distill.student import distillable, student_from_tensors
from comfyui_ternary_flux.models import chroma, flux1, flux2
from comfyui_ternary_flux.models.family import (
    ModelFamilyError,
    random_source,
    random_weights,
)
from comfyui_ternary_flux.models.files import (
    load_ternary_model,
    quantize_file,
    quantize_state_dict,
    quantize_tensors,
    ternary_layers,
)
from comfyui_ternary_flux.models.registry import FAMILIES, detect_family, random_spec
from comfyui_ternary_flux.ternary.convert import plan_entries
from comfyui_ternary_flux.ternary.fileformat import TernaryFormatError, save_ternary_file

PRESETS = [(f, name) for f in FAMILIES for name in f.presets]


def comfy_names(shapes: dict) -> dict:
    """The keys as ComfyUI's loaded model names them (RMSNorm ``*.scale`` -> ``*.weight``)."""
    return {
        (k[: -len("scale")] + "weight" if k.endswith(".scale") else k): v for k, v in shapes.items()
    }


@pytest.mark.parametrize(("family", "preset"), PRESETS, ids=lambda p: getattr(p, "name", p))
def test_every_preset_is_detected_as_its_family_only(family, preset):
    config = family.presets[preset]
    shapes = family.shapes(config)
    for names in (shapes, comfy_names(shapes)):
        assert detect_family(names) == (family, config)
        assert [f.name for f in FAMILIES if f.claims(names)] == [family.name]


def share(family, config) -> float:
    shapes = family.shapes(config)
    ternary = sum(
        math.prod(s)
        for k, s in shapes.items()
        if k.endswith(".weight") and family.is_ternary(k[: -len(".weight")])
    )
    return 100 * ternary / sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize(
    ("spec", "percent"),
    [
        ("flux:dev", 99.44),
        ("flux:schnell", 99.52),
        ("flux2:dev", 99.22),
        ("flux2:klein-4b", 98.62),
        ("flux2:klein-9b", 98.87),
        ("chroma:full", 96.70),
    ],
)
def test_share_of_parameters_quantized_at_full_size(spec, percent):
    family, _, config, _ = random_spec(spec)
    assert share(family, config) == pytest.approx(percent, abs=0.005)


def file_bytes(family, config, packing: str) -> tuple[int, int]:
    """(bf16 bytes, v1 file bytes without the header) from the shapes alone."""
    shapes = {k: (torch.bfloat16, s) for k, s in family.shapes(config).items()}
    entries = plan_entries(shapes, ternary_layers(family, shapes, 0), packing)
    size = sum(math.prod(s) * d.itemsize for d, s in entries.values())
    return sum(math.prod(s) * 2 for _, s in shapes.values()), size


@pytest.mark.parametrize(
    "spec", ["flux:dev", "flux2:dev", "flux2:klein-4b", "flux2:klein-9b", "chroma:full"]
)
def test_every_family_is_at_least_6x_smaller_than_bf16(spec):
    family, _, config, _ = random_spec(spec)
    for packing in ("2bit", "base3"):
        bf16, size = file_bytes(family, config, packing)
        assert bf16 / size >= 6.0, (packing, bf16 / size)


def test_flux2_dev_file_is_under_9_gb_with_its_global_modulation_ternary():
    bf16, size = file_bytes(flux2.FAMILY, flux2.FLUX2_DEV, "2bit")
    assert bf16 == 32_223_281_152 * 2
    assert size == 8_509_988_864  # research arithmetic: blocks + global modulation ternary
    assert file_bytes(flux2.FAMILY, flux2.FLUX2_DEV, "base3")[1] < 7.0e9


def test_which_linears_become_ternary():
    # FLUX.2: the block linears and the three global modulation linears; nothing else.
    layers = ternary_layers(
        flux2.FAMILY,
        {k: (torch.bfloat16, s) for k, s in flux2.flux2_shapes(flux2.FLUX2_DEV).items()},
        0,
    )
    assert len(layers) == 8 * 8 + 48 * 2 + 3
    assert set(flux2.GLOBAL_MODULATION) <= set(layers)
    assert not any(
        k.startswith(("txt_in", "img_in", "time_in", "guidance_in", "final")) for k in layers
    )
    # Chroma: the block linears only; the distilled guidance network stays 16-bit.
    shapes = {k: (torch.bfloat16, s) for k, s in chroma.chroma_shapes(chroma.CHROMA).items()}
    layers = ternary_layers(chroma.FAMILY, shapes, 0)
    assert len(layers) == 19 * 8 + 38 * 2
    assert not any(k.startswith("distilled_guidance_layer") for k in layers)


def test_flux2_file_round_trip_has_no_biases_and_its_global_modulation_ternary(tmp_path):
    state = random_weights(flux2.flux2_shapes(flux2.TINY_FLUX2), seed=2)
    save_file(state, tmp_path / "flux2.safetensors")
    report = quantize_file(tmp_path / "flux2.safetensors", tmp_path / "t.safetensors", lora_rank=2)
    assert report.model.startswith("FLUX.2 (dev-like), hidden 256")
    loaded = load_ternary_model(tmp_path / "t.safetensors")
    assert loaded.family is flux2.FAMILY and loaded.config == flux2.TINY_FLUX2
    assert loaded.metadata["architecture"] == "flux2"
    assert set(flux2.GLOBAL_MODULATION) <= set(loaded.layers)
    assert not any(k.endswith(".bias") for k in loaded.state_dict)
    assert torch.equal(loaded.state_dict["txt_in.weight"], state["txt_in.weight"])


def test_a_plain_fp8_file_quantizes_as_its_values_in_bf16(tmp_path):
    """torch has no isfinite for fp8 e4m3: such a source failed with NotImplementedError."""
    fp8 = torch.float8_e4m3fn
    state = random_weights(flux2.flux2_shapes(flux2.TINY_KLEIN), seed=2)
    save_file({k: v.to(fp8) for k, v in state.items()}, tmp_path / "fp8.safetensors")
    save_file({k: v.to(fp8).bfloat16() for k, v in state.items()}, tmp_path / "bf16.safetensors")
    for name in ("fp8", "bf16"):
        quantize_file(tmp_path / f"{name}.safetensors", tmp_path / f"t_{name}.safetensors", 2)
    got, expected = (load_ternary_model(tmp_path / f"t_{n}.safetensors") for n in ("fp8", "bf16"))
    assert got.state_dict.keys() == expected.state_dict.keys()
    for key, value in expected.state_dict.items():
        assert torch.equal(got.state_dict[key], value), key


def test_chroma_keeps_its_distilled_guidance_layer_16_bit(tmp_path):
    state = random_weights(chroma.chroma_shapes(chroma.TINY_CHROMA), seed=4)
    tensors, layers, report = quantize_state_dict(state)
    assert report.model.startswith("Chroma, hidden 256")
    for key, value in state.items():
        if key.startswith("distilled_guidance_layer"):
            assert torch.equal(tensors[key], value)
    save_ternary_file(tmp_path / "c.safetensors", tensors, layers, architecture="chroma")
    loaded = load_ternary_model(tmp_path / "c.safetensors")
    assert loaded.family is chroma.FAMILY and loaded.config == chroma.TINY_CHROMA


def test_streamed_random_weights_equal_the_file_path(tmp_path):
    """The benchmark's path (weights made layer by layer, never a dense file) writes what
    quantizing the same weights from a file writes."""
    shapes = flux2.flux2_shapes(flux2.TINY_KLEIN)
    save_file(random_weights(shapes, seed=5), tmp_path / "dense.safetensors")
    quantize_file(tmp_path / "dense.safetensors", tmp_path / "a.safetensors", packing="2bit")
    dense, get = random_source(shapes, seed=5)
    quantize_tensors(dense, get, tmp_path / "b.safetensors", packing="2bit")
    a = load_ternary_model(tmp_path / "a.safetensors").state_dict
    b = load_ternary_model(tmp_path / "b.safetensors").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, get = random_source(shapes, seed=5)
    with pytest.raises(RuntimeError, match="made in order"):
        get("txt_in.weight")


def test_a_file_naming_the_wrong_family_is_refused(tmp_path):
    state = random_weights(flux2.flux2_shapes(flux2.TINY_FLUX2), seed=2)
    tensors, layers, _ = quantize_state_dict(state)
    save_ternary_file(tmp_path / "f.safetensors", tensors, layers, architecture="chroma")
    with pytest.raises(TernaryFormatError, match="f.safetensors: not a Chroma diffusion model"):
        load_ternary_model(tmp_path / "f.safetensors")


def test_unknown_family_names_what_was_found_and_the_supported_families(tmp_path):
    # Chroma Radiance: FLUX-like blocks, a pixel patch embedder, NeRF blocks.
    shapes = chroma.chroma_shapes(chroma.TINY_CHROMA)
    del shapes["img_in.weight"], shapes["img_in.bias"]
    shapes["img_in_patch.weight"] = (256, 3, 16, 16)
    shapes["nerf_blocks.0.norm.scale"] = (64,)
    expected = (
        r"not a model this pack knows \(top-level keys: distilled_guidance_layer, double_blocks, "
        r"final_layer, img_in_patch, nerf_blocks, single_blocks and 1 more\); supported: "
        r"FLUX.1 \(flux\), FLUX.2 \(flux2\), Chroma \(chroma\)"
    )
    with pytest.raises(ModelFamilyError, match=expected):
        detect_family(shapes)
    save_file(random_weights(shapes), tmp_path / "radiance.safetensors")
    with pytest.raises(ModelFamilyError, match=expected):
        quantize_file(tmp_path / "radiance.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("spec", "title"), [("flux2:tiny", "FLUX.2"), ("chroma:tiny", "Chroma")])
def test_distillation_refuses_other_families_by_name(tmp_path, spec, title):
    family, _, config, _ = random_spec(spec)
    state = random_weights(family.shapes(config))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    message = f"distillation supports FLUX.1 only; {title} is not supported yet"
    with pytest.raises(ModelFamilyError, match=message):
        distillable(shapes)
    with pytest.raises(ModelFamilyError, match=message):
        student_from_tensors(shapes, state.__getitem__, lora_rank=2)
    assert distillable(flux1.flux_shapes(flux1.TINY_FLUX)) == flux1.TINY_FLUX


def test_cli_quantizes_and_describes_every_family(tmp_path, capsys):
    for spec, text in [
        ("flux:tiny-schnell:1", "FLUX.1 (schnell-like), hidden 256"),
        ("flux2:tiny-klein:2", "FLUX.2 (klein-like, no guidance embedder), hidden 256"),
        ("chroma:tiny:3", "Chroma, hidden 256"),
    ]:
        out = tmp_path / f"{spec.split(':')[0]}.safetensors"
        assert main(["quantize", "--random", spec, "-o", str(out)]) == 0
        assert f"model                   {text}" in capsys.readouterr().out
        assert main(["info", str(out)]) == 0
        info = capsys.readouterr().out
        assert text in info and "parameters (" in info
    family, _, config, seed = random_spec("flux2:tiny-klein:2")
    save_file(random_weights(family.shapes(config), seed), tmp_path / "klein.safetensors")
    assert main(["quantize", str(tmp_path / "klein.safetensors")]) == 0
    streamed = load_ternary_model(tmp_path / "flux2.safetensors").state_dict
    from_file = load_ternary_model(tmp_path / "klein-ternary.safetensors").state_dict
    assert all(torch.equal(streamed[k], from_file[k]) for k in streamed)
    assert main(["quantize", "--random", "chroma:huge"]) == 2
    assert (
        "Chroma has no preset 'huge'; choose from full, tiny-comfy, tiny" in capsys.readouterr().err
    )
