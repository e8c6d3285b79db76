"""Every model family at full size, ternary against bf16, sampled by ComfyUI (random weights).

For each model (``FAMILY:PRESET``; by default flux2:dev, flux:dev, chroma:full,
flux2:klein-9b, flux2:klein-4b), in processes of their own (bench/comfy_env.py sets ComfyUI
up as main.py does; the parent holds no CUDA context):

1. **ternary**, on a GPU limited to ``--cap-gb`` (12 GiB by default: a 12 GB card, made by
   bench/comfy_env.py's memory ballast, so ComfyUI plans as on such a card and anything
   larger fails instead of passing unnoticed): the model's random bf16 weights are made on
   the GPU one tensor at a time and quantized as they come (models/files.quantize_tensors:
   the pack's one conversion loop, streamed into a format-v1 file by its StreamingWriter),
   so no dense file is ever written (FLUX.2 [dev], 64 GB in bf16, needs one layer of GPU
   memory and its ~7 GB ternary file of disk); the file is loaded with the pack's loader
   (nodes/model_io.load_ternary_patcher, what Load Ternary Diffusion Model runs: ComfyUI's
   own detection picks the model class) and sampled with ``comfy.sample.sample`` (euler /
   simple, cfg 1) from random conditioning of the family's shapes (text width and tokens,
   pooled vector or none, guidance) at 1024x1024;
2. **bf16**, where it fits in the GPU and host memory, uncapped: the same weights made in
   bf16, loaded by ComfyUI's ``load_diffusion_model_state_dict`` straight onto the GPU,
   sampled the same way.

Recorded per model: file size, share of parameters quantized, peak device memory (PyTorch's
allocator peak, weights + activations; and the device memory this process used at the
busiest step, CUDA context included), whether ComfyUI kept the whole model on the GPU,
seconds per step (median step of the timed prompt, after a warm-up prompt) and the relative
difference of the two final latents. The JSON is rewritten after every model, so a run cut
short keeps what it measured; models not started within ``--time-budget`` are listed as
skipped (run them in a second call with ``--models``).

    python bench/families.py --comfyui PATH --json $OUT/families.json        # GPU, ~7 min
    python bench/families.py --comfyui PATH --models flux2:dev --json f.json  # one model
    python bench/families.py --comfyui PATH --smoke --json smoke.json         # CPU, tiny

``--smoke`` runs tiny models on the CPU at 64x64 (the CI runs it). Chroma's smallest
ComfyUI-loadable model has 619 M parameters, so it is not in the smoke list (ask for
``--models chroma:tiny-comfy``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import comfy_env  # noqa: E402

GPU_MODELS = ("flux2:dev", "flux:dev", "chroma:full", "flux2:klein-9b", "flux2:klein-4b")
SMOKE_MODELS = ("flux2:tiny", "flux2:tiny-klein", "flux:tiny-schnell")
TARGETS = {"flux2:dev": {"file_bytes": 9e9, "peak_bytes": 12e9}}
MIN_RATIO = 6.0  # every family at least 6x smaller than bf16
GB = 1e9


def describe(spec: str, packing: str) -> dict:
    """What the shapes alone say (no weights): parameters, share quantized, tensor bytes."""
    comfy_env.load_pack()
    import torch

    from comfyui_ternary_flux.models.files import ternary_layers
    from comfyui_ternary_flux.models.registry import random_spec
    from comfyui_ternary_flux.ternary.convert import plan_entries

    family, _, config, _ = random_spec(spec)
    dense = {k: (torch.bfloat16, s) for k, s in family.shapes(config).items()}
    layers = ternary_layers(family, dense, 0)
    total = sum(math.prod(s) for _, s in dense.values())
    quantized = sum(p.n * p.k for p in layers.values())
    record = {
        "model": spec,
        "family": family.name,
        "title": family.title,
        "describe": family.describe(config),
        "config": config.as_dict(),
        "params_total": total,
        "params_quantized": quantized,
        "share_quantized_percent": 100 * quantized / total,
        "ternary_layers": len(layers),
        "bf16_bytes": 2 * total,
        "packing": packing,
    }
    for layout in ("2bit", "base3"):
        entries = plan_entries(dense, layers, layout)
        record[f"{layout}_tensor_bytes"] = sum(
            math.prod(s) * d.itemsize for d, s in entries.values()
        )
    return record


# -- in a child process -----------------------------------------------------------------------


def available_host_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def sample_prompts(spec: dict, patcher, family, config) -> dict:
    """Warm-up prompt, then the timed prompt, as KSampler samples (euler / simple, cfg 1)."""
    import comfy.sample
    import torch

    cuda = spec["device"] == "cuda"
    cap = spec.get("cap_bytes")
    text = family.conditioning(config)
    latent_format = patcher.model.latent_format
    side = spec["resolution"] // latent_format.spacial_downscale_ratio
    latent = torch.zeros(1, latent_format.latent_channels, side, side)
    noise = comfy.sample.prepare_noise(latent, spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    extras = {"guidance": text.guidance}
    if text.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(1, text.pooled_dim, generator=gen)
    tokens = spec["text_tokens"] or text.tokens
    positive = [[torch.randn(1, tokens, text.context_dim, generator=gen), extras]]
    sampler = comfy_env.TimedSampler(
        patcher, noise, positive, latent, spec["seed"], cuda, cap if cap else None
    )
    prompt = sampler.prompt

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result: dict = {"latent_shape": list(latent.shape), "text_tokens": tokens}
    if spec["warmup"]:
        _, result["warmup_prompt_seconds"], _ = prompt(spec["warmup"])
    out, result["prompt_seconds"], steps = prompt(spec["steps"])
    result.update(
        dtype=str(patcher.model.get_dtype()).removeprefix("torch."),
        comfyui_model=type(patcher.model).__name__,
        comfyui_config=type(patcher.model.model_config).__name__,
        patcher=type(patcher).__name__,
        seconds_per_step=statistics.median(steps),
        step_seconds=[round(s, 5) for s in steps],
        peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
        peak_device_used_bytes=max(sampler.used) if sampler.used else None,
        loaded_bytes=patcher.loaded_size() if cuda else None,
        model_bytes=patcher.model_size(),
        finite=bool(torch.isfinite(out).all()),
    )
    torch.save(out.float().cpu(), spec["latent"])
    return result


def run_child(spec: dict) -> dict:
    """One variant (``ternary`` or ``bf16``) of one model, in this process."""
    cuda = spec["device"] == "cuda"
    cap_gb = spec["cap_gb"] if spec["role"] == "ternary" and cuda and spec["cap_gb"] else None
    _, ballast = comfy_env.setup(spec["comfyui"], spec["device"], dynamic=False, cap_gb=cap_gb)
    comfy_env.load_pack()
    import comfy.sd
    import torch

    from comfyui_ternary_flux.models.family import iter_random_weights, random_source
    from comfyui_ternary_flux.models.files import quantize_tensors
    from comfyui_ternary_flux.models.registry import random_spec
    from comfyui_ternary_flux.nodes.model_io import load_ternary_patcher

    family, _, config, seed = random_spec(spec["model"])
    seed = seed or spec["seed"]
    shapes = family.shapes(config)
    device = torch.device(spec["device"])
    stub = getattr(sys.modules.get("av"), "__loader__", None)
    result: dict = {"role": spec["role"], "cap_gib": cap_gb}
    result["av_stubbed"] = isinstance(stub, comfy_env._StubFinder)
    if cap_gb:
        spec["cap_bytes"] = int(cap_gb * comfy_env.GIB)
    try:
        if spec["role"] == "ternary":
            # random bf16 weights made on the device one tensor at a time, quantized as they
            # come and streamed into the file: no dense copy of the model exists anywhere
            start = time.perf_counter()
            source, get = random_source(shapes, seed, torch.bfloat16, device)
            report = quantize_tensors(
                source, get, spec["file"], packing=spec["packing"], device=device,
                overwrite=True, source=f"random {spec['model']}:{seed}",
            )  # fmt: skip
            if cuda:
                torch.cuda.synchronize()
            result.update(
                quantize_seconds=time.perf_counter() - start,
                file_bytes=Path(spec["file"]).stat().st_size,
                layer_error_median=statistics.median(e.ternary for e in report.layers),
                quantize_peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
            )
            del report, get
            start = time.perf_counter()
            patcher = load_ternary_patcher(spec["file"], 16)
        else:
            needed = 2 * sum(math.prod(s) for s in shapes.values())
            if cuda:
                free, _ = torch.cuda.mem_get_info()
                if needed + 8 * GB > free:
                    return result | {"skipped": f"needs {needed / GB:.1f} GB, {free / GB:.1f} free"}
            if needed > 0.8 * available_host_bytes():
                return result | {"skipped": f"needs {needed / GB:.1f} GB of host memory"}
            start = time.perf_counter()
            # the ternary file's weights again, kept on the host; ComfyUI copies them into a
            # model it builds on the GPU (one bf16 copy on each side, never two on one)
            state = {k: t.cpu() for k, t in iter_random_weights(shapes, seed, device=device)}
            place = {"load_device": device, "offload_device": device} if cuda else {}
            patcher = comfy.sd.load_diffusion_model_state_dict(
                state, model_options=place, disable_dynamic=True
            )
            del state
            gc.collect()
        result["load_seconds"] = time.perf_counter() - start
        result.update(sample_prompts(spec, patcher, family, config))
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
        if cuda:
            result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    finally:
        if ballast is not None:
            ballast.stdin.close()
            ballast.wait(timeout=60)
    return result


# -- the parent -------------------------------------------------------------------------------


def child(args: argparse.Namespace, spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"role": spec["role"], "error": f"timed out after {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"role": spec["role"], "error": done.stderr[-3000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_model(args: argparse.Namespace, spec: str, work: Path) -> dict:
    import torch

    record = describe(spec, args.packing)
    print(
        f"\n== {spec}: {record['describe']}, {record['params_total'] / 1e9:.2f} B parameters, "
        f"{record['share_quantized_percent']:.2f} % ternary",
        flush=True,
    )
    name = spec.replace(":", "-")
    base = {k: getattr(args, k) for k in ("comfyui", "device", "resolution", "steps", "warmup")}
    base |= {"text_tokens": args.text_tokens, "seed": args.seed, "packing": args.packing}
    base |= {"model": spec, "cap_gb": args.cap_gb, "file": str(work / f"{name}.safetensors")}
    for role in ("ternary", "bf16"):
        if role == "bf16" and args.bf16 == "none":
            record[role] = {"role": role, "skipped": "--bf16 none"}
            continue
        latent = work / f"{name}-{role}.pt"
        record[role] = child(args, {**base, "role": role, "latent": str(latent)})
        if role == "ternary" and "file_bytes" in record[role]:
            size = record[role]["file_bytes"]
            record["file"] = {"bytes": size, "ratio_vs_bf16": record["bf16_bytes"] / size}
            print(
                f"file     {size / GB:.3f} GB ({args.packing}), "
                f"{record['file']['ratio_vs_bf16']:.2f}x smaller than bf16, quantized in "
                f"{record[role]['quantize_seconds']:.1f} s",
                flush=True,
            )
        show(role, record[role])
        if not args.keep_files:
            Path(base["file"]).unlink(missing_ok=True)
    latents = [work / f"{name}-{role}.pt" for role in ("ternary", "bf16")]
    if all(p.exists() for p in latents):
        a, b = (torch.load(p) for p in latents)
        record["final_latent_relative_difference"] = relative(a, b)
    for p in latents:
        p.unlink(missing_ok=True)
    record["targets"] = targets(spec, record)
    return record


def targets(spec: str, record: dict) -> dict:
    """The issue's targets, for full-size models (tiny ones are mostly embedders)."""
    if spec.split(":")[1].startswith("tiny") or "file" not in record:
        return {}
    checks = {"at_least_6x_smaller_than_bf16": record["file"]["ratio_vs_bf16"] >= MIN_RATIO}
    ternary = record["ternary"]
    if ternary.get("cap_gib"):
        checks[f"samples_on_a_{ternary['cap_gib']:g}_gib_card"] = "seconds_per_step" in ternary
    for key, limit in TARGETS.get(spec, {}).items():
        if key == "file_bytes":
            checks[f"file_at_most_{limit / GB:g}_gb"] = record["file"]["bytes"] <= limit
        elif ternary.get("peak_allocated_bytes") is not None:
            checks[f"peak_at_most_{limit / GB:g}_gb"] = (
                "error" not in ternary and ternary["peak_allocated_bytes"] <= limit
            )
    return checks


