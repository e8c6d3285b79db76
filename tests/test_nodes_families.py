"""The pack's ComfyUI glue on every family, in-process: ComfyUI's own detection picks the
model class of a loaded ternary state dict, and ComfyUI's sampler gives the latents ComfyUI
gives running the dequantized model (FLUX.2 dev and klein, FLUX.1 schnell, FLUX.1 Kontext's
reference latents, Chroma); LoRA branches, the Quantize / Save / Report nodes on FLUX.2; the
distillation nodes refuse what is not FLUX.1.

Chroma cannot be narrow in ComfyUI (its detection fixes the guidance network at 3072 wide),
so it gets one small run: 1 + 1 blocks at full width, one sampling step, no LoRA.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_harness import import_comfyui
from comfyui_reference import dequantized

from comfyui_ternary_flux.models import chroma, flux1, flux2
from comfyui_ternary_flux.models.family import random_weights
from comfyui_ternary_flux.models.files import load_ternary_model, quantize_state_dict

import_comfyui()

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy_extras.nodes_edit_model import ReferenceLatent  # noqa: E402

from comfyui_ternary_flux.models.family import ModelFamilyError  # noqa: E402
from comfyui_ternary_flux.nodes.distill import (  # noqa: E402
    BuildTeacherDataset,
    DistillTernary,
    refuse_other_family_file,
)
from comfyui_ternary_flux.nodes.lora_branches import UnsupportedPatchError  # noqa: E402
from comfyui_ternary_flux.nodes.model_io import bfl_key, patcher_from_state_dict  # noqa: E402
from comfyui_ternary_flux.nodes.quantize_node import QuantizeModelToTernary  # noqa: E402
from comfyui_ternary_flux.nodes.report_node import TernaryReport, step_inputs  # noqa: E402
from comfyui_ternary_flux.nodes.save_node import SaveTernaryModel  # noqa: E402
from comfyui_ternary_flux.nodes.ternary_ops import ternary_modules  # noqa: E402

H = 256  # the tiny FLUX.1 / FLUX.2 width


def make(family, config, seed: int, lora_rank: int = 0):
    """(dense BFL state dict, ternary tensors, layers) of a random model."""
    state = random_weights(family.shapes(config), seed)
    tensors, layers, _ = quantize_state_dict(state, lora_rank=lora_rank)
    return state, tensors, layers


def conditioning(family, config, seed: int, tokens: int = 6, **extra) -> list:
    """Random conditioning of the family's shapes, as its text encoder + FluxGuidance give."""
    text = family.conditioning(config)
    gen = torch.Generator().manual_seed(seed)
    values = {"guidance": text.guidance, **extra}
    if text.pooled_dim is not None:
        values["pooled_output"] = torch.randn(1, text.pooled_dim, generator=gen)
    return [[torch.randn(1, tokens, text.context_dim, generator=gen), values]]


def ksample(patcher, positive, side: int = 64, steps: int = 2) -> torch.Tensor:
    """What KSampler does (euler / simple, cfg 1, denoise 1) from an empty latent."""
    latent_format = patcher.model.latent_format
    down = latent_format.spacial_downscale_ratio
    latent = torch.zeros(1, latent_format.latent_channels, side // down, side // down)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(
        patcher, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
        denoise=1.0, disable_pbar=True, seed=7,
    ).float()  # fmt: skip


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def dense_patcher(tensors, layers):
    return comfy.sd.load_diffusion_model_state_dict(dequantized(tensors, layers))


@pytest.fixture(scope="module")
def flux2_dev():
    return make(flux2.FAMILY, flux2.TINY_FLUX2, seed=21, lora_rank=2)


