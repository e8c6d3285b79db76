"""Distillation on N processes against 1: seconds per optimizer step and the loss curves.

Builds a teacher data set with the command-line teacher (random-weight FLUX, stand-in text
encoder) under ``torchrun --nproc-per-node N``, then runs the same distillation config with
1 process and with N processes, and prints one JSON object:

    python bench/distill_speedup.py --gpus 2 --out results/distill-speedup.json
    python bench/distill_speedup.py --preset tiny --gpus 2 --device cpu --steps 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def torchrun(nproc: int, command: str, config: Path, log: Path) -> float:
    """Run a CLI subcommand (teacher, distill) under torchrun; returns wall seconds."""
    started = time.perf_counter()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "comfyui_ternary_flux",
            command, str(config)]  # fmt: skip
    with open(log, "w") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{command} with {nproc} process(es) failed ({done.returncode})")
    return time.perf_counter() - started


def step_records(work_dir: Path) -> list[dict]:
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--preset", choices=("dev", "tiny"), default="dev")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    env_threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update(env_threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = f"random:{args.preset}:7"
        teacher = {
            "model": model, "output": "data", "prompt_count": args.prompts, "device": args.device,
            "width": args.resolution, "height": args.resolution, "steps": 4, "guidance": 3.5,
            "points_per_prompt": 2, "shard_size": 2,
        }  # fmt: skip
        (tmp / "teacher.json").write_text(json.dumps(teacher))
        teacher_s = torchrun(args.gpus, "teacher", tmp / "teacher.json", tmp / "teacher.log")
        runs = {}
        for nproc in (1, args.gpus):
            config = {
                "model": model, "data": "data", "output": f"out-{nproc}.safetensors",
                "lora_rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
                "checkpoint_every": args.steps, "device": args.device, "seed": 1,
            }  # fmt: skip
            path = tmp / f"distill-{nproc}.json"
            path.write_text(json.dumps(config))
            wall = torchrun(nproc, "distill", path, tmp / f"distill-{nproc}.log")
            records = step_records(tmp / f"out-{nproc}.safetensors.work")
            timed = [r["seconds"] for r in records[2:]] or [r["seconds"] for r in records]
            runs[nproc] = {
                "wall_s": round(wall, 1),
                "step_s_median": statistics.median(timed),
                "losses": [r["loss"] for r in records],
            }
    one, many = runs[1], runs[args.gpus]
    result = {
        "preset": args.preset,
        "resolution": args.resolution,
        "global_batch": args.batch_size,
        "lora_rank": args.rank,
        "teacher_build_s": round(teacher_s, 1),
        "processes": args.gpus,
        "one_process": one,
        "parallel": many,
        "speedup": round(one["step_s_median"] / many["step_s_median"], 3),
        "max_loss_rel_diff": max(
            abs(a - b) / max(abs(a), 1e-12)
            for a, b in zip(one["losses"], many["losses"], strict=True)
        ),
    }
    try:
        import torch

        if torch.cuda.is_available():
            result["device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
