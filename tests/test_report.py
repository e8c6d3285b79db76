"""ternary/report.py: numbers on tiny models equal hand-computed ones; tables and charts."""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_harness import require_comfyui
from torch import nn

from comfyui_ternary_flux.ternary.measure import (
    ReportRow,
    format_report,
    measure_step,
    relative_error,
    render_chart,
    weight_bytes,
)
from comfyui_ternary_flux.ternary.module import TernaryLinear

ROOT = Path(__file__).resolve().parents[1]


def test_weight_bytes_of_ternary_linear_is_its_storage():
    k, n, r = 200, 24, 4
    layer = TernaryLinear.from_dense(torch.randn(n, k), torch.randn(n), lora_rank=r)
    tensors = [layer.weight, layer.weight_scale, layer.bias, layer.lora_down, layer.lora_up]
    tensors.append(layer.lora_alpha)
    assert weight_bytes(layer) == sum(t.nbytes for t in tensors)
    # By hand: 2 bits per weight in 128-column groups (K = 200 -> 2 groups of 32 bytes),
    # float32 scales, float32 bias and LoRA (from a float32 weight), a float32 alpha.
    assert weight_bytes(layer) == n * 2 * 32 + 4 * n + 4 * n + 4 * r * (k + n) + 4


def test_weight_bytes_mixes_dense_and_ternary_and_counts_shared_tensors_once():
    dense = nn.Linear(64, 32, dtype=torch.bfloat16)
    model = nn.Sequential(dense, TernaryLinear(32, 16, bias=False), nn.Linear(64, 32))
    model[2].weight = dense.weight  # tied: one storage
    expected = 2 * (64 * 32 + 32) + (16 * 32 + 4 * 16) + 4 * 32
    assert weight_bytes(model) == expected


def test_relative_error_matches_float64_numpy():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 7, generator=gen)
    out = (ref + 0.01 * torch.randn(3, 5, 7, generator=gen)).to(torch.bfloat16)
    o, r = out.double().numpy(), ref.double().numpy()
    expected = np.linalg.norm(o - r) / np.linalg.norm(r)
    assert relative_error(out, ref) == pytest.approx(expected, rel=1e-12)
    assert relative_error(ref, ref) == 0.0


def test_relative_error_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shapes"):
        relative_error(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="all zeros"):
        relative_error(torch.ones(4), torch.zeros(4))


def test_measure_step_calls_times_and_returns_last_output():
    calls = []

    def step():
        calls.append(len(calls))
        time.sleep(0.002)
        return len(calls)

    m = measure_step(step, "cpu", warmup=2, repeats=5)
    assert len(calls) == 7 and m.output == 7
    assert len(m.step_seconds) == 5 and min(m.step_seconds) >= 0.002
    assert m.seconds_per_step == statistics.median(m.step_seconds)
    assert m.peak_vram_bytes is None
    with pytest.raises(ValueError, match="repeats"):
        measure_step(step, "cpu", warmup=0, repeats=0)


def test_row_from_measurement_compares_with_reference():
    layer = TernaryLinear.from_dense(torch.randn(8, 128), torch.zeros(8))
    x = torch.randn(4, 128)
    ref = x @ layer.dequantized_weight().T
    m = measure_step(lambda: layer(x), "cpu", warmup=0, repeats=2)
    row = ReportRow.from_measurement("t", layer, m, ref)
    assert row.weight_bytes == weight_bytes(layer)
    assert row.relative_error < 1e-5  # float32 path against the same math
    assert ReportRow.from_measurement("t", layer, m).relative_error is None


ROWS = [
    ReportRow("bf16", 4_000_000, 0.2, 8_000_000, None),
    ReportRow("ternary A16", 1_000_000, 0.1, 2_000_000, 0.25),
    ReportRow("cpu run", 1_000_000, 1.5, None, 1e-5),
]