@pytest.mark.parametrize(
    ("family", "config", "model_class", "config_class"),
    [
        (flux2.FAMILY, flux2.TINY_FLUX2, comfy.model_base.Flux2, comfy.supported_models.Flux2),
        (flux2.FAMILY, flux2.TINY_KLEIN, comfy.model_base.Flux2, comfy.supported_models.Flux2),
        (
            flux1.FAMILY,
            flux1.TINY_SCHNELL,
            comfy.model_base.Flux,
            comfy.supported_models.FluxSchnell,
        ),
    ],
    ids=["flux2-dev", "flux2-klein", "flux1-schnell"],
)
def test_comfyui_detects_the_family_and_samples_as_the_dequantized_model(
    family, config, model_class, config_class
):
    _, tensors, layers = make(family, config, seed=22)
    ternary = patcher_from_state_dict(tensors, scale_rule="absmean")
    assert type(ternary.model) is model_class and type(ternary.model.model_config) is config_class
    assert set(ternary_modules(ternary)) == set(layers)
    positive = conditioning(family, config, seed=3)
    out = ksample(ternary, positive)
    down = ternary.model.latent_format.spacial_downscale_ratio
    assert out.shape == (1, family.latent_channels(config), 64 // down, 64 // down)
    assert relative(out, ksample(dense_patcher(tensors, layers), positive)) < 1e-4


def test_kontext_reference_latents_reach_the_ternary_model():
    """FLUX.1 Kontext has FLUX.1-dev's keys: its reference image arrives as ``ref_latents``
    (ReferenceLatent node); the ternary model must follow it as the dense one does."""
    _, tensors, layers = make(flux1.FAMILY, flux1.TINY_FLUX, seed=23)
    ternary, dense = (
        patcher_from_state_dict(tensors, scale_rule="absmean"),
        dense_patcher(tensors, layers),
    )
    assert type(ternary.model.model_config) is comfy.supported_models.Flux
    plain = conditioning(flux1.FAMILY, flux1.TINY_FLUX, seed=4)
    reference = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(5))
    (edit,) = ReferenceLatent.execute(plain, {"samples": reference}).args
    assert torch.equal(edit[0][1]["reference_latents"][0], reference)
    out = ksample(ternary, edit)
    assert relative(out, ksample(dense, edit)) < 1e-4
    assert relative(out, ksample(ternary, plain)) > 1e-3  # the reference changed the result


def test_flux2_reference_latents_and_lora_branches(flux2_dev):
    state, tensors, layers = flux2_dev
    ternary, dense = (
        patcher_from_state_dict(tensors, scale_rule="absmean"),
        dense_patcher(tensors, layers),
    )
    plain = conditioning(flux2.FAMILY, flux2.TINY_FLUX2, seed=6)
    reference = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(8))
    (edit,) = ReferenceLatent.execute(plain, {"samples": reference}).args
    assert relative(ksample(ternary, edit), ksample(dense, edit)) < 1e-4
    # ComfyUI's LoRA loader on FLUX.2 keys: kohya names on a global modulation linear, the
    # diffusers names FLUX.2 uses (fused to_qkv_mlp_proj, ff.linear_in), a qkv row slice,
    # and a full-weight diff (a dense patch) on a layer without a bias.
    gen = torch.Generator().manual_seed(9)

    def rand(*shape):
        return 0.05 * torch.randn(*shape, generator=gen)

    lora = {
        "lora_unet_double_stream_modulation_img_lin.lora_down.weight": rand(3, H),
        "lora_unet_double_stream_modulation_img_lin.lora_up.weight": rand(6 * H, 3),
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": rand(3, H),
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight": rand(
            9 * H, 3
        ),
        "transformer.transformer_blocks.1.ff.linear_in.lora_A.weight": rand(3, H),
        "transformer.transformer_blocks.1.ff.linear_in.lora_B.weight": rand(6 * H, 3),
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": rand(3, H),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": rand(H, 3),
        "lora_unet_single_blocks_1_linear2.diff": rand(H, 4 * H),
    }

    def with_lora(patcher):
        return comfy.sd.load_lora_for_models(patcher, None, lora, 0.8, 0.0)[0]

    patched = with_lora(ternary)
    assert len(patched.patches) == 5
    out = ksample(patched, plain)
    assert relative(out, ksample(with_lora(dense), plain)) < 1e-4
    assert relative(out, ksample(ternary, plain)) > 1e-3
    linear2 = ternary_modules(patched)["single_blocks.1.linear2"]
    assert linear2.bias is None and linear2.patch_dense is None  # taken back after sampling


