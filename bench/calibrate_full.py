"""Calibrated quantization of the full FLUX.1-dev architecture on one GPU: time and peak
memory of ``quantize SRC --calibrate DATA`` for 256 calibration prompts at 1024x1024.

Targets (issue 15): under 20 minutes and under 24 GB on one H100 / H200. The weights are
random bf16 in the exact FLUX.1-dev shapes (written to disk first, as ``bench/quantize_full.py``
does: calibration reads the blocks in the model's order, so it needs a file, not a stream);
the teacher data set is made by the pack's own builder with the stand-in text encoder (256
T5 tokens, ComfyUI's length for a short prompt) and a zero velocity, so its latents are noise
at the stored times: the work per example is that of real teacher data, the quality numbers
are meaningless. The CLI runs in a subprocess; its report gives the calibration time and the
device memory (PyTorch's peak allocated and reserved); the whole device's use is sampled
beside it every second.

The whole run (about 50 s of preparation, about 10 minutes of the CLI on an H200) is longer
than one 10-minute device call. ``--time-limit S`` stops the CLI after S seconds (exit code 3;
its finished blocks stay in the calibration's resume store) and the same command again, in
the same ``--workdir``, continues it without preparing again; the JSON then adds up the calls'
seconds and takes the largest device use. The CLI's own peak is that of its last call (a cut
call prints none).

    python bench/calibrate_full.py --workdir /tmp/cal --time-limit 480 --out $OUT/cal.json
    python bench/calibrate_full.py --smoke --out /tmp/smoke.json         # CPU, tiny (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from comfyui_ternary_flux.bench.quantize_full import write_random_model
from comfyui_ternary_flux.distill.teacher import (
    TeacherSettings,
    build_teacher_dataset,
    hashed_prompt_encoder,
)
from comfyui_ternary_flux.models.flux1 import FLUX_DEV, TINY_FLUX
from comfyui_ternary_flux.ternary.atomic import write_json_atomic

TARGET_SECONDS = 20 * 60
TARGET_BYTES = 24 * 10**9
CALLS = "calls.json"  # in the workdir: the settings and each call's seconds, for a rerun
CUT = 3  # exit code of a call stopped by --time-limit


def write_data(path: Path, prompts: int, side: int, context_dim: int, tokens: int) -> None:
    """A teacher data set of ``prompts`` examples (one point each) at side x side pixels."""
    settings = TeacherSettings(
        width=side, height=side, steps=1, points_per_prompt=1, shard_size=32,
        storage_dtype="bfloat16",
    )  # fmt: skip
    build_teacher_dataset(
        path,
        [f"calibration prompt {i}" for i in range(prompts)],
        hashed_prompt_encoder(context_len=tokens, context_dim=context_dim),
        lambda z, t, cond: torch.zeros_like(z),
        settings,
        log=lambda _: None,
    )


def report_number(report: str, label: str) -> float | None:
    match = re.search(rf"^{re.escape(label)}\s+([0-9.]+)", report, re.MULTILINE)
    return None if match is None else float(match.group(1))


class DeviceUse:
    """The largest whole-device memory use (total - free) seen while it runs, sampled every
    second: it counts what PyTorch's own peak leaves out (the CUDA context, the cache a
    cut call never reports) and the other processes on the GPU, if any."""

    def __init__(self, device: str) -> None:
        self.peak, self._done = 0, threading.Event()
        self._thread = None
        if device == "cuda":
            self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(1.0):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def __enter__(self) -> DeviceUse:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 prompts, on the CPU")
    parser.add_argument("--samples", type=int, default=None, help="calibration prompts (256)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--inputs", choices=("quantized", "dense"), default="quantized")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--workdir", default=None, help="where the 24 GB source file goes")
    parser.add_argument(
        "--time-limit", type=float, default=None,
        help="stop the CLI after these seconds (exit 3); rerun in the same --workdir to go on",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "calibrate-full.json")
    )
    args = parser.parse_args(argv)
    config = TINY_FLUX if args.smoke else FLUX_DEV
    samples = args.samples or (4 if args.smoke else 256)
    side = 64 if args.smoke else 1024
    tokens = 8 if args.smoke else 256
    device = args.device or ("cpu" if args.smoke else "cuda")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ternary-calibrate-"))
    src, data, dst = work / "flux-random.safetensors", work / "data", work / "out.safetensors"
    settings = {"config": "tiny" if args.smoke else "dev", "samples": samples,
                "lora_rank": args.lora_rank, "inputs": args.inputs, "device": device}  # fmt: skip
    calls_path = work / CALLS
    state = json.loads(calls_path.read_text()) if calls_path.is_file() else None
    if state is not None and (
        state["settings"] != settings or state.get("done") or "calls" not in state
    ):
        state = None  # other settings, a finished run, or one stopped preparing: start over
    if state is None:
        in_the_way = [p.name for p in (src, data, dst) if p.exists()]
        if in_the_way and not calls_path.is_file():  # the user's folder: data/ is not ours
            parser.error(
                f"--workdir {work} holds {', '.join(in_the_way)}, which this benchmark did not "
                "make (no calls.json) and would replace; use an empty or new folder"
            )
        started = time.perf_counter()
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(calls_path, {"settings": settings})  # the folder is ours from here
        shutil.rmtree(data, ignore_errors=True)  # this benchmark's own folder: made again
        source_bytes = write_random_model(src, config, device)
        write_data(data, samples, side, config.context_in_dim, tokens)
        state = {"settings": settings, "source_bytes": source_bytes, "calls": [],
                 "prepare_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        write_json_atomic(calls_path, state)
    cmd = [
        sys.executable, "-m", "comfyui_ternary_flux", "quantize", str(src), "-o", str(dst),
        "--device", device, "--lora-rank", str(args.lora_rank), "--calibrate", str(data),
        "--calibration-samples", str(samples), "--calibration-inputs", args.inputs, "--force",
    ]  # fmt: skip
    if not state["calls"]:
        cmd.append("--restart")  # timed from the first block: never resume an older run's
    # The CLI's output goes to a log beside --out as it runs, so a call cut short still shows
    # how far calibration got (its progress lines carry the block count).
    log_path = Path(args.out).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if state["calls"] and log_path.is_file() else 0
    started = time.perf_counter()
    with log_path.open("a" if offset else "w") as log, DeviceUse(device) as use:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            returncode = proc.wait(timeout=args.time_limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
            cut = True
        else:
            cut = False
    call = {"seconds": round(time.perf_counter() - started, 1), "cut": cut,
            "device_used_peak_bytes": use.peak or None}  # fmt: skip
    state["calls"].append(call)
    state["done"] = not cut and returncode == 0
    write_json_atomic(calls_path, state)
    report = log_path.read_text()[offset:]  # this call's output
    if cut:
        print(f"stopped after {call['seconds']} s; rerun the same command to continue")
        return CUT
    if returncode:
        print(report, file=sys.stderr)
        raise SystemExit(f"quantize --calibrate failed with exit code {returncode}")
    allocated = re.search(r"peak GPU memory\s+([0-9.]+) GiB allocated, ([0-9.]+) GiB", report)
    peak = None if allocated is None else float(allocated.group(1)) * 2**30
    command_seconds = round(sum(c["seconds"] for c in state["calls"]), 1)
    used = [c["device_used_peak_bytes"] for c in state["calls"] if c["device_used_peak_bytes"]]
    result = {
        "benchmark": "calibrate_full",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        **settings,
        "resolution": side,
        "text_tokens": tokens,
        "source_bytes": state["source_bytes"],
        "prepare_seconds": state["prepare_seconds"],
        "calls": state["calls"],
        "command_seconds": command_seconds,
        "calibration_seconds_last_call": report_number(report, "calibration time"),
        "peak_gpu_allocated_bytes_last_call": peak,
        "peak_gpu_reserved_bytes_last_call": (
            None if allocated is None else float(allocated.group(2)) * 2**30
        ),
        "device_used_peak_bytes": max(used) if used else None,
        "peak_ram_gb": report_number(report, "peak RAM (process)"),
        "output_bytes": dst.stat().st_size,
        "report": report,
    }
    if not args.smoke:
        # Memory judged by the whole device's use over every call (a cut call reports no peak
        # of its own); it counts PyTorch's cache too, so it is the stricter of the two figures.
        result["targets"] = {
            "time_under_20_min": command_seconds < TARGET_SECONDS,
            "memory_under_24_GB": bool(used) and max(used) < TARGET_BYTES,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(report)
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
