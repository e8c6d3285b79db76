"""Sampling through the user's path: ComfyUI's loaders, this pack's loader, comfy.sample.sample.

FLUX.1-dev architecture with random weights (drawn from a seed; nothing is downloaded). The
parent process writes the files once (a bf16 file, as UNETLoader reads it, and the ternary
file quantized from it), then runs every variant in a process of its own:

* weights: ``bf16`` and ``fp8_fast`` (ComfyUI's ``comfy.sd.load_diffusion_model``, weight_dtype
  default / ``fp8_e4m3fn_fast``), ``a16`` / ``a8`` (this pack's Load Ternary Diffusion Model
  function, 16-bit or fp8 activations);
* ``+compile`` / ``+cudagraphs``: ComfyUI's TorchCompileModel node, backend inductor /
  cudagraphs;
* ``dynamic``: Dynamic VRAM enabled as main.py enables it (else the legacy ModelPatcher);
* ``cap``: the GPU limited to that many GiB, so ComfyUI offloads as on such a card
  (bench/comfy_env.py).

Each variant samples as KSampler does (euler / simple, cfg 1, random FLUX conditioning of
256 T5 tokens, guidance 3.5): one warm-up prompt (compilation, autotuning), then two timed
prompts of ``--steps`` steps. s/step is the median step interval (the GPU synchronised at
each step's callback); the second prompt's overhead is its wall time minus steps x s/step
(what each queued prompt costs beyond its steps). Peak device memory: PyTorch's allocator
peak, and the device's used memory (all processes but the ballast) at the peak step.
The A8 and A16 final latents are compared (same weights, seeds and noise).

    python bench/comfy_sampling.py --comfyui PATH --work DIR --json OUT.json
    python bench/comfy_sampling.py --config tiny --device cpu --work DIR --json OUT.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import comfy_env  # noqa: E402

WEIGHTS = {"bf16": "bf16", "fp8_fast": "fp8_fast", "ternary A16": "a16", "ternary A8": "a8"}
VARIANTS = {  # name -> (weights, TorchCompileModel backend or None, dynamic, cap GiB)
    **{name: (weights, None, False, None) for name, weights in WEIGHTS.items()},
    **{f"{name} +compile": (w, "inductor", False, None) for name, w in WEIGHTS.items()},
    **{f"{name} +cudagraphs": (w, "cudagraphs", False, None) for name, w in WEIGHTS.items()},
    "bf16 dynamic": ("bf16", None, True, None),
    "fp8_fast dynamic": ("fp8_fast", None, True, None),
    "ternary A8 dynamic": ("a8", None, True, None),
}
for _cap in (8, 12, 16, 24):
    for _weights in ("bf16", "fp8_fast", "a8"):
        _name = {"a8": "ternary A8"}.get(_weights, _weights)
        VARIANTS[f"{_name} {_cap}GB"] = (_weights, None, False, _cap)
        VARIANTS[f"{_name} dynamic {_cap}GB"] = (_weights, None, True, _cap)

CONFIGS = {  # name -> (FLUX preset, resolution, text tokens)
    "dev": ("dev", 1024, 256),
    "tiny": ("tiny", 64, 8),
}


def file_names(work: Path, config: str) -> tuple[Path, Path]:
    return work / f"flux-{config}-bf16.safetensors", work / f"flux-{config}-2bit.safetensors"


def make_files(work: Path, config: str, device: str, seed: int) -> tuple[Path, Path]:
    """The bf16 file (written tensor by tensor) and its 2bit ternary file, made once."""
    comfy_env.load_pack()
    import torch

    from comfyui_ternary_flux.models.family import random_weights
    from comfyui_ternary_flux.models.files import quantize_file
    from comfyui_ternary_flux.models.flux1 import FAMILY, flux_shapes
    from comfyui_ternary_flux.ternary.fileformat import StreamingWriter

    work.mkdir(parents=True, exist_ok=True)
    dense, ternary = file_names(work, config)
    shapes = flux_shapes(FAMILY.presets[CONFIGS[config][0]])
    if not dense.exists():
        entries = {k: (torch.bfloat16, s) for k, s in shapes.items()}
        source = {"source": f"random FLUX.1 {config}, seed {seed}"}
        with StreamingWriter(dense, entries, source) as writer:
            for i, (key, shape) in enumerate(shapes.items()):
                writer.write(key, random_weights({key: shape}, seed + i, device=device)[key])
    if not ternary.exists():
        quantize_file(dense, ternary, packing="2bit", device=device)
    return dense, ternary


def run_child(spec: dict) -> dict:
    """One variant in this process (called with --child)."""
    weights, compile_backend, dynamic, cap = VARIANTS[spec["variant"]]
    mm, ballast = comfy_env.setup(spec["comfyui"], spec["device"], dynamic, cap)
    comfy_env.load_pack()
    import comfy.sample
    import comfy.sd
    import torch

    from comfyui_ternary_flux.nodes.model_io import load_ternary_patcher

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    start = time.perf_counter()
    if weights in ("bf16", "fp8_fast"):
        options = {}
        if weights == "fp8_fast":
            options = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
        model = comfy.sd.load_diffusion_model(spec["dense"], model_options=options)
    else:
        model = load_ternary_patcher(spec["ternary"], act_bits=16 if weights == "a16" else 8)
    load_seconds = time.perf_counter() - start
    if compile_backend:
        from comfy_extras.nodes_torch_compile import TorchCompileModel

        model = TorchCompileModel.execute(model, compile_backend).args[0]
    _, resolution, tokens = CONFIGS[spec["config"]]
    gen = torch.Generator().manual_seed(spec["seed"])
    context = torch.randn(1, tokens, 4096, generator=gen)
    pooled = torch.randn(1, 768, generator=gen)
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    latent = torch.zeros(1, 16, resolution // 8, resolution // 8)
    noise = torch.randn(latent.shape, generator=gen)
    cap_bytes = int(cap * comfy_env.GIB) if cap else None
    sampler = comfy_env.TimedSampler(model, noise, positive, latent, spec["seed"], cuda, cap_bytes)
    prompt = sampler.prompt

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _, warmup_seconds, _ = prompt(spec["warmup"])
    steps = spec["cap_steps"] if cap else spec["steps"]
    _, first_seconds, first_steps = prompt(steps)
    out, second_seconds, second_steps = prompt(steps)
    per_step = statistics.median(first_steps[1:] + second_steps[1:])
    result = {
        "variant": spec["variant"],
        "weights": weights,
        "compile": compile_backend,
        "dynamic_vram": dynamic,
        "cap_gib": cap,
        "patcher": type(model).__name__,
        "load_seconds": round(load_seconds, 3),
        "warmup_prompt_seconds": round(warmup_seconds, 3),
        "seconds_per_step": per_step,
        "step_seconds": [round(s, 5) for s in first_steps + second_steps],
        "prompt_seconds": [round(first_seconds, 4), round(second_seconds, 4)],
        "second_prompt_overhead_seconds": round(second_seconds - steps * per_step, 4),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "peak_device_used_bytes": max(sampler.used) if sampler.used else None,
        "loaded_bytes": model.loaded_size() if cuda else None,
        "model_bytes": model.model_size(),
    }
    torch.save(out.cpu(), Path(spec["work"]) / f"latent-{spec['variant'].replace(' ', '_')}.pt")
    if ballast is not None:
        ballast.stdin.close()
        ballast.wait(timeout=60)
    return result


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI folder (holding comfy/sd.py)")
    parser.add_argument("--config", choices=list(CONFIGS), default="dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", help="folder for the model files and latents (required)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--variants", default="bf16,fp8_fast,ternary A16,ternary A8",
                        help="comma-separated: " + ", ".join(VARIANTS))  # fmt: skip
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cap-steps", type=int, default=3, help="steps of capped variants")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make-files", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    if args.make_files:  # its own process: the parent holds no CUDA context while measuring
        make_files(Path(args.work), args.config, args.device, args.seed)
        return 0
    if not args.work:
        parser.error("--work is required")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not names:
        parser.error("--variants names no variant")
    work = Path(args.work)
    start = time.perf_counter()
    command = [sys.executable, __file__, "--make-files", "--work", str(work)]
    command += ["--config", args.config, "--device", args.device, "--seed", str(args.seed)]
    subprocess.run(command, check=True)
    dense, ternary = file_names(work, args.config)
    print(f"files ready in {time.perf_counter() - start:.0f} s", flush=True)
    results = []
    for name in names:
        spec = {**vars(args), "variant": name, "dense": str(dense), "ternary": str(ternary)}
        spec.pop("child")
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"variant": name, "error": f"timed out after {args.timeout} s"})
        else:
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                results.append({"variant": name, "error": done.stderr[-3000:]})
            else:
                results.append(json.loads(lines[-1][len("RESULT ") :]))
        row = results[-1]
        print(f"{name}: {row.get('seconds_per_step', row.get('error', '')[-300:])}", flush=True)
        summary = write_results(args, results, work)  # after each variant: a cut run keeps it
    print(markdown(results, summary))
    return 0 if all("error" not in r for r in results) else 1


def write_results(args: argparse.Namespace, results: list[dict], work: Path) -> dict:
    """The JSON of the variants run so far (to ``--json``); returns their summary."""
    summary = summarise(results, work)
    info = {
        "gpu": gpu_name(args.device),
        "torch": torch_version(),
        "comfyui": comfy_env.comfyui_version(args.comfyui),
        "python": platform.python_version(),
        "config": {k: vars(args)[k] for k in ("config", "steps", "warmup", "seed")},
        "variants": results,
        **summary,
    }
    if args.json:  # atomically: a run cut while writing keeps the previous variants' JSON
        comfy_env.load_pack()
        from comfyui_ternary_flux.ternary.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(info, indent=1))
    return summary


def summarise(results: list[dict], work: Path) -> dict:
    """Same-run ratios of s/step, and the A8 vs A16 final-latent difference."""
    import torch

    by = {r["variant"]: r for r in results if "error" not in r}
    pairs = {
        "ternary A8 / fp8_fast": ("ternary A8", "fp8_fast"),
        "ternary A16 / bf16": ("ternary A16", "bf16"),
        "ternary A8 +compile / fp8_fast +compile": ("ternary A8 +compile", "fp8_fast +compile"),
        "ternary A16 +compile / bf16 +compile": ("ternary A16 +compile", "bf16 +compile"),
        "ternary A8 +cudagraphs / fp8_fast +cudagraphs": (
            "ternary A8 +cudagraphs",
            "fp8_fast +cudagraphs",
        ),
        "ternary A16 +cudagraphs / bf16 +cudagraphs": (
            "ternary A16 +cudagraphs",
            "bf16 +cudagraphs",
        ),
    }
    for cap in (8, 12, 16, 24):
        pairs[f"{cap}GB: fastest of bf16, fp8_fast / ternary A8"] = (
            f"min:bf16 {cap}GB|fp8_fast {cap}GB",
            f"ternary A8 {cap}GB",
        )
    ratios = {}
    for label, (a, b) in pairs.items():
        if a.startswith("min:"):
            options = [by[n]["seconds_per_step"] for n in a[4:].split("|") if n in by]
            top = min(options) if options else None
        else:
            top = by[a]["seconds_per_step"] if a in by else None
        if top is not None and b in by:
            ratios[label] = top / by[b]["seconds_per_step"]
    latents = {}
    files = {n: work / f"latent-{n.replace(' ', '_')}.pt" for n in ("ternary A8", "ternary A16")}
    if all(f.exists() for f in files.values()):
        a8, a16 = (torch.load(f) for f in files.values())
        latents["final_latent_a8_vs_a16_relative"] = relative(a8, a16)
    return {"ratios": ratios, **latents}


def markdown(results: list[dict], summary: dict) -> str:
    lines = ["| variant | s/step | 2nd prompt overhead | peak allocated | device used | patcher |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | error | | | | |")
            continue
        gb = lambda v: "n/a" if v is None else f"{v / 1e9:.1f} GB"  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['seconds_per_step']:.4f} | "
            f"{r['second_prompt_overhead_seconds']:.3f} s | {gb(r['peak_allocated_bytes'])} | "
            f"{gb(r['peak_device_used_bytes'])} | {r['patcher']} |"
        )
    for label, value in summary["ratios"].items():
        lines.append(f"\n{label}: {value:.3f}x")
    if "final_latent_a8_vs_a16_relative" in summary:
        lines.append(f"\nfinal latent A8 vs A16: {summary['final_latent_a8_vs_a16_relative']:.4f}")
    return "\n".join(lines)


def gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()


def torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
