"""Calibrated quantization of the full FLUX.1-dev architecture on one GPU: time and peak
memory of ``quantize SRC --calibrate DATA`` for 256 calibration prompts at 1024x1024.

Targets (issue 15): under 20 minutes and under 24 GB on one H100 / H200. The weights are
random bf16 in the exact FLUX.1-dev shapes (written to disk first, as ``bench/quantize_full.py``
does: calibration reads the blocks in the model's order, so it needs a file, not a stream);
the teacher data set is made by the pack's own builder with the stand-in text encoder (256
T5 tokens, ComfyUI's length for a short prompt) and a zero velocity, so its latents are noise
at the stored times: the work per example is that of real teacher data, the quality numbers
are meaningless. The CLI runs in a subprocess; its report gives the calibration time and the
device memory (PyTorch's peak allocated and reserved).

    python bench/calibrate_full.py --out $OUT/calibrate-full.json      # on the GPU machine
    python bench/calibrate_full.py --smoke --out /tmp/smoke.json         # CPU, tiny (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
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

TARGET_SECONDS = 20 * 60
TARGET_BYTES = 24 * 10**9


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 prompts, on the CPU")
    parser.add_argument("--samples", type=int, default=None, help="calibration prompts (256)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--inputs", choices=("quantized", "dense"), default="quantized")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--workdir", default=None, help="where the 24 GB source file goes")
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
    started = time.perf_counter()
    source_bytes = write_random_model(src, config, device)
    write_data(data, samples, side, config.context_in_dim, tokens)
    prepared = time.perf_counter() - started
    cmd = [
        sys.executable, "-m", "comfyui_ternary_flux", "quantize", str(src), "-o", str(dst),
        "--device", device, "--lora-rank", str(args.lora_rank), "--calibrate", str(data),
        "--calibration-samples", str(samples), "--calibration-inputs", args.inputs, "--force",
        "--restart",  # timed from the first block: never resume a cut run's blocks
    ]  # fmt: skip
    # The CLI's output goes to a log beside --out as it runs, so a run cut short by a time
    # limit still shows how far calibration got (its progress lines carry the block count).
    log_path = Path(args.out).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    report = log_path.read_text()
    if proc.returncode:
        print(report, file=sys.stderr)
        raise SystemExit(f"quantize --calibrate failed with exit code {proc.returncode}")
    allocated = re.search(r"peak GPU memory\s+([0-9.]+) GiB allocated, ([0-9.]+) GiB", report)
    peak = None if allocated is None else float(allocated.group(1)) * 2**30
    result = {
        "benchmark": "calibrate_full",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": "tiny" if args.smoke else "dev",
        "samples": samples,
        "resolution": side,
        "text_tokens": tokens,
        "lora_rank": args.lora_rank,
        "inputs": args.inputs,
        "source_bytes": source_bytes,
        "prepare_seconds": round(prepared, 1),
        "command_seconds": round(wall, 1),
        "calibration_seconds": report_number(report, "calibration time"),
        "peak_gpu_allocated_bytes": peak,
        "peak_gpu_reserved_bytes": (
            None if allocated is None else float(allocated.group(2)) * 2**30
        ),
        "peak_ram_gb": report_number(report, "peak RAM (process)"),
        "output_bytes": dst.stat().st_size,
        "report": report,
    }
    if not args.smoke:
        result["targets"] = {
            "time_under_20_min": wall < TARGET_SECONDS,
            "memory_under_24_GB": peak is not None and peak < TARGET_BYTES,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(report)
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