def show(role: str, r: dict) -> None:
    if "error" in r or "skipped" in r:
        print(f"{role:8s} {r.get('error', r.get('skipped'))[-600:]}", flush=True)
        return
    peak = r["peak_allocated_bytes"]
    resident = ""
    if r["loaded_bytes"] is not None:
        resident = f", {r['loaded_bytes'] / GB:.2f} of {r['model_bytes'] / GB:.2f} GB on the GPU"
    print(
        f"{role:8s} {r['comfyui_config']} {r['dtype']}: {r['seconds_per_step']:.3f} s/step, peak "
        f"{'n/a' if peak is None else f'{peak / GB:.2f} GB'}{resident}, load "
        f"{r['load_seconds']:.1f} s",
        flush=True,
    )


def table(records: list[dict]) -> str:
    lines = [
        "| model | ComfyUI | params | ternary share | file | bf16 / file | peak ternary | "
        "peak bf16 | s/step ternary | s/step bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def peak(r):
        value = r.get("peak_allocated_bytes")
        return "n/a" if value is None else f"{value / GB:.2f} GB"

    def speed(r):
        if "seconds_per_step" in r:
            return f"{r['seconds_per_step']:.3f}"
        return (r.get("skipped") or "error").splitlines()[0][:40]

    for rec in records:
        t, b = rec["ternary"], rec["bf16"]
        file = rec.get("file")
        size = f"{file['bytes'] / GB:.3f} GB" if file else "-"
        ratio = f"{file['ratio_vs_bf16']:.2f}x" if file else "-"
        lines.append(
            f"| {rec['model']} | {t.get('comfyui_config', '?')} | "
            f"{rec['params_total'] / 1e9:.2f} B | {rec['share_quantized_percent']:.2f} % | "
            f"{size} | {ratio} | {peak(t)} | {'-' if 'skipped' in b else peak(b)} | "
            f"{speed(t)} | {speed(b)} |"
        )
    return "\n".join(lines)


def gpu_name(device: str) -> str:
    if device != "cuda":
        import platform

        return platform.processor() or "cpu"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "cuda (nvidia-smi failed)"


def run(args: argparse.Namespace) -> dict:
    import platform

    import torch

    results = {
        "environment": {
            "device": gpu_name(args.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "comfyui": comfy_env.comfyui_version(args.comfyui),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": [],
    }
    print(
        f"{results['environment']['device']} | torch {torch.__version__} | ComfyUI "
        f"{results['environment']['comfyui']} | {args.resolution}x{args.resolution}, "
        f"{args.steps} steps (+{args.warmup} warm-up), ternary on a {args.cap_gb:g} GiB card",
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for spec in args.models.split(","):
            if args.time_budget and time.perf_counter() - start > args.time_budget:
                results["models"].append({"model": spec, "skipped": "time budget spent"})
                print(f"\n== {spec}: skipped (time budget spent)", flush=True)
            else:
                results["models"].append(run_model(args, spec, Path(work)))
            results["seconds"] = time.perf_counter() - start
            if args.json:
                write_json(args.json, results)
    done = [r for r in results["models"] if "ternary" in r]
    print("\n" + table(done))
    for rec in done:
        if rec["targets"]:
            failed = [name for name, ok in rec["targets"].items() if not ok]
            verdict = "met" if not failed else "NOT met: " + ", ".join(failed)
            print(f"{rec['model']}: targets {verdict} ({', '.join(rec['targets'])})")
    print(f"total {time.perf_counter() - start:.0f} s")
    return results


def write_json(path: Path, data: dict) -> None:
    """Replace the JSON file atomically (a run cut short leaves the last complete one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="ComfyUI folder (holding comfy/sd.py)")
    p.add_argument("--json", type=Path, help="write every number here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU at 64x64")
    p.add_argument("--models", help=f"comma list of FAMILY:PRESET (default {','.join(GPU_MODELS)})")
    p.add_argument("--device", help="cuda (default) or cpu (--smoke)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default 1024)")
    p.add_argument("--text-tokens", type=int, help="text tokens (default: the family's)")
    p.add_argument("--steps", type=int, help="steps of the timed prompt (default 4)")
    p.add_argument("--warmup", type=int, help="steps of the warm-up prompt (default 1)")
    p.add_argument("--packing", choices=("base3", "2bit"), default="base3", help="file layout")
    p.add_argument("--cap-gb", type=float, default=12.0, help="GPU size for ternary runs (GiB)")
    p.add_argument("--bf16", choices=("auto", "none"), default="auto", help="bf16 where it fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=420.0, help="no new model after (s)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per child process")
    p.add_argument("--work", help="where the ternary files and latents are made (and deleted)")
    p.add_argument("--keep-files", action="store_true", help="keep the ternary files")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    smoke = args.smoke
    args.models = args.models or ",".join(SMOKE_MODELS if smoke else GPU_MODELS)
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.resolution = args.resolution or (64 if smoke else 1024)
    args.steps = args.steps if args.steps is not None else (1 if smoke else 4)
    args.warmup = args.warmup if args.warmup is not None else (0 if smoke else 1)
    if args.resolution % 16:
        raise SystemExit(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.json and args.json.exists() and not args.overwrite:
        raise SystemExit(f"{args.json} exists; pass --overwrite to replace it")
    results = run(args)
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r.get("ternary", {}) for r in results["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
