"""The ComfyUI glue in-process: ternary layers inside ComfyUI's FLUX, LoRA branches, files.

Every check compares against ComfyUI itself running the dequantized model (s T + LoRA as
dense float32 weights), so it tests the integration, not a copy of our own formulas.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
from comfyui_harness import import_comfyui
from comfyui_reference import dequantized
from safetensors.torch import save_file
from test_reproduction import make_checkpoint, to_diffusers
from torch.utils._python_dispatch import TorchDispatchMode

from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file
from comfyui_ternary_flux.models.files import quantize_state_dict
from comfyui_ternary_flux.models.flux1 import (
    TINY_FLUX,
    TINY_SCHNELL,
    is_block_linear,
    random_flux_state_dict,
)
from comfyui_ternary_flux.models.reproduction import import_reproduction
from comfyui_ternary_flux.ternary.measure import relative_error
from comfyui_ternary_flux.ternary.packing import unpack_2bit

import_comfyui()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

from comfyui_ternary_flux.nodes import lora_branches  # noqa: E402
from comfyui_ternary_flux.nodes.extension import TernaryFluxExtension  # noqa: E402
from comfyui_ternary_flux.nodes.load_node import LoadTernaryDiffusionModel  # noqa: E402
from comfyui_ternary_flux.nodes.model_io import (  # noqa: E402
    check_bf16_flux,
    check_flux,
    dense_state_dict,
    patcher_from_state_dict,
)
from comfyui_ternary_flux.nodes.quantize_node import QuantizeModelToTernary  # noqa: E402
from comfyui_ternary_flux.nodes.report_node import (  # noqa: E402
    TernaryReport,
    measure,
    step_inputs,
)
from comfyui_ternary_flux.nodes.reproduction_node import LoadReproductionCheckpoint  # noqa: E402
from comfyui_ternary_flux.nodes.save_node import (  # noqa: E402
    SaveTernaryModel,
    ternary_file_tensors,
)
from comfyui_ternary_flux.nodes.ternary_ops import ComfyTernaryLinear, ternary_modules  # noqa: E402
from comfyui_ternary_flux.ternary.fileformat import read_header, save_ternary_file  # noqa: E402

H = TINY_FLUX.hidden_size


@pytest.fixture(scope="module")
def quantized():
    state = random_flux_state_dict(TINY_FLUX, seed=1)
    tensors, layers, _ = quantize_state_dict(state, lora_rank=4)
    return tensors, layers


def run(patcher, seed: int = 0) -> torch.Tensor:
    """One forward of the diffusion model, after ComfyUI has loaded (and patched) it."""
    comfy.model_management.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    context = torch.randn(1, 5, TINY_FLUX.context_in_dim, generator=gen)
    y = torch.randn(1, TINY_FLUX.vec_in_dim, generator=gen)
    model = patcher.model.diffusion_model
    with torch.inference_mode():
        return model(x, torch.tensor([0.7]), context, y=y, guidance=torch.tensor([3.5])).float()


def assert_close(out, ref, tol=1e-4):
    err = float((out - ref).norm() / ref.norm())
    assert err < tol, f"relative error {err:.2e}"


def test_ternary_layers_replace_exactly_the_block_linears(quantized):
    tensors, layers = quantized
    patcher = patcher_from_state_dict(tensors, scale_rule="absmean")
    found = ternary_modules(patcher)
    assert set(found) == set(layers)
    assert all(is_block_linear(name) for name in found)
    # ComfyUI's memory planning sees the real (packed) bytes, not a dense model's.
    dense_bytes = sum(t.nbytes for t in dequantized(tensors, layers).values())
    assert patcher.model_size() < dense_bytes / 2


def test_forward_matches_comfyui_on_the_dequantized_model(quantized):
    tensors, layers = quantized
    out = run(patcher_from_state_dict(tensors, scale_rule="absmean"))
    ref = run(comfy.sd.load_diffusion_model_state_dict(dequantized(tensors, layers)))
    assert_close(out, ref)


def lora_file(rank: int = 3, seed: int = 2) -> dict[str, torch.Tensor]:
    """A FLUX LoRA in mixed naming: diffusers slices of the fused qkv and kohya linear1."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.05 * torch.randn(*shape, generator=gen)

    lora = {}
    for name in ("to_q", "to_v", "add_k_proj"):
        prefix = f"transformer.transformer_blocks.0.attn.{name}"
        lora[f"{prefix}.lora_A.weight"] = rand(rank, H)
        lora[f"{prefix}.lora_B.weight"] = rand(H, rank)
    prefix = "lora_unet_single_blocks_1_linear1"
    lora[f"{prefix}.lora_down.weight"] = rand(rank, H)
    lora[f"{prefix}.lora_up.weight"] = rand(3 * H + TINY_FLUX.mlp_hidden, rank)
    lora[f"{prefix}.alpha"] = torch.tensor(1.5)
    lora["lora_unet_double_blocks_1_img_mlp_2.diff_b"] = rand(H)
    return lora