def test_a_lora_that_does_not_fit_a_flux2_layer_is_named(flux2_dev):
    """A LoRA of another model (FLUX.1-dev width), or one whose up and down disagree in rank
    (that one failed inside the kernel: 'mat1 and mat2 shapes cannot be multiplied'), is
    refused naming the layer and what to do; the MODEL without it samples as before."""
    _, tensors, layers = flux2_dev
    ternary = patcher_from_state_dict(tensors, scale_rule="absmean")
    positive = conditioning(flux2.FAMILY, flux2.TINY_FLUX2, seed=12)
    before = ksample(ternary, positive)
    other_model = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(3, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 3),
    }
    ranks = {
        "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(4, 4 * H),
        "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(H, 3),
    }
    for lora, found in [
        (other_model, r"double_blocks.0.img_attn.qkv.weight: a lora patch of up \[9216, 3\]"),
        (ranks, r"single_blocks.0.linear2.weight: a lora patch of up \[256, 3\], down \[4, 1024\]"),
    ]:
        # raised by the LoRA loader where the MODEL is loaded already, else by the sampler
        with pytest.raises(UnsupportedPatchError, match=f"{found}.* remove it from the LoRA"):
            ksample(comfy.sd.load_lora_for_models(ternary, None, lora, 1.0, 0.0)[0], positive)
    assert torch.equal(ksample(ternary, positive), before)


def test_flux2_quantize_save_and_report_nodes(flux2_dev, tmp_path, monkeypatch):
    import folder_paths

    state, _, _ = flux2_dev
    source = comfy.sd.load_diffusion_model_state_dict(dict(state))
    quantized, report = QuantizeModelToTernary.execute(source, 0, "absmean", "16-bit").args
    assert "FLUX.2 (dev-like)" in report and type(quantized.model) is comfy.model_base.Flux2
    with pytest.raises(ValueError, match="calibration supports FLUX.1 only; FLUX.2 is not"):
        QuantizeModelToTernary.execute(source, 0, "absmean", "16-bit", teacher_data="any")
    expected, _, _ = quantize_state_dict(state)
    for name, layer in ternary_modules(quantized).items():
        assert torch.equal(layer.weight, expected[f"{name}.weight"]), name
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "ternary", ([str(tmp_path)], {".safetensors"})
    )
    SaveTernaryModel.execute(quantized, "flux2_tiny", "base3")
    loaded = load_ternary_model(tmp_path / "flux2_tiny.safetensors")
    assert loaded.metadata["architecture"] == "flux2" and loaded.family is flux2.FAMILY
    positive = conditioning(flux2.FAMILY, flux2.TINY_FLUX2, seed=10)
    assert torch.equal(
        ksample(patcher_from_state_dict(loaded.state_dict, scale_rule="absmean"), positive),
        ksample(quantized, positive),
    )
    # The Report's random conditioning has FLUX.2's shapes: 128 latent channels at 1/16, no
    # pooled vector, text width of the model, 512 tokens, guidance 4.
    inputs = step_inputs(quantized, 64, 96, 0)
    assert inputs.noise.shape == (1, 128, 6, 4) and inputs.pooled is None
    assert inputs.context.shape == (1, 512, 512) and inputs.guidance == 4.0
    chart, text = TernaryReport.execute(quantized, 64, 64, 1, 0, reference=source).args
    lines = text.splitlines()
    assert lines[2].startswith("ternary A16") and lines[3].startswith("fp32 (reference)")
    with pytest.raises(ValueError, match="this FLUX.2 model takes 512 .CLIPLoader type flux2"):
        TernaryReport.execute(quantized, 64, 64, 1, 0, conditioning=[[torch.zeros(1, 4, 4096), {}]])