def test_format_report_holds_rows_and_ratios():
    text = format_report(ROWS, reference="bf16")
    lines = text.splitlines()
    assert len(lines) == 1 + len(ROWS)
    a16 = lines[2].split()
    assert a16[:2] == ["ternary", "A16"]
    # weights 1 MB vs 4 MB, VRAM 2 MB vs 8 MB, 0.1 s vs 0.2 s
    assert a16[-3:] == ["0.25x", "0.25x", "0.50x"]
    assert "1.00 MB" in lines[2] and "100.0 ms" in lines[2] and "0.2500" in lines[2]
    assert "1.500 s" in lines[3] and "n/a" in lines[3] and "1.00e-05" in lines[3]
    md = format_report(ROWS, reference="bf16", markdown=True).splitlines()
    assert md[1].startswith("|---|") and len(md) == 2 + len(ROWS)
    assert "weights /" not in format_report(ROWS)


def test_format_report_errors():
    with pytest.raises(ValueError, match="not among the rows"):
        format_report(ROWS, reference="fp8")
    with pytest.raises(ValueError, match="no rows"):
        format_report([])


def test_render_chart_size_and_content():
    pytest.importorskip("PIL")
    image = render_chart(ROWS, width=640, height=480)
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    colors = {tuple(c) for c in image.reshape(-1, 3)}
    # one bar colour per row (palette order) beside white and black text
    assert {(66, 133, 244), (219, 68, 55), (244, 180, 0)} <= colors
    assert (image < 128).all(axis=-1).sum() > 500  # text was drawn
    with pytest.raises(ValueError, match="too small"):
        render_chart(ROWS, width=100, height=100)


def test_sampling_benchmark_keeps_the_json_of_a_timed_out_variant(tmp_path, monkeypatch, capsys):
    """A variant that runs past --timeout is recorded as an error in the JSON (written after
    every variant), and the run still ends with its table and a failing exit code."""
    sys.path.insert(0, str(ROOT / "bench"))
    import comfy_sampling

    real_run = subprocess.run

    def run(command, **kwargs):
        if "--child" in command:
            raise subprocess.TimeoutExpired(command, kwargs.get("timeout"))
        if "--make-files" in command:
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, **kwargs)  # the platform module's own calls

    monkeypatch.setattr(comfy_sampling.subprocess, "run", run)
    out = tmp_path / "sampling.json"
    argv = ["comfy_sampling.py", "--config", "tiny", "--device", "cpu", "--work", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out), "--variants", "bf16"])
    assert comfy_sampling.main() == 1
    variants = json.loads(out.read_text())["variants"]
    assert variants == [{"variant": "bf16", "error": "timed out after 900 s"}]
    assert "| bf16 | error |" in capsys.readouterr().out


def test_sampling_benchmark_runs_tiny_on_cpu(tmp_path):
    """bench/comfy_sampling.py end to end on the CPU: files made, each variant in its own
    process through ComfyUI's loaders and sampler, ratios and the A8-vs-A16 latent."""
    comfyui = require_comfyui()
    out = tmp_path / "sampling.json"
    cmd = [sys.executable, str(ROOT / "bench" / "comfy_sampling.py"), "--config", "tiny"]
    cmd += ["--device", "cpu", "--steps", "2", "--warmup", "1", "--work", str(tmp_path / "w")]
    cmd += ["--json", str(out), "--comfyui", str(comfyui)]
    cmd += ["--variants", "bf16,ternary A16,ternary A8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    names = [v["variant"] for v in results["variants"]]
    assert names == ["bf16", "ternary A16", "ternary A8"]
    assert all(v["patcher"] == "ModelPatcher" for v in results["variants"])
    assert all(v["seconds_per_step"] > 0 for v in results["variants"])
    assert 0 < results["final_latent_a8_vs_a16_relative"] < 0.5
    assert results["ratios"]["ternary A16 / bf16"] > 0
    assert "| ternary A8 |" in done.stdout