def with_lora(patcher, lora, strength):
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0.0)
    return patched


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_comfyui_lora_runs_as_branches_with_the_right_strength(quantized, strength):
    tensors, layers = quantized
    lora = lora_file()
    base = patcher_from_state_dict(tensors, scale_rule="absmean")
    qkv = ternary_modules(base)["double_blocks.0.img_attn.qkv"]
    packed = qkv.weight.clone()
    patched = with_lora(base, lora, strength)
    assert ("diffusion_model.double_blocks.0.img_attn.qkv.weight") in patched.patches
    out = run(patched)
    assert qkv.patch_down is not None and qkv.patch_down.shape[0] == 2 * 3  # to_q + to_v
    assert torch.equal(qkv.weight, packed)  # never merged into the ternary weight
    ref = run(
        with_lora(
            comfy.sd.load_diffusion_model_state_dict(dequantized(tensors, layers)), lora, strength
        )
    )
    assert_close(out, ref)
    no_lora = run(patcher_from_state_dict(tensors, scale_rule="absmean"))
    assert float((out - no_lora).norm() / no_lora.norm()) > 1e-3


def test_base_model_is_clean_again_after_a_lora_run(quantized):
    tensors, _ = quantized
    base = patcher_from_state_dict(tensors, scale_rule="absmean")
    before = run(base, seed=5)
    run(with_lora(base, lora_file(), 1.0), seed=5)
    assert torch.equal(run(base, seed=5), before)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_lokr_and_diff_run_as_one_exact_dense_patch(quantized):
    tensors, layers = quantized
    name = "single_blocks.1.linear1"
    n, k = layers[name]
    gen = torch.Generator().manual_seed(3)
    prefix = "lora_unet_single_blocks_1_linear1"
    lokr = {
        f"{prefix}.lokr_w1": 0.1 * torch.randn(16, 16, generator=gen),
        f"{prefix}.lokr_w2": 0.1 * torch.randn(n // 16, k // 16, generator=gen),
    }
    diff = {f"{prefix}.diff": 0.01 * torch.randn(n, k, generator=gen)}
    patched = with_lora(
        with_lora(patcher_from_state_dict(tensors, scale_rule="absmean"), lokr, 0.8), diff, -0.5
    )
    with ShapeLog() as log:
        out = run(patched)
    assert (n, n) not in log.shapes  # no identity "up" of the old dense branch
    layer = ternary_modules(patched)[name]
    assert layer.patch_down is None and layer.patch_dense.shape == (n, k)
    dense = comfy.sd.load_diffusion_model_state_dict(dequantized(tensors, layers))
    assert_close(out, run(with_lora(with_lora(dense, lokr, 0.8), diff, -0.5)))


def test_dora_is_refused_with_a_message(quantized):
    tensors, _ = quantized
    lora = lora_file()
    lora["lora_unet_single_blocks_1_linear1.dora_scale"] = torch.ones(1, H)
    patched = with_lora(patcher_from_state_dict(tensors, scale_rule="absmean"), lora, 1.0)
    with pytest.raises(
        lora_branches.UnsupportedPatchError, match="single_blocks.1.linear1.weight: DoRA"
    ):
        run(patched)


def test_save_load_round_trip_is_identical(quantized, tmp_path):
    tensors, _ = quantized
    patcher = patcher_from_state_dict(tensors, scale_rule="absmean")
    for packing in ("2bit", "base3"):
        data, layers, rank = ternary_file_tensors(patcher, packing)
        path = tmp_path / f"model_{packing}.safetensors"
        save_ternary_file(path, data, layers, packing=packing, lora_rank=rank)
        loaded = load_ternary_file(path)
        assert loaded.lora_rank == 4
        assert torch.equal(
            run(patcher_from_state_dict(loaded.state_dict, scale_rule="absmean")), run(patcher)
        )


def test_saving_a_patched_model_is_refused(quantized):
    tensors, _ = quantized
    patched = with_lora(patcher_from_state_dict(tensors, scale_rule="absmean"), lora_file(), 1.0)
    with pytest.raises(ValueError, match="LoRA"):
        ternary_file_tensors(patched, "2bit")


def test_dense_state_dict_merges_loras_without_a_forced_load(quantized, monkeypatch):
    """Dynamic VRAM refuses ``force_patch_weights``: the merge must not ask for it."""
    loads = []

    def load_models_gpu(models, *args, force_patch_weights=False, **kwargs):
        assert not force_patch_weights, "Dynamic VRAM asserts on force_patch_weights"
        loads.append(models)
        return original(models, *args, **kwargs)

    original = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load_models_gpu)
    tensors, layers = quantized
    dense = dequantized(tensors, layers)
    lora = lora_file()
    base = comfy.sd.load_diffusion_model_state_dict(dict(dense))
    patched = with_lora(base, lora, 0.7)
    merged = dense_state_dict(patched)
    assert not loads  # nothing was loaded for it
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in merged  # BFL names
    ref = run(with_lora(comfy.sd.load_diffusion_model_state_dict(dict(dense)), lora, 0.7))
    assert_close(run(comfy.sd.load_diffusion_model_state_dict(dict(merged))), ref, 1e-6)
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert not torch.equal(merged[qkv], dense[qkv])
    # after a run has merged the LoRA into the shared modules, the base stays unpatched
    run(patched)
    assert torch.equal(dense_state_dict(base)[qkv], dense[qkv])
    assert torch.equal(dense_state_dict(patched)[qkv], merged[qkv])


