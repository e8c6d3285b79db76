"""Quantize the full FLUX.1-dev architecture (random bf16 weights) with the CLI and record
file sizes, time and peak RAM. Run on the GPU machine: ``python bench/quantize_full.py``.

Writes JSON (``--out``, default ``$OUT/quantize-full.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from comfyui_ternary_flux.models.flux1 import FLUX_DEV, TINY_FLUX, random_flux_state_dict
from comfyui_ternary_flux.ternary.fileformat import StreamingWriter

RUNS = (
    ("base3", []),
    ("2bit", ["--packing", "2bit"]),
    ("base3 + LoRA r64", ["--lora-rank", "64"]),
)


def write_random_model(path: Path, config, device: str) -> int:
    state = random_flux_state_dict(config, seed=0, device=device)
    entries = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    with StreamingWriter(path, entries, {"source": "random FLUX weights"}, overwrite=True) as w:
        for key, tensor in state.items():
            w.write(key, tensor)
    del state
    torch.cuda.empty_cache() if device == "cuda" else None
    return path.stat().st_size


def _peak_ram_gb(report: str) -> float:
    """The CLI report's own 'peak RAM (process)' line (getrusage of the quantizing process)."""
    line = next(line for line in report.splitlines() if line.startswith("peak RAM"))
    return float(line.split()[-2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", choices=("dev", "tiny"), default="dev")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=None, help="where the 24 GB source file goes")
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "quantize-full.json")
    )
    args = parser.parse_args()
    config = FLUX_DEV if args.config == "dev" else TINY_FLUX
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ternary-bench-"))
    src = work / "flux-random-bf16.safetensors"
    t0 = time.perf_counter()
    src_bytes = write_random_model(src, config, args.device)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "source_bytes": src_bytes,
        "source_write_seconds": time.perf_counter() - t0,
        "runs": [],
    }
    for name, extra in RUNS:
        dst = work / f"out-{len(result['runs'])}.safetensors"
        cmd = [sys.executable, "-m", "comfyui_ternary_flux", "quantize", str(src), "-o", str(dst)]
        cmd += ["--device", args.device, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{name}: quantize failed with exit code {proc.returncode}")
        size = dst.stat().st_size
        result["runs"].append(
            {
                "run": name,
                "bytes": size,
                "ratio": src_bytes / size,
                "seconds": seconds,
                "peak_rss_gb": _peak_ram_gb(proc.stdout),
                "report": proc.stdout,
            }
        )
        dst.unlink()
    src.unlink()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"| file | size | vs bf16 ({src_bytes / 1e9:.2f} GB) | time | peak RAM |")
    print("|---|---|---|---|---|")
    for run in result["runs"]:
        print(
            f"| {run['run']} | {run['bytes'] / 1e9:.3f} GB | {run['ratio']:.2f}x smaller | "
            f"{run['seconds']:.0f} s | {run['peak_rss_gb']:.2f} GB |"
        )
    print(f"device: {result['device']}")


if __name__ == "__main__":
    main()
