"""bench/families.py in its CPU smoke mode: tiny models of each family made layer by layer,
quantized into v1 files, loaded by the pack's loader, detected and sampled by ComfyUI."""

import json
import subprocess
import sys
from pathlib import Path

from comfyui_harness import require_comfyui

ROOT = Path(__file__).resolve().parents[1]


def test_families_benchmark_smoke_runs_on_cpu(tmp_path):
    comfyui = require_comfyui()
    out = tmp_path / "families.json"
    cmd = [sys.executable, str(ROOT / "bench" / "families.py"), "--smoke", "--stub-av"]
    cmd += ["--json", str(out), "--file-dir", str(tmp_path), "--comfyui", str(comfyui)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["environment"]["av_stubbed"] is True  # ComfyUI ran without PyAV
    models = {m["model"]: m for m in results["models"]}
    assert list(models) == ["flux2:tiny", "flux2:tiny-klein", "flux:tiny", "flux:tiny-schnell"]
    classes = [m["comfyui_config"] for m in models.values()]
    assert classes == ["Flux2", "Flux2", "Flux", "FluxSchnell"]
    flux2 = models["flux2:tiny"]
    assert flux2["latent_shape"] == [1, 128, 4, 4] and flux2["text_tokens"] == 512
    assert models["flux:tiny"]["latent_shape"] == [1, 16, 8, 8]
    for m in models.values():
        assert 75 < m["share_quantized_percent"] < 95
        assert m["file"]["bytes"] < m["bf16_bytes"] / 3 and m["file"]["packing"] == "base3"
        assert m["base3_tensor_bytes"] < m["file"]["bytes"] < m["base3_tensor_bytes"] + 100_000
        assert m["base3_tensor_bytes"] < m["2bit_tensor_bytes"]
        for run in (m["ternary"], m["bf16"]):
            assert run["finite"] and run["steps"] == 1 and run["seconds_per_step"] > 0
            assert "peak_allocated_bytes" not in run  # no CUDA: no device memory figure
        assert 0 < m["final_latent_relative_difference"] < 2
        assert m["targets"] == {}  # the targets are for full-size models
    assert "| flux2:tiny (Flux2) |" in done.stdout
    assert list(tmp_path.glob("**/*.safetensors")) == []  # temporary files removed