class NotFlux:
    """Stands for a MODEL whose diffusion model is not FLUX."""

    class model:
        diffusion_model = torch.nn.Linear(4, 4)


def test_quantize_refuses_non_flux_and_ternary_models(quantized):
    tensors, _ = quantized
    with pytest.raises(ValueError, match="already ternary"):
        check_flux(patcher_from_state_dict(tensors, scale_rule="absmean"))

    with pytest.raises(ValueError, match=r"not a model this pack knows \(top-level keys: bias"):
        check_flux(NotFlux)


def test_layer_streams_from_the_offload_device():
    gen = torch.Generator().manual_seed(0)
    dense, bias = torch.randn(40, 300, generator=gen), torch.randn(40, generator=gen)
    layer = ComfyTernaryLinear.from_dense(dense, bias, lora_rank=2)
    x = torch.randn(3, 300, generator=gen, dtype=torch.float64)
    w = unpack_2bit(layer.weight, 300, torch.float64) * layer.weight_scale.double()[:, None]
    w = w + layer.lora_scale * layer.lora_up.double() @ layer.lora_down.double()
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias.double(), rtol=1e-12, atol=1e-12)
    assert "bias" in dict(layer.named_buffers())  # the ModelPatcher never merges into it


def velocity(patcher, inputs) -> torch.Tensor:
    """FLUX's prediction at sigma 1, straight from ComfyUI's diffusion model (float32, CPU)."""
    comfy.model_management.load_models_gpu([patcher])
    with torch.inference_mode():
        return patcher.model.diffusion_model(
            inputs.noise,
            torch.tensor([1.0]),
            inputs.context,
            y=inputs.pooled,
            guidance=torch.tensor([inputs.guidance]),
        ).float()