def test_quantize_node_on_a_flux2_model_loaded_in_fp8(flux2_dev):
    """Load Diffusion Model's weight_dtype fp8_e4m3fn: the node quantizes the fp8 values (it
    failed: '"isfinite" not implemented for Float8_e4m3fn')."""
    state, _, _ = flux2_dev
    fp8 = {"dtype": torch.float8_e4m3fn}
    source = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options=fp8)
    quantized, _ = QuantizeModelToTernary.execute(source, 2, "lsq", "16-bit").args
    values = {k: v.to(torch.float8_e4m3fn).float() for k, v in state.items()}
    expected, layers, _ = quantize_state_dict(values, lora_rank=2, scale_rule="lsq")
    for name, layer in ternary_modules(quantized).items():
        assert torch.equal(layer.weight, expected[f"{name}.weight"]), name
        assert torch.equal(layer.weight_scale, expected[f"{name}.weight_scale"]), name
    positive = conditioning(flux2.FAMILY, flux2.TINY_FLUX2, seed=13)
    assert (
        relative(ksample(quantized, positive), ksample(dense_patcher(expected, layers), positive))
        < 1e-4
    )


def test_distillation_nodes_refuse_flux2(flux2_dev, tmp_path):
    from safetensors.torch import save_file

    from comfyui_ternary_flux.ternary.fileformat import save_ternary_file

    state, tensors, layers = flux2_dev
    source = comfy.sd.load_diffusion_model_state_dict(dict(state))
    message = "distillation supports FLUX.1 only; FLUX.2 is not supported yet"
    with pytest.raises(ModelFamilyError, match=message):
        BuildTeacherDataset.execute(source, *([None] * 12))
    with pytest.raises(ModelFamilyError, match=message):
        DistillTernary.execute(source, "data", "out", True)
    # Distill Job: the file is refused before the background job starts.
    save_file(state, tmp_path / "dense.safetensors")
    save_ternary_file(
        tmp_path / "ternary.safetensors", tensors, layers, lora_rank=2, architecture="flux2"
    )
    for name in ("dense.safetensors", "ternary.safetensors"):
        with pytest.raises(ModelFamilyError, match=message):
            refuse_other_family_file(str(tmp_path / name))
    (tmp_path / "placeholder.safetensors").write_bytes(b"")
    refuse_other_family_file(str(tmp_path / "placeholder.safetensors"))  # left to the job
    save_file(random_weights(flux1.flux_shapes(flux1.TINY_FLUX)), tmp_path / "flux1.safetensors")
    refuse_other_family_file(str(tmp_path / "flux1.safetensors"))


def test_chroma_loads_as_comfyuis_chroma_and_samples_as_the_dequantized_model():
    family, config = chroma.FAMILY, chroma.TINY_COMFY_CHROMA
    _, tensors, layers = make(family, config, seed=24)
    guidance_net = [k for k in tensors if k.startswith("distilled_guidance_layer")]
    assert guidance_net and not any(k.rsplit(".", 1)[0] in layers for k in guidance_net)
    ternary = patcher_from_state_dict(tensors, scale_rule="absmean")
    assert type(ternary.model) is comfy.model_base.Chroma
    # Saved from ComfyUI, the guidance network's RMSNorms get their BFL names back.
    names = {bfl_key(k) for k in ternary.model.diffusion_model.state_dict()}
    assert "distilled_guidance_layer.norms.0.scale" in names and names >= set(tensors)
    assert set(ternary_modules(ternary)) == set(layers) and len(layers) == 8 + 2
    positive = conditioning(family, config, seed=11)
    out = ksample(ternary, positive, side=32, steps=1)
    comfy.model_management.unload_all_models()  # one 600 M model in memory at a time
    del ternary
    assert out.shape == (1, 16, 4, 4)
    assert relative(out, ksample(dense_patcher(tensors, layers), positive, side=32, steps=1)) < 1e-4
