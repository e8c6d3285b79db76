"""Integration: the pack's nodes inside a real ComfyUI server (headless, CPU, tiny FLUX.1 and
FLUX.2).

One server for the whole module. References are computed by the same server running
ComfyUI's own nodes on the dequantized model (s T + LoRA stored as dense float32).
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_harness import REPO, require_comfyui
from comfyui_reference import dequantized
from comfyui_server import ComfyServer, save_random_tae
from PIL import Image
from safetensors.torch import save_file
from test_reproduction import make_checkpoint, to_diffusers

from comfyui_ternary_flux.models import flux2
from comfyui_ternary_flux.models.family import random_weights
from comfyui_ternary_flux.models.files import quantize_state_dict
from comfyui_ternary_flux.models.flux1 import TINY_FLUX, random_flux_state_dict
from comfyui_ternary_flux.models.reproduction import import_reproduction
from comfyui_ternary_flux.ternary.fileformat import save_ternary_file

H = TINY_FLUX.hidden_size


def diffusers_lora(rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers-named FLUX LoRA: slices of fused qkv / linear1, plus a plain layer."""
    gen = torch.Generator().manual_seed(7)
    lora = {}
    targets = {
        "transformer_blocks.0.attn.to_k": H,
        "transformer_blocks.1.attn.add_v_proj": H,
        "single_transformer_blocks.0.proj_mlp": TINY_FLUX.mlp_hidden,
        "single_transformer_blocks.1.attn.to_q": H,
        "transformer_blocks.0.ff.net.2": H,
    }
    for name, rows in targets.items():
        k = TINY_FLUX.mlp_hidden if name.endswith("ff.net.2") else H
        lora[f"transformer.{name}.lora_A.weight"] = 0.1 * torch.randn(rank, k, generator=gen)
        lora[f"transformer.{name}.lora_B.weight"] = 0.1 * torch.randn(rows, rank, generator=gen)
    return lora