def test_report_measures_the_model_call_of_the_sampler(quantized):
    tensors, layers = quantized
    ternary = patcher_from_state_dict(tensors, scale_rule="absmean")
    source = comfy.sd.load_diffusion_model_state_dict(random_flux_state_dict(TINY_FLUX, seed=1))
    gen = torch.Generator().manual_seed(9)
    context = torch.randn(1, 7, TINY_FLUX.context_in_dim, generator=gen)
    pooled = torch.randn(1, TINY_FLUX.vec_in_dim, generator=gen)
    conditioning = [[context, {"pooled_output": pooled, "guidance": 2.0}]]
    inputs = step_inputs(ternary, 48, 80, 4, conditioning)
    assert inputs.noise.shape == (1, 16, 10, 6) and inputs.guidance == 2.0
    assert torch.equal(inputs.context, context) and torch.equal(inputs.pooled, pooled)

    ref_row, ref_out = measure(source, inputs, 2, "bf16")
    row, out = measure(ternary, inputs, 2, "ternary", ref_out)
    assert_close(out, velocity(ternary, inputs))
    assert_close(ref_out, velocity(source, inputs))
    assert row.relative_error == pytest.approx(relative_error(out, ref_out))
    assert row.relative_error > 1e-3 and ref_row.relative_error is None
    assert row.weight_bytes < ref_row.weight_bytes / 2
    assert row.peak_vram_bytes is None and row.seconds_per_step > 0  # CPU: no VRAM figure
    dequantized_model = comfy.sd.load_diffusion_model_state_dict(dequantized(tensors, layers))
    _, exact = measure(dequantized_model, inputs, 1, "dequantized")
    assert relative_error(out, exact) < 1e-4


def test_report_node_shows_a_table_and_a_chart(quantized):
    tensors, _ = quantized
    ternary = patcher_from_state_dict(tensors, scale_rule="absmean")
    source = comfy.sd.load_diffusion_model_state_dict(random_flux_state_dict(TINY_FLUX, seed=1))
    result = TernaryReport.execute(ternary, 64, 64, 1, 3, reference=source)
    chart, text = result.args
    assert result.ui.as_dict() == {"text": (text,)}
    lines = text.splitlines()
    assert lines[0].startswith("64x64, first sampling step (sigma 1), random conditioning")
    assert lines[1].split()[:5] == ["model", "weights", "peak", "VRAM", "time/step"]
    assert lines[2].startswith("ternary A16") and lines[3].startswith("fp32 (reference)")
    assert "n/a" in lines[2] and float(lines[2].split()[7]) > 1e-3  # no VRAM on CPU; error
    assert chart.shape == (1, 768, 1024, 3) and chart.dtype == torch.float32
    assert 0 <= chart.min() < chart.max() <= 1
    alone = TernaryReport.execute(ternary, 64, 64, 1, 3).args[1]
    assert len(alone.splitlines()) == 3 and alone.splitlines()[2].endswith("-")


def test_report_refuses_bad_models(quantized):
    tensors, _ = quantized
    ternary = patcher_from_state_dict(tensors, scale_rule="absmean")
    with pytest.raises(ValueError, match="reference: connect the dense bf16 model"):
        TernaryReport.execute(ternary, 64, 64, 1, 0, reference=ternary)
    with pytest.raises(ValueError, match="multiples of 16"):
        TernaryReport.execute(ternary, 72, 64, 1, 0)
    with pytest.raises(ValueError, match="no pooled output"):
        TernaryReport.execute(ternary, 64, 64, 1, 0, conditioning=[[torch.zeros(1, 4, 4096), {}]])


@pytest.fixture
def reproduction(tmp_path, monkeypatch):
    """A tiny bf16 base (file + ComfyUI MODEL) and a rank-4 reproduction checkpoint found
    in a temporary models/ternary."""
    bfl = random_flux_state_dict(TINY_FLUX, seed=3)
    save_file(bfl, tmp_path / "base.safetensors")
    torch.save(make_checkpoint(to_diffusers(bfl)[0], 4, seed=5), tmp_path / "ternary_distilled.pt")
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "ternary", ([str(tmp_path)], {".pt", ".safetensors"})
    )
    return bfl, tmp_path


def test_reproduction_node_builds_the_importers_model(reproduction):
    bfl, folder = reproduction
    base = comfy.sd.load_diffusion_model_state_dict(dict(bfl))  # fp32 on the CPU: bf16 values
    before = run(base)
    (model,) = LoadReproductionCheckpoint.execute(base, "ternary_distilled.pt", "16-bit").args
    expected = import_reproduction(
        folder / "base.safetensors", folder / "ternary_distilled.pt", packing="2bit"
    )
    found = ternary_modules(model)
    assert set(found) == set(expected.layers)
    for name, layer in found.items():
        assert torch.equal(layer.weight, expected.tensors[f"{name}.weight"])
        assert torch.equal(layer.weight_scale, expected.tensors[f"{name}.weight_scale"])
    assert torch.equal(
        run(model), run(patcher_from_state_dict(expected.tensors, scale_rule="absmean"))
    )
    assert torch.equal(run(base), before)  # the input MODEL is untouched


