"""bench/families.py in its CPU smoke mode: tiny models of each family made layer by layer,
quantized into v1 files, loaded by the pack's loader, detected and sampled by ComfyUI, in
processes of their own, beside ComfyUI running the same weights in 16 bits."""

import json
import os
import subprocess
import sys
from pathlib import Path

from comfyui_harness import require_comfyui

ROOT = Path(__file__).resolve().parents[1]


def test_families_benchmark_smoke_runs_on_cpu(tmp_path):
    comfyui = require_comfyui()
    out = tmp_path / "families.json"
    cmd = [sys.executable, str(ROOT / "bench" / "families.py"), "--smoke", "--json", str(out)]
    cmd += ["--work", str(tmp_path), "--comfyui", str(comfyui)]
    env = dict(os.environ, COMFY_ENV_STUB_AV="1")  # as on a GPU machine without PyAV
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    models = {m["model"]: m for m in results["models"]}
    assert list(models) == ["flux2:tiny", "flux2:tiny-klein", "flux:tiny-schnell"]
    assert [m["ternary"]["comfyui_config"] for m in models.values()] == [
        "Flux2",
        "Flux2",
        "FluxSchnell",
    ]
    flux2 = models["flux2:tiny"]["ternary"]
    assert flux2["latent_shape"] == [1, 128, 4, 4] and flux2["text_tokens"] == 512
    assert models["flux:tiny-schnell"]["ternary"]["latent_shape"] == [1, 16, 8, 8]
    for m in models.values():
        assert 75 < m["share_quantized_percent"] < 95 and m["packing"] == "base3"
        size = m["file"]["bytes"]
        assert m["base3_tensor_bytes"] < size < m["base3_tensor_bytes"] + 100_000
        assert m["base3_tensor_bytes"] < m["2bit_tensor_bytes"] < m["bf16_bytes"] / 3
        for run in (m["ternary"], m["bf16"]):
            assert run["av_stubbed"] and run["finite"] and run["seconds_per_step"] > 0
            assert run["peak_allocated_bytes"] is None  # no CUDA: no device memory figure
        assert m["ternary"]["patcher"] == "ModelPatcher" and m["bf16"]["dtype"] == "float32"
        assert 0 < m["final_latent_relative_difference"] < 2
        assert m["targets"] == {}  # the targets are for full-size models
    assert "| flux2:tiny | Flux2 |" in done.stdout
    assert list(tmp_path.glob("**/*.safetensors")) == []  # temporary files removed
    assert list(tmp_path.glob("**/*.pt")) == []
