"""bench/calibrate_full.py in its CPU smoke mode: a tiny FLUX.1 file and teacher data set
made, ``quantize --calibrate`` run in a subprocess, its report read into the JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_calibration_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "calibrate.json"
    cmd = [sys.executable, str(ROOT / "bench" / "calibrate_full.py"), "--smoke", "--out", str(out)]
    cmd += ["--workdir", str(tmp_path), "--lora-rank", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"] == "tiny" and result["samples"] == 4 and result["device"] == "cpu"
    assert result["calibration_seconds"] > 0 and result["peak_ram_gb"] > 0
    assert result["peak_gpu_allocated_bytes"] is None  # no GPU: nothing to report
    assert "26 of 26 layers lower" in result["report"]
    assert "targets" not in result  # the targets are for the full model on a GPU