def test_reproduction_node_refuses_what_is_not_the_bf16_base(reproduction, quantized):
    bfl, _ = reproduction
    load = comfy.sd.load_diffusion_model_state_dict
    gen = torch.Generator().manual_seed(0)
    fp16 = {k: torch.randn(v.shape, generator=gen).half() for k, v in bfl.items()}
    bias_diff = {"lora_unet_double_blocks_1_img_mlp_2.diff_b": torch.ones(H)}
    cases = [
        (load(fp16), "img_in.weight is float32 with values that are not bf16 values"),
        (load(dict(bfl), model_options={"dtype": torch.float8_e4m3fn}), "float8_e4m3fn"),
        (with_lora(load(dict(bfl)), bias_diff, 1.0), "carries patches on 1 weights"),
        (patcher_from_state_dict(quantized[0], scale_rule="absmean"), "already ternary"),
        (NotFlux, "not a FLUX.1 diffusion model: missing img_in.weight"),
        (load(random_flux_state_dict(TINY_SCHNELL, seed=3)), "this MODEL is FLUX.1 schnell-like"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            LoadReproductionCheckpoint.execute(model, "ternary_distilled.pt", "16-bit")
    check_bf16_flux(load(dict(bfl)))


def test_every_input_of_every_node_has_a_tooltip():
    node_list = asyncio.run(TernaryFluxExtension().get_node_list())
    assert len(node_list) == 9
    missing = [
        f"{node.__name__}.{item.id}"
        for node in node_list
        for item in node.define_schema().inputs
        if not (item.tooltip or "").strip()
    ]
    assert not missing, f"inputs without a tooltip: {missing}"


def sample(patcher, steps: int = 2, seed: int = 0) -> torch.Tensor:
    """ComfyUI's own sampling, as KSampler runs it (euler / simple, cfg 1), 64x64."""
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 5, TINY_FLUX.context_in_dim, generator=gen)
    pooled = torch.randn(1, TINY_FLUX.vec_in_dim, generator=gen)
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=gen)
    with torch.inference_mode():
        return comfy.sample.sample(
            patcher, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
            disable_pbar=True, seed=seed,
        )  # fmt: skip


def test_ternary_models_use_the_legacy_patcher_under_dynamic_vram(quantized, monkeypatch):
    """Dynamic VRAM copies non-cast tensors again on every load: ternary MODELs are legacy
    ModelPatchers whatever ComfyUI's default patcher is, so they stay resident."""
    import comfy.model_patcher

    class DynamicDefault(comfy.model_patcher.ModelPatcher):
        pass

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicDefault)
    tensors, _ = quantized
    patcher = patcher_from_state_dict(tensors, scale_rule="absmean")
    assert type(patcher) is comfy.model_patcher.ModelPatcher
    dense = comfy.sd.load_diffusion_model_state_dict(random_flux_state_dict(TINY_FLUX, seed=1))
    assert type(dense) is DynamicDefault  # ComfyUI's own models are unaffected


def compiled_sample(patcher) -> tuple[torch.Tensor, int]:
    """Latents of sampling through TorchCompileModel (inductor), and dynamo's graph breaks."""
    import torch._dynamo
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    out = sample(TorchCompileModel.execute(patcher, "inductor").args[0])
    return out, sum(counters["graph_break"].values())


def test_torch_compile_model_node_on_an_in_memory_ternary_model(quantized):
    """TorchCompileModel on MODELs made in memory (no file behind them). No graph break at a
    ternary layer: exactly as many as ComfyUI's own dense model has (on the CPU its memory
    checks break the graph). A16 gives eager's latents to float rounding. A8 rounds
    activations to fp8, so the compiled graph's last-bit differences flip some codes: its
    latents stay nearer eager A8's than eager A8's are to A16's."""
    tensors, _ = quantized
    _, dense_breaks = compiled_sample(
        comfy.sd.load_diffusion_model_state_dict(random_flux_state_dict(TINY_FLUX, seed=1))
    )
    eager, compiled = {}, {}
    for bits in (16, 8):
        patcher = patcher_from_state_dict(tensors, act_bits=bits, scale_rule="absmean")
        eager[bits] = sample(patcher)
        compiled[bits], breaks = compiled_sample(patcher)
        assert breaks == dense_breaks
    assert_close(compiled[16], eager[16], 1e-5)
    gap = float((eager[8] - eager[16]).norm() / eager[16].norm())
    assert_close(compiled[8], eager[8], gap)


