"""End-to-end FLUX.1 benchmark inside ComfyUI's own model code (comfy.ldm.flux.model.Flux).

Weights are random (drawn from a seed; nothing is downloaded). For each variant (bf16,
ternary A16, ternary A8 = TernaryLinear.act_bits 8, ternary A16 + LoRA) it runs an N-step
Euler flow-matching loop and reports the median seconds per step (and the GPU time of one
model call with the CPU kept ahead, which separates kernel time from the host's launch
overhead), the CUDA allocator's peak
while sampling (the diffusion model's peak VRAM: weights, activations, scratch), the weight
bytes, and the relative error against bf16 of the first velocity and of the final latent;
for ternary variants on the kernels also the error of the first velocity against the torch
reference path on the same weights (the kernels' own error). It then writes the model as
format-v1 files (2bit, base3, and 2bit with the LoRA), reports their sizes and deletes them.
The variants are made from one model in place, one after the other (the dense weights are
freed once quantized), so the run needs about one bf16 model of memory.

    python bench/e2e.py --config dev --device cuda --json e2e.json   # FLUX.1-dev, 1024^2
    python bench/e2e.py --config tiny --device cpu                     # smoke test, seconds

ComfyUI is found through --comfyui, $COMFYUI_PATH, ./.comfyui/ComfyUI or ./.carry/comfy
(an export of the ComfyUI source with the ``comfy`` package at its top); of its requirements
it needs comfy-kitchen (FLUX's RoPE runs through it), comfy-aimdo, psutil and tqdm. Flux is
built with ``comfy.ops.disable_weight_init``, the operations ComfyUI uses for bf16 weights.
Text length defaults to 512 tokens, FLUX.1-dev's maximum; ComfyUI pads prompts to 256.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if "comfyui_ternary_flux" not in sys.modules:
    # Load the pack from this checkout (it needs no installation on the GPU machine).
    _spec = importlib.util.spec_from_file_location(
        "comfyui_ternary_flux", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    sys.modules["comfyui_ternary_flux"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["comfyui_ternary_flux"])

from comfyui_ternary_flux.kernels.plan import backend  # noqa: E402
from comfyui_ternary_flux.models.flux1 import (  # noqa: E402
    FLUX_DEV,
    TINY_FLUX,
    FluxConfig,
    is_block_linear,
    random_flux_state_dict,
)
from comfyui_ternary_flux.models.flux1_torch import quantize_model  # noqa: E402
from comfyui_ternary_flux.ternary.fileformat import save_ternary_file  # noqa: E402
from comfyui_ternary_flux.ternary.measure import (  # noqa: E402
    ReportRow,
    format_bytes,
    format_report,
    measure_step,
    relative_error,
    weight_bytes,
)
from comfyui_ternary_flux.ternary.module import TernaryLinear  # noqa: E402
from comfyui_ternary_flux.ternary.packing import pack, unpack_2bit  # noqa: E402

VARIANTS = ("bf16", "a16", "a8", "lora")
LATENT_CHANNELS = 16
PATCH = 2


@dataclass(frozen=True)
class BenchConfig:
    flux: FluxConfig
    resolution: int  # image side in pixels; the latent is resolution / 8
    txt_tokens: int  # T5 tokens
    steps: int
    warmup: int  # untimed forward calls per variant (compilation, autotuning)
    lora_rank: int


CONFIGS = {
    "dev": BenchConfig(FLUX_DEV, resolution=1024, txt_tokens=512, steps=20, warmup=2, lora_rank=64),
    "tiny": BenchConfig(TINY_FLUX, resolution=128, txt_tokens=16, steps=3, warmup=1, lora_rank=8),
}


def find_comfyui(explicit: str | None) -> Path:
    candidates = [explicit, os.environ.get("COMFYUI_PATH"), ROOT / ".comfyui" / "ComfyUI"]
    candidates.append(ROOT / ".carry" / "comfy")
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "ldm" / "flux" / "model.py").is_file():
            return Path(candidate)
    raise SystemExit(
        "ComfyUI source not found: pass --comfyui DIR (a folder holding comfy/ldm/flux/model.py) "
        "or set COMFYUI_PATH"
    )


def import_comfy_flux(path: Path, device: torch.device):
    """(Flux class, the operations ComfyUI uses for bf16 weights, ComfyUI version)."""
    sys.path.insert(0, str(path))
    import comfy.cli_args

    # ComfyUI's model_management asserts on a CUDA device unless started with --cpu.
    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.ldm.flux.model
    import comfy.ops

    version_file = path / "comfyui_version.py"
    version = "unknown"
    if version_file.is_file():
        scope: dict = {}
        exec(version_file.read_text(), scope)
        version = scope.get("__version__", version)
    return comfy.ldm.flux.model.Flux, comfy.ops.disable_weight_init, version


def comfy_flux_kwargs(config: FluxConfig) -> dict:
    """Flux constructor arguments as ComfyUI's model detection sets them for FLUX.1."""
    if config.hidden_size // config.num_heads != 128:
        raise ValueError("ComfyUI's FLUX.1 detection fixes a head size of 128")
    return dict(
        image_model="flux",
        in_channels=config.in_channels // PATCH**2,
        out_channels=config.in_channels // PATCH**2,
        vec_in_dim=config.vec_in_dim,
        context_in_dim=config.context_in_dim,
        hidden_size=config.hidden_size,
        mlp_ratio=config.mlp_ratio,
        num_heads=config.num_heads,
        depth=config.depth,
        depth_single_blocks=config.depth_single_blocks,
        axes_dim=[16, 56, 56],
        theta=10000,
        patch_size=PATCH,
        qkv_bias=True,
        guidance_embed=config.guidance_embed,
        txt_ids_dims=[],
    )


