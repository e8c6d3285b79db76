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
    assert result["calibration_seconds_last_call"] > 0 and result["peak_ram_gb"] > 0
    assert result["peak_gpu_allocated_bytes_last_call"] is None  # no GPU: nothing to report
    assert "26 of 26 layers lower" in result["report"]
    assert result["device_used_peak_bytes"] is None
    assert "targets" not in result  # the targets are for the full model on a GPU


def test_calibration_benchmark_cut_by_its_time_limit_continues_in_the_next_call(tmp_path):
    """A call stopped by --time-limit exits 3 and keeps its prepared files; the same command
    again continues (without preparing again) and its JSON adds up both calls."""
    out = tmp_path / "calibrate.json"
    cmd = [sys.executable, str(ROOT / "bench" / "calibrate_full.py"), "--smoke", "--out", str(out)]
    cmd += ["--workdir", str(tmp_path / "work"), "--lora-rank", "4"]
    cut = subprocess.run([*cmd, "--time-limit", "0.2"], capture_output=True, text=True, timeout=600)
    assert cut.returncode == 3, cut.stdout[-3000:] + cut.stderr[-3000:]
    assert "rerun the same command to continue" in cut.stdout and not out.exists()
    source = tmp_path / "work" / "flux-random.safetensors"
    made = source.stat().st_mtime_ns
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert source.stat().st_mtime_ns == made  # not prepared again
    result = json.loads(out.read_text())
    assert [call["cut"] for call in result["calls"]] == [True, False]
    assert result["command_seconds"] == round(sum(c["seconds"] for c in result["calls"]), 1)
    assert "26 of 26 layers lower" in result["report"]


def test_calibration_benchmark_refuses_a_workdir_of_files_it_did_not_make(tmp_path):
    """--workdir pointed at the user's folder: its data/ and out.safetensors are left as they
    are (preparing deleted data/ and replaced out.safetensors)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("mine")
    (tmp_path / "out.safetensors").write_text("mine too")
    cmd = [sys.executable, str(ROOT / "bench" / "calibrate_full.py"), "--smoke"]
    cmd += ["--workdir", str(tmp_path), "--out", str(tmp_path / "calibrate.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"--workdir {tmp_path} holds data, out.safetensors, which this benchmark" in done.stderr
    assert (tmp_path / "data" / "mine.txt").read_text() == "mine"
    assert (tmp_path / "out.safetensors").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.safetensors"]
