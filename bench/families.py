"""Every model family at full size, ternary against bf16, sampled by ComfyUI (random weights).

For each model (``FAMILY:PRESET``: flux2:dev, flux:dev, chroma:full, flux2:klein-9b,
flux2:klein-4b by default) it

1. makes the model's random bf16 weights on the GPU one tensor at a time and quantizes them
   as they come (models/files.quantize_tensors: the pack's one conversion loop, streamed
   into a format-v1 file by its StreamingWriter), so no dense file is ever written: FLUX.2
   [dev] (64 GB in bf16) needs one layer of GPU memory and its ~8.5 GB ternary file of disk;
2. loads that file with the pack's loader (nodes/model_io.load_ternary_patcher, what the
   Load Ternary Diffusion Model node runs: ComfyUI's own detection picks the model class)
   and samples with ComfyUI (``comfy.sample.sample``: euler / simple, cfg 1, denoise 1)
   from random conditioning of the family's shapes (text width and tokens, pooled vector or
   none, guidance) at 1024x1024, under a cap on the CUDA allocator (``--cap-gb``, 12 by
   default: a run that needs more fails with out-of-memory instead of passing unnoticed);
3. where bf16 fits (GPU and host memory), makes the same weights in bf16, loads them with
   ComfyUI's ``load_diffusion_model_state_dict`` straight onto the GPU and samples the same
   way, in the same process;

and records the file size, the share of parameters quantized, peak device memory (the
allocator's high-water mark while sampling: weights + activations; the CUDA context, about
0.5 GB, is outside it), seconds per step (median of the timed call's steps, after a warm-up
call) and the relative difference of the final latents. The JSON is rewritten after every
model, so a run cut short keeps what it measured.

    python bench/families.py --comfyui PATH --json $OUT/families.json        # GPU, ~6 min
    python bench/families.py --comfyui PATH --models flux2:dev --steps 8     # one model
    python bench/families.py --comfyui PATH --smoke --json smoke.json         # CPU, tiny

``--smoke`` runs tiny models of each family on the CPU at 64x64 (the CI runs it); Chroma's
smallest ComfyUI-loadable model has 619 M parameters, so it is in the smoke list only when
asked for (``--models chroma:tiny-comfy``). ComfyUI is found as bench/e2e.py finds it;
``av`` (PyAV, imported by ComfyUI's node API but not needed here) is stubbed when it is not
installed (``--stub-av`` forces it).
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import environment, find_comfyui, write_json  # noqa: E402 (also loads the pack)

from comfyui_ternary_flux.models.family import iter_random_weights, random_source  # noqa: E402
from comfyui_ternary_flux.models.files import quantize_tensors, ternary_layers  # noqa: E402
from comfyui_ternary_flux.models.registry import random_spec  # noqa: E402
from comfyui_ternary_flux.ternary.convert import plan_entries  # noqa: E402
from comfyui_ternary_flux.ternary.measure import format_bytes  # noqa: E402

GPU_MODELS = ("flux2:dev", "flux:dev", "chroma:full", "flux2:klein-9b", "flux2:klein-4b")
SMOKE_MODELS = ("flux2:tiny", "flux2:tiny-klein", "flux:tiny", "flux:tiny-schnell")
TARGETS = {"flux2:dev": {"file_bytes": 9e9, "peak_bytes": 12e9}}
MIN_RATIO = 6.0  # every family at least 6x smaller than bf16


def stub_av(force: bool = False) -> bool:
    """Make ``import av`` (and ``av.*``) succeed with empty stand-ins when PyAV is missing:
    ComfyUI's node API imports it for video types this benchmark never uses."""
    if not force:
        try:
            import av  # noqa: F401

            return False
        except ImportError:
            pass

    class Stub(types.ModuleType):
        __path__: list = []  # a package: ``from av.container import X`` works

        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (), {})
            setattr(self, name, value)
            return value

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "av" or fullname.startswith("av."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return Stub(spec.name)

        def exec_module(self, module) -> None:
            pass

    for name in [n for n in sys.modules if n == "av" or n.startswith("av.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, Finder())
    return True


def import_comfyui(path: Path, device: torch.device):
    """ComfyUI in this process (legacy ModelPatcher: the allocator's peak is the model's)."""
    sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"
    args.disable_dynamic_vram = True
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    from comfyui_ternary_flux.nodes.model_io import load_ternary_patcher

    version = "unknown"
    if (path / "comfyui_version.py").is_file():
        scope: dict = {}
        exec((path / "comfyui_version.py").read_text(), scope)
        version = scope.get("__version__", version)
    return comfy, load_ternary_patcher, version


def available_host_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
        self.stubbed_av = stub_av(args.stub_av)
        comfyui = find_comfyui(args.comfyui)
        self.comfy, self.load_ternary, version = import_comfyui(comfyui, self.device)
        self.env = environment(self.device, version) | {"av_stubbed": self.stubbed_av}
        self.cuda = self.device.type == "cuda"

    # -- conditioning and sampling ---------------------------------------------------------

    def inputs(self, family, config, patcher, seed: int):
        """(noise, latent, positive) of one 1024x1024 (or --resolution) generation."""
        text = family.conditioning(config)
        latent_format = patcher.model.latent_format
        down = latent_format.spacial_downscale_ratio
        side = self.args.resolution // down
        latent = torch.zeros(1, latent_format.latent_channels, side, side)
        noise = self.comfy.sample.prepare_noise(latent, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        extras = {"guidance": text.guidance}
        if text.pooled_dim is not None:
            extras["pooled_output"] = torch.randn(1, text.pooled_dim, generator=gen)
        tokens = self.args.text_tokens or text.tokens
        context = torch.randn(1, tokens, text.context_dim, generator=gen)
        return noise, latent, [[context, extras]], tokens

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sample(self, patcher, noise, latent, positive, steps: int):
        """(latent, seconds per step, total seconds) of one comfy.sample.sample call."""
        stamps = []

        def callback(step, x0, x, total) -> None:
            self.sync()
            stamps.append(time.perf_counter())

        self.sync()
        start = time.perf_counter()
        out = self.comfy.sample.sample(
            patcher, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
            denoise=1.0, disable_pbar=True, seed=self.args.seed, callback=callback,
        )  # fmt: skip
        self.sync()
        total = time.perf_counter() - start
        steps_s = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
        return out.float().cpu(), steps_s, total

    def run_sampling(self, patcher, inputs, cap_bytes: int | None) -> dict:
        """Warm-up call, then the timed call; peak memory of both (weights included)."""
        noise, latent, positive, _ = inputs
        mm = self.comfy.model_management
        result: dict = {"dtype": str(patcher.model.get_dtype()).removeprefix("torch.")}
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            if cap_bytes:
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), self.device)
            result["cap_bytes"] = cap_bytes
        try:
            if self.args.warmup:
                _, _, result["warmup_seconds"] = self.sample(
                    patcher, noise, latent, positive, self.args.warmup
                )
            out, steps_s, result["seconds_total"] = self.sample(
                patcher, noise, latent, positive, self.args.steps
            )
        except torch.cuda.OutOfMemoryError as err:
            result["error"] = f"out of memory: {str(err).splitlines()[0]}"
            out, steps_s = None, []
        finally:
            if self.cuda:
                result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
                result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
                free, total = torch.cuda.mem_get_info(self.device)
                result["device_used_bytes_after"] = total - free
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            mm.unload_all_models()
            mm.soft_empty_cache()
        if steps_s:
            result["steps"] = len(steps_s)
            result["seconds_per_step"] = statistics.median(steps_s)
            result["step_seconds"] = steps_s
        result["finite"] = None if out is None else bool(torch.isfinite(out).all())
        return result, out

    # -- one model ---------------------------------------------------------------------------

    def model(self, spec: str, file_dir: Path) -> dict:
        family, preset, config, seed = random_spec(spec)
        seed = seed or self.args.seed
        shapes = family.shapes(config)
        dense = {k: (torch.bfloat16, s) for k, s in shapes.items()}
        layers = ternary_layers(family, dense, 0)
        total = sum(math.prod(s) for s in shapes.values())
        quantized = sum(n * k for n, k in ((p.n, p.k) for p in layers.values()))
        bf16_bytes = 2 * total
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
            "bf16_bytes": bf16_bytes,
        }
        for packing in ("2bit", "base3"):
            entries = plan_entries(dense, layers, packing)
            size = sum(math.prod(s) * d.itemsize for d, s in entries.values())
            record[f"{packing}_tensor_bytes"] = size
        print(f"\n== {spec}: {record['describe']}, {total / 1e9:.2f} B parameters", flush=True)

        # 1. random bf16 weights made on the device layer by layer, quantized, streamed
        path = file_dir / f"{spec.replace(':', '-')}-ternary.safetensors"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        source, get = random_source(shapes, seed, torch.bfloat16, self.device)
        report = quantize_tensors(
            source, get, path, packing=self.args.packing, device=self.device, overwrite=True,
            source=f"random {spec}:{seed}",
        )  # fmt: skip
        self.sync()
        record["quantize_seconds"] = time.perf_counter() - start
        record["file"] = {
            "packing": self.args.packing,
            "bytes": path.stat().st_size,
            "ratio_vs_bf16": bf16_bytes / path.stat().st_size,
        }
        record["layer_error_median"] = statistics.median(e.ternary for e in report.layers)
        record["quantize_peak_allocated_bytes"] = (
            torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        )
        print(
            f"quantized in {record['quantize_seconds']:.1f} s: {format_bytes(path.stat().st_size)}"
            f" ({self.args.packing}), {record['share_quantized_percent']:.2f} % of the "
            f"parameters ternary, {bf16_bytes / path.stat().st_size:.2f}x smaller than bf16",
            flush=True,
        )
        del report

        # 2. the pack's loader, ComfyUI's detection and sampler
        start = time.perf_counter()
        patcher = self.load_ternary(path, 16, disable_dynamic=True)
        record["load_seconds"] = time.perf_counter() - start
        record["comfyui_model"] = type(patcher.model).__name__
        record["comfyui_config"] = type(patcher.model.model_config).__name__
        inputs = self.inputs(family, config, patcher, seed)
        record["latent_shape"] = list(inputs[0].shape)
        record["text_tokens"] = inputs[3]
        cap = int(self.args.cap_gb * 1e9) if self.cuda and self.args.cap_gb else None
        record["ternary"], ternary_out = self.run_sampling(patcher, inputs, cap)
        record["ternary"]["load_seconds"] = record["load_seconds"]
        del patcher
        if not self.args.keep_files:
            path.unlink()
        self.show("ternary", record["ternary"])

        # 3. bf16, where it fits
        try:
            record["bf16"], bf16_out = self.bf16(shapes, seed, bf16_bytes, inputs)
        except Exception as err:  # keep the ternary numbers
            traceback.print_exc()
            record["bf16"], bf16_out = {"error": repr(err)[:2000]}, None
            self.release()
        if "skipped" not in record["bf16"]:
            self.show("bf16", record["bf16"])
        else:
            print(f"bf16     skipped: {record['bf16']['skipped']}", flush=True)
        if ternary_out is not None and bf16_out is not None:
            record["final_latent_relative_difference"] = float(
                (ternary_out - bf16_out).norm() / bf16_out.norm()
            )
        record["targets"] = self.targets(spec, record)
        return record

    def bf16(self, shapes, seed: int, bf16_bytes: int, inputs):
        if self.args.bf16 == "none":
            return {"skipped": "--bf16 none"}, None
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            if bf16_bytes + 8e9 > free:
                return {
                    "skipped": f"needs {bf16_bytes / 1e9:.1f} GB of {free / 1e9:.1f} free"
                }, None
        host = available_host_bytes()
        if bf16_bytes > 0.8 * host:
            return {"skipped": f"needs {bf16_bytes / 1e9:.1f} GB of host memory"}, None
        start = time.perf_counter()
        # The same weights as the ternary file's, made on the device and kept on the host
        # (ComfyUI copies them into a model built on the GPU: one bf16 copy on each side).
        state = {k: t.cpu() for k, t in iter_random_weights(shapes, seed, device=self.device)}
        place = {"load_device": self.device, "offload_device": self.device} if self.cuda else {}
        patcher = self.comfy.sd.load_diffusion_model_state_dict(
            state, model_options=place, disable_dynamic=True
        )
        del state
        gc.collect()
        load_seconds = time.perf_counter() - start
        result, out = self.run_sampling(patcher, inputs, None)
        result["load_seconds"] = load_seconds
        del patcher
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return result, out

    def release(self) -> None:
        """Free what a failed run left (ComfyUI's loaded models, cached device memory)."""
        self.comfy.model_management.unload_all_models()
        gc.collect()
        if self.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.empty_cache()

    def targets(self, spec: str, record: dict) -> dict:
        """The issue's targets, for full-size models (tiny ones are mostly embedders)."""
        if spec.split(":")[1].startswith("tiny"):
            return {}
        checks = {"at_least_6x_smaller_than_bf16": record["file"]["ratio_vs_bf16"] >= MIN_RATIO}
        ternary = record["ternary"]
        if ternary.get("peak_allocated_bytes") is not None and ternary.get("cap_bytes"):
            checks["within_cap"] = "error" not in ternary
        for key, limit in TARGETS.get(spec, {}).items():
            if key == "file_bytes":
                checks[f"file_at_most_{limit / 1e9:g}_gb"] = record["file"]["bytes"] <= limit
            elif ternary.get("peak_reserved_bytes") is not None:
                checks[f"peak_at_most_{limit / 1e9:g}_gb"] = (
                    "error" not in ternary and ternary["peak_reserved_bytes"] <= limit
                )
        return checks

    @staticmethod
    def show(name: str, result: dict) -> None:
        if "error" in result:
            print(f"{name}: {result['error']}", flush=True)
            return
        peak = result.get("peak_allocated_bytes")
        memory = "n/a" if peak is None else format_bytes(peak)
        print(
            f"{name:8s} {result['dtype']:9s} {result['seconds_per_step']:.3f} s/step, peak "
            f"{memory}, load {result.get('load_seconds', 0):.1f} s",
            flush=True,
        )


def table(records: list[dict]) -> str:
    lines = [
        "| model | params | ternary share | file | bf16 / file | peak ternary | peak bf16 | "
        "s/step ternary | s/step bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def peak(r):
        value = r.get("peak_allocated_bytes")
        return "n/a" if value is None else format_bytes(value)

    def speed(r):
        return (r.get("error") or r.get("skipped") or f"{r['seconds_per_step']:.3f}")[:40]

    for rec in records:
        t, b = rec["ternary"], rec["bf16"]
        lines.append(
            f"| {rec['model']} ({rec['comfyui_config']}) | {rec['params_total'] / 1e9:.2f} B | "
            f"{rec['share_quantized_percent']:.2f} % | {format_bytes(rec['file']['bytes'])} | "
            f"{rec['file']['ratio_vs_bf16']:.2f}x | {peak(t)} | "
            f"{'-' if 'skipped' in b else peak(b)} | {speed(t)} | {speed(b)} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    print(
        f"{bench.env['device']} | torch {bench.env['torch']} | ComfyUI {bench.env['comfyui']} | "
        f"{args.resolution}x{args.resolution}, {args.steps} steps (+{args.warmup} warm-up)",
        flush=True,
    )
    results = {
        "environment": bench.env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.file_dir) as tmp:
        for spec in args.models.split(","):
            if args.time_budget and time.perf_counter() - start > args.time_budget:
                results["models"].append({"model": spec, "skipped": "time budget spent"})
                continue
            try:
                results["models"].append(bench.model(spec, Path(tmp)))
            except Exception as err:  # keep the other models' numbers
                traceback.print_exc()
                results["models"].append({"model": spec, "error": repr(err)[:2000]})
                bench.release()
            results["seconds"] = time.perf_counter() - start
            if args.json:
                write_json(args.json, results, overwrite=True)
    done = [r for r in results["models"] if "ternary" in r]
    print("\n" + table(done))
    for rec in done:
        failed = [name for name, ok in rec["targets"].items() if not ok]
        if rec["targets"]:
            verdict = "met" if not failed else "NOT met: " + ", ".join(failed)
            print(f"{rec['model']}: targets {verdict} ({', '.join(rec['targets'])})")
    print(f"total {time.perf_counter() - start:.0f} s")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="ComfyUI source folder (holding comfy/)")
    p.add_argument("--json", type=Path, help="write every number here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU at 64x64")
    p.add_argument("--models", help=f"comma list of FAMILY:PRESET (default {','.join(GPU_MODELS)})")
    p.add_argument("--device", help="cuda (default) or cpu (--smoke)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default 1024)")
    p.add_argument("--text-tokens", type=int, help="text tokens (default: the family's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps of the warm-up call (1)")
    p.add_argument("--packing", choices=("2bit", "base3"), default="base3", help="file layout")
    p.add_argument(
        "--cap-gb", type=float, default=12.0, help="cap on the allocator for ternary runs (GB)"
    )
    p.add_argument("--bf16", choices=("auto", "none"), default="auto", help="bf16 where it fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=480.0, help="no new model after (s)")
    p.add_argument("--file-dir", help="where the ternary files are written (and deleted)")
    p.add_argument("--keep-files", action="store_true", help="keep the ternary files")
    p.add_argument("--stub-av", action="store_true", help="stub PyAV even when installed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        write_json(args.json, results, overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