@pytest.fixture
def ternary_folder(tmp_path, monkeypatch):
    """An empty models/ternary in a temporary folder."""
    folder = tmp_path / "models" / "ternary"
    folder.mkdir(parents=True)
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "ternary", ([str(folder)], {".pt", ".safetensors"})
    )
    return folder


def test_save_writes_the_models_scale_rule_and_family(ternary_folder):
    bfl = random_flux_state_dict(TINY_FLUX, seed=2)
    dense = comfy.sd.load_diffusion_model_state_dict(dict(bfl))
    (model, _) = QuantizeModelToTernary.execute(dense, 2, "lsq", "16-bit").args
    (name,) = SaveTernaryModel.execute(model, "lsq_model", "base3").args
    metadata, _ = read_header(ternary_folder / name)
    assert metadata["scale_rule"] == "lsq" and metadata["architecture"] == "flux"
    # Loaded again and saved again, the file's rule travels with the model.
    (loaded,) = LoadTernaryDiffusionModel.execute(name, "16-bit").args
    (again,) = SaveTernaryModel.execute(loaded, "lsq_model", "2bit").args
    assert again == "lsq_model_00001.safetensors"
    assert read_header(ternary_folder / again)[0]["scale_rule"] == "lsq"
    unknown = patcher_from_state_dict(quantize_state_dict(bfl)[0], scale_rule=None)
    with pytest.raises(ValueError, match="do not say one scale rule"):
        SaveTernaryModel.execute(unknown, "unknown", "base3")
    assert sorted(p.name for p in ternary_folder.iterdir()) == [name, again]


def test_quantize_report_counts_stored_bytes_like_the_command_line(ternary_folder, tmp_path):
    from comfyui_ternary_flux.models.files import quantize_file

    bfl = random_flux_state_dict(TINY_FLUX, seed=2)
    save_file(bfl, tmp_path / "bf16.safetensors")
    cli = quantize_file(tmp_path / "bf16.safetensors", tmp_path / "cli.safetensors")
    dense = comfy.sd.load_diffusion_model_state_dict(dict(bfl))  # float32 on the CPU
    assert next(dense.model.diffusion_model.parameters()).dtype == torch.float32
    (model, report) = QuantizeModelToTernary.execute(dense, 0, "absmean", "16-bit").args
    (name,) = SaveTernaryModel.execute(model, "saved", "base3").args

    def line(text, label):
        return next(row for row in text.splitlines() if row.startswith(label))

    assert line(report, "bytes before") == line(cli.format(), "bytes before")
    assert line(report, "size ratio") == line(cli.format(), "size ratio")
    saved = (ternary_folder / name).stat().st_size
    stated = int(line(report, "bytes after").split()[2].replace(",", ""))
    assert abs(stated - saved) <= 64  # the header's key order may differ by a few digits


def test_save_cannot_escape_models_ternary_through_a_link(ternary_folder, tmp_path):
    quantized = quantize_state_dict(random_flux_state_dict(TINY_FLUX, seed=2))[0]
    model = patcher_from_state_dict(quantized, scale_rule="absmean")
    outside = tmp_path / "outside"
    outside.mkdir()
    (ternary_folder / "linked").symlink_to(outside, target_is_directory=True)
    (ternary_folder / "dangling.safetensors").symlink_to(outside / "x.safetensors")
    for name in ("linked/escaped", "linked/deeper/escaped"):
        with pytest.raises(ValueError, match="leads through a link to .*outside models/ternary"):
            SaveTernaryModel.execute(model, name, "base3")
    # a link that already exists as the file name is never written through: a new name
    (saved,) = SaveTernaryModel.execute(model, "dangling", "base3").args
    assert saved == "dangling_00001.safetensors"
    (inside := ternary_folder / "sub").mkdir()
    (ternary_folder / "alias").symlink_to(inside, target_is_directory=True)
    (kept,) = SaveTernaryModel.execute(model, "alias/model", "base3").args
    assert kept == os.path.join("sub", "model.safetensors") and (ternary_folder / kept).is_file()
    assert list(outside.iterdir()) == []