def comfy_key(bfl_key: str) -> str:
    """ComfyUI renames the RMSNorm ``*_norm.scale`` of BFL files to ``.weight`` on load."""
    if bfl_key.endswith("_norm.scale"):
        return bfl_key[: -len("scale")] + "weight"
    return bfl_key


def bfl_key(comfy_key_name: str) -> str:
    if comfy_key_name.endswith("_norm.weight"):
        return comfy_key_name[: -len("weight")] + "scale"
    return comfy_key_name


def build_bf16_model(flux_cls, operations, config: FluxConfig, seed: int, device) -> nn.Module:
    """ComfyUI's Flux with random bf16 weights made directly on ``device`` (one copy)."""
    with torch.device("meta"):
        model = flux_cls(dtype=torch.bfloat16, operations=operations, **comfy_flux_kwargs(config))
    state = random_flux_state_dict(config, seed, torch.bfloat16, device)
    model.load_state_dict({comfy_key(k): v for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@dataclass
class Inputs:
    noise: torch.Tensor  # float32 latent [1, 16, H/8, W/8]
    context: torch.Tensor  # bf16 [1, txt_tokens, 4096]
    y: torch.Tensor  # bf16 pooled CLIP [1, 768]
    guidance: torch.Tensor  # float32 [1]


def make_inputs(bench: BenchConfig, seed: int, device) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    side = bench.resolution // 8
    cfg = bench.flux

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    return Inputs(
        noise=randn(1, LATENT_CHANNELS, side, side, dtype=torch.float32),
        context=randn(1, bench.txt_tokens, cfg.context_in_dim),
        y=randn(1, cfg.vec_in_dim),
        guidance=torch.full((1,), 3.5, device=device),
    )


def velocity(model: nn.Module, x: torch.Tensor, sigma: float, inputs: Inputs) -> torch.Tensor:
    """One model call as ComfyUI makes it: latent cast to the model dtype, sigma in [0, 1]."""
    t = torch.full((1,), sigma, device=x.device)
    return model(x.to(torch.bfloat16), t, inputs.context, y=inputs.y, guidance=inputs.guidance)


class EulerSampler:
    """Flow-matching Euler steps from sigma 1 to 0 (linear schedule); each call is one step."""

    def __init__(self, model: nn.Module, inputs: Inputs, steps: int) -> None:
        self.model, self.inputs = model, inputs
        self.sigmas = torch.linspace(1, 0, steps + 1).tolist()
        self.x = inputs.noise.clone()
        self.index = 0

    def __call__(self) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        v = velocity(self.model, self.x, sigma, self.inputs)
        self.x = self.x + (sigma_next - sigma) * v.float()
        self.index += 1
        return self.x


def gpu_busy_seconds(call, device: torch.device, repeats: int = 3) -> float | None:
    """GPU time of one model call (one sampling step of FLUX.1-dev) with the CPU kept ahead.

    A ~1 s spin kernel is queued first, so the CPU enqueues the call while the GPU is still
    busy; the events around the call then time the GPU alone. Wall time above this figure is
    the host's launch overhead (Python, kernel launches) starving the GPU. The call must not
    synchronise before its end (ComfyUI's Flux forward does not). The driver queues only
    about a thousand launches and a FLUX.1-dev call makes two to three thousand, so the CPU
    launches the rest while the GPU runs: where the CPU is slower than the GPU this is an
    upper bound (bench/results/kernels-h100.md compares it with a profile's kernel time).
    """
    if device.type != "cuda":
        return None
    times = []
    with torch.cuda.device(device):
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            torch.cuda._sleep(2_000_000_000)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_variant(
    name, model, inputs, bench, device, reference
) -> tuple[ReportRow, dict, dict[str, torch.Tensor]]:
    """Warm up, then time a full sampling loop; compare with the bf16 outputs (if given).

    Returns the row, the details for the JSON file and the outputs (first velocity, latent).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    with torch.inference_mode():
        first = measure_step(
            lambda: velocity(model, inputs.noise, 1.0, inputs), device, bench.warmup, 1
        )
        sampling = measure_step(EulerSampler(model, inputs, bench.steps), device, 0, bench.steps)
        gpu_busy = gpu_busy_seconds(lambda: velocity(model, inputs.noise, 1.0, inputs), device)
    row = ReportRow.from_measurement(
        name, model, sampling, None if reference is None else reference["latent"]
    )
    detail = dataclasses.asdict(row) | {
        "resident_bytes_before": resident,
        "step_seconds": list(sampling.step_seconds),
        "sampling_seconds": sum(sampling.step_seconds),
        "gpu_busy_seconds_per_step": gpu_busy,
        "velocity_error": None
        if reference is None
        else relative_error(first.output, reference["velocity"]),
    }
    busy = "" if gpu_busy is None else f" ({gpu_busy * 1e3:.1f} ms of GPU time)"
    print(
        f"  {name}: {row.seconds_per_step * 1e3:.1f} ms/step{busy}, peak "
        f"{format_bytes(row.peak_vram_bytes)}, weights {format_bytes(row.weight_bytes)}",
        flush=True,
    )
    return row, detail, {"velocity": first.output, "latent": sampling.output}


def reference_path_error(model: nn.Module, inputs: Inputs, velocity_out: torch.Tensor) -> float:
    """Relative error of the first velocity against the same ternary model run through the
    torch reference path (bf16 matmuls of the exact ternary weights): the kernels' own error,
    apart from the quantization error that the comparison with bf16 mixes in."""
    previous = os.environ.get("TERNARY_FLUX_BACKEND")
    os.environ["TERNARY_FLUX_BACKEND"] = "reference"
    try:
        with torch.inference_mode():
            ref = velocity(model, inputs.noise, 1.0, inputs)
    finally:
        if previous is None:
            del os.environ["TERNARY_FLUX_BACKEND"]
        else:
            os.environ["TERNARY_FLUX_BACKEND"] = previous
    return relative_error(velocity_out, ref)


def ternary_layers(model: nn.Module) -> dict[str, TernaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}


def add_random_lora(model: nn.Module, rank: int, seed: int) -> None:
    """Attach a rank-r LoRA of small random values to every ternary layer (never zeros:
    timing zeros can flatter a kernel). The values do not matter for speed or memory."""
    gen = None
    for layer in ternary_layers(model).values():
        device = layer.weight.device
        gen = gen or torch.Generator(device=device).manual_seed(seed + 2)
        layer.add_lora(rank, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            k, n = layer.in_features, layer.out_features
            down = torch.randn(rank, k, generator=gen, device=device) / k**0.5
            up = torch.randn(n, rank, generator=gen, device=device) * (0.01 / rank**0.5)
            layer.lora_down.copy_(down)
            layer.lora_up.copy_(up)


def v1_file_size(model: nn.Module, directory: Path, packing: str) -> int:
    """Write the model as a format-v1 file in ``directory``, return its size, delete it."""
    layers = {
        name: (m.out_features, m.in_features)
        for name, m in ternary_layers(model).items()
        if is_block_linear(name)
    }
    lora_ranks = {m.lora_rank for m in ternary_layers(model).values()}
    tensors = {}
    for key, tensor in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if layer in layers and key.endswith(".weight") and packing != "2bit":
            tensor = pack(unpack_2bit(tensor, layers[layer][1]), packing)
        tensors[bfl_key(key)] = tensor
    path = directory / f"flux-{packing}.safetensors"
    save_ternary_file(path, tensors, layers, packing=packing, lora_rank=max(lora_ranks))
    size = path.stat().st_size
    path.unlink()
    return size


def environment(device: torch.device, comfy_version: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from comfy.ldm.modules.attention import optimized_attention

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "comfyui": comfy_version,
        "attention": optimized_attention.__name__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: Path, data: dict, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SystemExit(f"{path} exists; pass --overwrite to replace it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    bench = dataclasses.replace(
        CONFIGS[args.config],
        **{
            f: getattr(args, f)
            for f in ("resolution", "txt_tokens", "steps", "warmup", "lora_rank")
            if getattr(args, f) is not None
        },
    )
    if bench.resolution % 16:
        raise SystemExit(f"--resolution must be a multiple of 16, got {bench.resolution}")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    flux_cls, operations, comfy_version = import_comfy_flux(find_comfyui(args.comfyui), device)
    env = environment(device, comfy_version)
    print(
        f"{env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"ComfyUI {comfy_version} | attention {env['attention']}",
        flush=True,
    )
    tokens = (bench.resolution // 16) ** 2
    print(
        f"config {args.config}: {bench.resolution}x{bench.resolution} ({tokens} image tokens), "
        f"{bench.txt_tokens} text tokens, {bench.steps} steps",
        flush=True,
    )

    start = time.perf_counter()
    model = build_bf16_model(flux_cls, operations, bench.flux, args.seed, device)
    inputs = make_inputs(bench, args.seed, device)
    print(f"built bf16 model in {time.perf_counter() - start:.1f} s", flush=True)

    rows, details, reference = [], [], None
    files = {"bf16_tensor_bytes": weight_bytes(model)}

    def record(name: str) -> None:
        nonlocal reference
        row, detail, outputs = measure_variant(name, model, inputs, bench, device, reference)
        if name == "bf16":
            reference = outputs
            detail["backend"] = "dense"
        else:
            detail["backend"] = backend(inputs.context.device, inputs.context.dtype)
            detail["kernel_vs_reference_path_error"] = (
                None
                if detail["backend"] == "reference"
                else reference_path_error(model, inputs, outputs["velocity"])
            )
        rows.append(row)
        details.append(detail)

    if "bf16" in variants:
        record("bf16")
    if set(variants) & {"a16", "a8", "lora"}:
        start = time.perf_counter()
        with torch.no_grad():
            quantize_model(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"quantized to ternary in {time.perf_counter() - start:.1f} s", flush=True)
        if "a16" in variants:
            record("ternary A16")
        if "a8" in variants:
            for layer in ternary_layers(model).values():
                layer.act_bits = 8
            record("ternary A8")
            for layer in ternary_layers(model).values():
                layer.act_bits = 16
        with tempfile.TemporaryDirectory(dir=args.file_dir) as tmp:
            if not args.no_files:
                for packing in ("2bit", "base3"):
                    print(f"writing a v1 {packing} file to {tmp} ...", flush=True)
                    files[f"v1_{packing}_bytes"] = v1_file_size(model, Path(tmp), packing)
            if "lora" in variants:
                add_random_lora(model, bench.lora_rank, args.seed)
                record(f"ternary + LoRA r{bench.lora_rank}")
                if not args.no_files:
                    print(f"writing a v1 2bit file with the LoRA to {tmp} ...", flush=True)
                    files[f"v1_2bit_lora{bench.lora_rank}_bytes"] = v1_file_size(
                        model, Path(tmp), "2bit"
                    )

    results = {
        "environment": env,
        "config": {"name": args.config, "seed": args.seed}
        | dataclasses.asdict(bench)
        | {"image_tokens": tokens},
        "variants": details,
        "files": files,
    }
    print()
    print(format_report(rows, reference="bf16" if "bf16" in variants else None, markdown=True))
    print()
    print(format_files(files))
    return results


def format_files(files: dict) -> str:
    base = files["bf16_tensor_bytes"]
    lines = ["| file | bytes | size | bf16 / file |", "|---|---:|---:|---:|"]
    for key, size in files.items():
        name = key.removesuffix("_bytes").replace("_", " ")
        lines.append(f"| {name} | {size:,} | {format_bytes(size)} | {base / size:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="dev")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, help="write every number here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--comfyui", help="ComfyUI source folder (holding comfy/)")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS)
    )
    p.add_argument("--resolution", type=int, help="image side in pixels")
    p.add_argument("--txt-tokens", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-files", action="store_true", help="skip writing the v1 files")
    p.add_argument("--file-dir", help="where the v1 files are written (and deleted)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and args.json.exists() and not args.overwrite:
        raise SystemExit(f"{args.json} exists; pass --overwrite to replace it")
    results = run(args)
    if args.json:
        write_json(args.json, results, args.overwrite)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