def flux2_lora(rank: int = 3) -> dict[str, torch.Tensor]:
    """A FLUX.2 LoRA: diffusers names (fused to_qkv_mlp_proj, ff.linear_in, a qkv slice) and
    kohya names on a global modulation linear."""
    gen = torch.Generator().manual_seed(8)
    h = flux2.TINY_FLUX2.hidden_size
    targets = {
        "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj": 9 * h,
        "transformer.transformer_blocks.0.ff.linear_in": 6 * h,
        "transformer.transformer_blocks.1.attn.add_q_proj": h,
    }
    lora = {}
    for name, rows in targets.items():
        lora[f"{name}.lora_A.weight"] = 0.1 * torch.randn(rank, h, generator=gen)
        lora[f"{name}.lora_B.weight"] = 0.1 * torch.randn(rows, rank, generator=gen)
    lora["lora_unet_single_stream_modulation_lin.lora_down.weight"] = 0.1 * torch.randn(
        rank, h, generator=gen
    )
    lora["lora_unet_single_stream_modulation_lin.lora_up.weight"] = 0.1 * torch.randn(
        3 * h, rank, generator=gen
    )
    return lora


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = require_comfyui()
    base = tmp_path_factory.mktemp("comfyui")
    srv = ComfyServer(comfyui, base)
    models = base / "models"
    state = random_flux_state_dict(TINY_FLUX, seed=11)
    save_file(state, models / "diffusion_models" / "tiny_flux.safetensors")
    tensors, layers, _ = quantize_state_dict(state, lora_rank=4)
    save_ternary_file(models / "ternary" / "tiny_ternary.safetensors", tensors, layers, lora_rank=4)
    save_file(
        dequantized(tensors, layers), models / "diffusion_models" / "tiny_dequantized.safetensors"
    )
    save_file(state, models / "ternary" / "plain_flux.safetensors")
    (models / "ternary" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{no")
    save_file(diffusers_lora(), models / "loras" / "tiny_lora.safetensors")
    save_random_tae(models / "vae_approx", "taef1")
    save_random_tae(models / "vae_approx", "taef2")
    state2 = random_weights(flux2.flux2_shapes(flux2.TINY_FLUX2), seed=13)
    tensors, layers, _ = quantize_state_dict(state2, lora_rank=2)
    save_ternary_file(
        models / "ternary" / "tiny_flux2_ternary.safetensors",
        tensors,
        layers,
        lora_rank=2,
        architecture="flux2",
    )
    save_file(
        dequantized(tensors, layers),
        models / "diffusion_models" / "tiny_flux2_dequantized.safetensors",
    )
    save_file(flux2_lora(), models / "loras" / "tiny_flux2_lora.safetensors")
    checkpoint = models / "ternary" / "tiny_distilled.pt"
    torch.save(make_checkpoint(to_diffusers(state)[0], rank=4, seed=12), checkpoint)
    import_reproduction(
        models / "diffusion_models" / "tiny_flux.safetensors",
        checkpoint,
        models / "ternary" / "tiny_imported.safetensors",
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# Seeded conditioning and the empty latent of each family (tiny models' text widths).
CONDITIONING = {"flux": {"channels": 4096, "pooled": 768}, "flux2": {"channels": 512, "pooled": 0}}
EMPTY_LATENT = {"flux": "EmptySD3LatentImage", "flux2": "EmptyFlux2LatentImage"}


def sample_graph(
    model_nodes: dict, model_ref: list, prefix: str, seed: int = 1, family: str = "flux"
) -> dict:
    """API graph: conditioning + FluxGuidance + KSampler (2 steps, 64x64) + SaveLatent."""
    graph = {
        "cond": {
            "class_type": "TernaryTestConditioning",
            "inputs": {"seed": 3, "tokens": 8, **CONDITIONING[family]},
        },
        "guided": {
            "class_type": "FluxGuidance",
            "inputs": {"conditioning": ["cond", 0], "guidance": 3.5},
        },
        "latent": {
            "class_type": EMPTY_LATENT[family],
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": model_ref,
                "seed": seed,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["guided", 0],
                "negative": ["guided", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },
        "save": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix},
        },
    }
    graph.update(model_nodes)
    return graph


def ternary_loader(name: str = "tiny_ternary.safetensors") -> dict:
    return {
        "class_type": "TernaryFluxLoader",
        "inputs": {"model_name": name, "activations": "16-bit"},
    }


def dense_loader(name: str = "tiny_dequantized.safetensors", dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": dtype}}


def lora(model_ref: list, strength: float, name: str = "tiny_lora.safetensors") -> dict:
    return {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": model_ref, "lora_name": name, "strength_model": strength},
    }


def sample(server, model_nodes, model_ref, prefix, seed=1, family="flux") -> torch.Tensor:
    entry = server.run(sample_graph(model_nodes, model_ref, prefix, seed, family))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    return server.latent(entry, "save")


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_ternary_latent_equals_the_dequantized_reference(server):
    out = sample(server, {"m": ternary_loader()}, ["m", 0], "ternary")
    ref = sample(server, {"m": dense_loader()}, ["m", 0], "reference")
    assert out.shape == (1, 16, 8, 8)
    assert relative(out, ref) < 1e-4


def test_lora_on_the_ternary_model_acts_as_on_the_dequantized_one(server):
    for strength in (1.0, 0.5):
        out = sample(
            server,
            {"m": ternary_loader(), "l": lora(["m", 0], strength)},
            ["l", 0],
            f"lora_{strength}",
        )
        ref = sample(
            server,
            {"m": dense_loader(), "l": lora(["m", 0], strength)},
            ["l", 0],
            f"lora_ref_{strength}",
        )
        assert relative(out, ref) < 1e-4
    plain = sample(server, {"m": ternary_loader()}, ["m", 0], "plain_again", seed=1)
    assert relative(out, plain) > 1e-3  # the LoRA did something
    assert relative(plain, sample(server, {"m": dense_loader()}, ["m", 0], "ref_again")) < 1e-4


def test_flux2_ternary_file_samples_as_the_dequantized_one_with_and_without_lora(server):
    """ComfyUI's own detection makes a FLUX.2 model of the ternary file (128-channel latent,
    EmptyFlux2LatentImage), and its LoRA loader runs on the ternary layers as branches."""
    ternary = {"m": ternary_loader("tiny_flux2_ternary.safetensors")}
    dense = {"m": dense_loader("tiny_flux2_dequantized.safetensors")}
    out = sample(server, ternary, ["m", 0], "flux2", family="flux2")
    assert out.shape == (1, 128, 4, 4)
    assert relative(out, sample(server, dense, ["m", 0], "flux2_ref", family="flux2")) < 1e-4
    name = "tiny_flux2_lora.safetensors"
    patched = sample(
        server, {**ternary, "l": lora(["m", 0], 0.7, name)}, ["l", 0], "flux2_lora", family="flux2"
    )
    reference = sample(
        server,
        {**dense, "l": lora(["m", 0], 0.7, name)},
        ["l", 0],
        "flux2_lora_ref",
        family="flux2",
    )
    assert relative(patched, reference) < 1e-4 and relative(patched, out) > 1e-3


def test_kontext_reference_latent_reaches_the_ternary_model(server):
    """FLUX.1 Kontext is FLUX.1-dev by its keys; its reference image (ReferenceLatent) must
    act on the ternary model as on the dequantized one."""

    def graph(model_node: dict, prefix: str, reference: bool = True) -> dict:
        nodes = {"m": model_node}
        if reference:
            nodes["ref"] = {
                "class_type": "TernaryTestLatent",
                "inputs": {"seed": 4, "channels": 16, "height": 8, "width": 6},
            }
            nodes["edit"] = {
                "class_type": "ReferenceLatent",
                "inputs": {"conditioning": ["cond", 0], "latent": ["ref", 0]},
            }
        built = sample_graph(nodes, ["m", 0], prefix)
        if reference:
            built["guided"]["inputs"]["conditioning"] = ["edit", 0]
        return built

    def run(built):
        entry = server.run(built)
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        return server.latent(entry, "save")

    out = run(graph(ternary_loader(), "kontext"))
    assert relative(out, run(graph(dense_loader(), "kontext_ref"))) < 1e-4
    assert relative(out, run(graph(ternary_loader(), "kontext_plain", reference=False))) > 1e-3


def test_quantize_save_load_round_trip_is_identical(server):
    nodes = {
        "src": dense_loader("tiny_flux.safetensors"),
        "q": {
            "class_type": "TernaryFluxQuantize",
            "inputs": {
                "model": ["src", 0],
                "lora_rank": 4,
                "scale_rule": "absmean",
                "activations": "16-bit",
            },
        },
        "store": {
            "class_type": "TernaryFluxSave",
            "inputs": {"model": ["q", 0], "filename": "roundtrip", "packing": "base3"},
        },
    }
    entry = server.run(sample_graph(nodes, ["q", 0], "quantized"))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    assert entry["outputs"]["store"]["text"][0].startswith("saved roundtrip.safetensors")
    direct = server.latent(entry, "save")
    loaded = sample(server, {"m": ternary_loader("roundtrip.safetensors")}, ["m", 0], "reloaded")
    assert torch.equal(direct, loaded)
    # the node quantizes exactly as the core does outside ComfyUI (same weights, seed 11)
    assert torch.equal(direct, sample(server, {"m": ternary_loader()}, ["m", 0], "file"))
    nodes["q"]["inputs"]["lora_rank"] = 2  # a new job, not a cached one
    entry = server.run({k: nodes[k] for k in ("src", "q", "store")})
    assert entry["outputs"]["store"]["text"][0].startswith("saved roundtrip_00001.safetensors")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("corrupt.safetensors", "corrupt.safetensors: not a safetensors file, or truncated"),
        ("plain_flux.safetensors", "not a ternary-flux file"),
    ],
)
def test_bad_files_are_node_errors_and_the_server_stays_up(server, name, message):
    entry = server.run(sample_graph({"m": ternary_loader(name)}, ["m", 0], f"bad_{name}"))
    assert entry["status"]["status_str"] == "error"
    assert message in server.error_of(entry)
    assert server.error_of(entry).startswith("TernaryFluxLoader")
    assert server.alive()


def test_missing_file_is_refused_before_running(server):
    status, reply = server.post(
        sample_graph({"m": ternary_loader("gone.safetensors")}, ["m", 0], "x")
    )
    assert status == 400
    details = str(reply["node_errors"]["m"])
    assert "model_name" in details and "gone.safetensors" in details
    assert server.alive()


def test_quantizing_a_non_dense_flux_model_is_a_node_error(server):
    nodes = {
        "m": ternary_loader(),
        "q": {
            "class_type": "TernaryFluxQuantize",
            "inputs": {
                "model": ["m", 0],
                "lora_rank": 0,
                "scale_rule": "absmean",
                "activations": "16-bit",
            },
        },
    }
    entry = server.run(sample_graph(nodes, ["q", 0], "requantize"))
    assert "TernaryFluxQuantize: this MODEL is already ternary" in server.error_of(entry)
    assert server.alive()


def reproduction(model_ref: list) -> dict:
    return {
        "class_type": "TernaryFluxLoadReproduction",
        "inputs": {"model": model_ref, "checkpoint": "tiny_distilled.pt", "activations": "16-bit"},
    }


def test_reproduction_node_equals_the_imported_file(server):
    nodes = {"base": dense_loader("tiny_flux.safetensors"), "r": reproduction(["base", 0])}
    out = sample(server, nodes, ["r", 0], "reproduction")
    ref = sample(server, {"m": ternary_loader("tiny_imported.safetensors")}, ["m", 0], "imported")
    assert torch.equal(out, ref)


def test_reproduction_node_refuses_an_fp8_model(server):
    nodes = {
        "base": dense_loader("tiny_flux.safetensors", "fp8_e4m3fn"),
        "r": reproduction(["base", 0]),
    }
    entry = server.run(sample_graph(nodes, ["r", 0], "reproduction_fp8"))
    message = server.error_of(entry)
    assert message.startswith("TernaryFluxLoadReproduction: this MODEL is not the bf16 FLUX.1-dev")
    assert "float8_e4m3fn" in message
    assert server.alive()


TINY_FILES = {
    "flux1-dev.safetensors": "tiny_flux.safetensors",
    "flux1-dev-ternary.safetensors": "tiny_ternary.safetensors",
    "ternary_distilled_r64.pt": "tiny_distilled.pt",
    "ae.safetensors": "taef1",
    "flux2-dev-ternary.safetensors": "tiny_flux2_ternary.safetensors",
    "flux2-vae.safetensors": "taef2",
}
TEXT_ENCODERS = {"DualCLIPLoader": "flux", "CLIPLoader": "flux2"}  # loader -> family
TINY_SIZES = {"width": 64, "height": 64, "steps": 2}


def tiny_workflow(name: str) -> dict:
    """A shipped API workflow on the tiny models: seeded conditioning instead of the text
    encoders, tiny files, 64x64, 2 steps; everything else as shipped."""
    graph = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    family = next(
        TEXT_ENCODERS[n["class_type"]] for n in graph.values() if n["class_type"] in TEXT_ENCODERS
    )
    for node_id, node in list(graph.items()):
        if node["class_type"] in TEXT_ENCODERS:
            del graph[node_id]
        elif node["class_type"] == "CLIPTextEncode":
            graph[node_id] = {
                "class_type": "TernaryTestConditioning",
                "inputs": {"seed": int(node_id), "tokens": 8, **CONDITIONING[family]},
            }
        else:
            inputs = node["inputs"]
            for key, value in inputs.items():
                if key in TINY_SIZES:
                    inputs[key] = TINY_SIZES[key]
                elif isinstance(value, str) and value in TINY_FILES:
                    inputs[key] = TINY_FILES[value]
    return graph


@pytest.mark.parametrize(
    "name",
    [
        "text_to_image_ternary",
        "quantize_and_save",
        "import_reproduction",
        "report",
        "text_to_image_flux2_ternary",
    ],
)
def test_shipped_workflow_runs_and_writes_images(server, name):
    graph = tiny_workflow(name)
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    kinds = {node_id: node["class_type"] for node_id, node in graph.items()}
    images = [i for i, kind in kinds.items() if kind in ("SaveImage", "PreviewImage")]
    assert images
    for node_id in images:
        (path,) = server.files(entry, node_id)
        with Image.open(path) as image:
            chart = kinds[node_id] == "PreviewImage"
            assert image.size == ((1024, 768) if chart else (64, 64))
            assert any(lo < hi for lo, hi in image.getextrema())  # not a blank image
    for node_id, kind in kinds.items():
        if kind == "TernaryFluxReport":
            text = entry["outputs"][node_id]["text"][0]
            assert "64x64" in text and "ternary A16" in text and "fp32 (reference)" in text
        if kind == "TernaryFluxSave":
            assert entry["outputs"][node_id]["text"][0].startswith("saved flux1-dev-ternary")


def test_report_measures_again_on_every_run(server):
    graph = tiny_workflow("report")
    report = next(k for k, v in graph.items() if v["class_type"] == "TernaryFluxReport")
    for _ in range(2):
        entry = server.run(graph)
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        cached = [
            n
            for kind, data in entry["status"]["messages"]
            if kind == "execution_cached"
            for n in data["nodes"]
        ]
        assert report not in cached and "ternary A16" in entry["outputs"][report]["text"][0]
    assert cached  # the loaders were cached: only the report ran again