def test_save_names_the_file_as_the_loader_lists_it(ternary_folder, quantized):
    """A name with a subfolder comes back with it: the bare name would load another file of
    that name at the top of models/ternary. Spaces around a name are not part of it."""
    state = random_flux_state_dict(TINY_FLUX, seed=2)
    other = patcher_from_state_dict(quantize_state_dict(state)[0], scale_rule="absmean")
    (top,) = SaveTernaryModel.execute(other, "model", "base3").args
    model = patcher_from_state_dict(quantized[0], scale_rule="absmean")
    (name,) = SaveTernaryModel.execute(model, " sub/model ", "base3").args
    assert (top, name) == ("model.safetensors", os.path.join("sub", "model.safetensors"))
    assert name in folder_paths.get_filename_list("ternary")
    (loaded,) = LoadTernaryDiffusionModel.execute(name, "16-bit").args
    assert torch.equal(run(loaded), run(model))
    with pytest.raises(ValueError, match="invalid file name '  '"):
        SaveTernaryModel.execute(model, "  ", "base3")


def test_quantize_node_calibrates_on_a_teacher_data_set(ternary_folder, tmp_path):
    from distill_helpers import build_data

    data = tmp_path / "teacher-data"
    build_data(data)  # 6 prompts x 2 points of a tiny FLUX.1 teacher
    bfl = random_flux_state_dict(TINY_FLUX, seed=2)
    dense = comfy.sd.load_diffusion_model_state_dict(dict(bfl))
    args = (dense, 4, "absmean", "16-bit")
    (model, report) = QuantizeModelToTernary.execute(*args, str(data), 12).args
    assert "output error on the calibration inputs" in report and "26 of 26 layers lower" in report
    assert {m.scale_rule for m in ternary_modules(model).values()} == {"calibrated"}
    (name,) = SaveTernaryModel.execute(model, "calibrated", "base3").args
    metadata, _ = read_header(ternary_folder / name)
    assert metadata["scale_rule"] == "calibrated"
    assert json.loads(metadata["calibration"])["samples"] == 12
    # loaded and saved again, the calibration record travels with the model
    (loaded,) = LoadTernaryDiffusionModel.execute(name, "16-bit").args
    (again,) = SaveTernaryModel.execute(loaded, "calibrated", "2bit").args
    assert read_header(ternary_folder / again)[0]["calibration"] == metadata["calibration"]
    with pytest.raises(ValueError, match="13 calibration samples asked for"):
        QuantizeModelToTernary.execute(*args, str(data), 13)
    with pytest.raises(ValueError, match="not found"):
        QuantizeModelToTernary.execute(*args, str(tmp_path / "nothing"), 4)


def test_quantize_node_unloads_comfyuis_models_before_reading_the_weights_to_calibrate(
    ternary_folder, tmp_path, monkeypatch
):
    """Calibration needs device memory for every example's hidden states: the models ComfyUI
    holds loaded leave first, and the weights are read after that (not held twice)."""
    from distill_helpers import build_data

    from comfyui_ternary_flux.nodes import quantize_node

    data = tmp_path / "teacher-data"
    build_data(data)
    dense = comfy.sd.load_diffusion_model_state_dict(random_flux_state_dict(TINY_FLUX, seed=2))
    comfy.model_management.load_models_gpu([dense])
    assert comfy.model_management.current_loaded_models
    loaded_when_read = []

    def reading(model):
        loaded_when_read.append(len(comfy.model_management.current_loaded_models))
        return dense_state_dict(model)

    monkeypatch.setattr(quantize_node, "dense_state_dict", reading)
    QuantizeModelToTernary.execute(dense, 4, "absmean", "16-bit", str(data), 12)
    assert loaded_when_read == [0]
    comfy.model_management.load_models_gpu([dense])  # without calibration nothing is unloaded
    QuantizeModelToTernary.execute(dense, 4, "absmean", "16-bit")
    assert loaded_when_read == [0, 1]
    comfy.model_management.unload_all_models()
