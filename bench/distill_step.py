"""One distillation training step of the full FLUX.1-dev architecture: peak memory and time.

Random ternary weights (no weights can be had here), LoRA rank r on every block linear,
batch 1, gradient checkpointing, AdamW over float32 scales + LoRA: the trainer's step
(forward, MSE to a target velocity, backward, optimizer step). Prints one JSON object.

    python bench/distill_step.py                       # FLUX.1-dev, 1024x1024, rank 64, GPU
    python bench/distill_step.py --preset tiny --device cpu --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from comfyui_ternary_flux.distill.student import prepare_for_training
from comfyui_ternary_flux.kernels.layout import pack_2bit
from comfyui_ternary_flux.kernels.plan import backend
from comfyui_ternary_flux.models.flux1 import FLUX_DEV, TINY_FLUX, is_block_linear
from comfyui_ternary_flux.models.flux1_torch import FluxTransformer
from comfyui_ternary_flux.ternary.module import TernaryLinear

PRESETS = {"dev": FLUX_DEV, "tiny": TINY_FLUX}


def random_student(config, rank: int, dtype, device, gen: torch.Generator) -> FluxTransformer:
    """FLUX with random ternary block linears (LoRA rank r) and random dense other layers."""

    def make(name: str, k: int, n: int, bias: bool) -> nn.Module:
        if not is_block_linear(name):
            layer = nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
            with torch.no_grad():
                layer.weight.normal_(0, k**-0.5, generator=gen)
                layer.bias.normal_(0, 0.02, generator=gen)
            return layer
        layer = TernaryLinear(k, n, bias=bias, lora_rank=rank, dtype=dtype, device=device)
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=gen)
        with torch.no_grad():
            layer.weight.copy_(pack_2bit(codes))
            layer.weight_scale.fill_(1.2 * k**-0.5)
            layer.bias.normal_(0, 0.02, generator=gen)
            layer.lora_down.normal_(0, 0.1 * k**-0.5, generator=gen)
            layer.lora_up.normal_(0, 0.1 * rank**-0.5, generator=gen)
        return layer

    return FluxTransformer(config, make, dtype, device, gradient_checkpointing=True)


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    config = PRESETS[args.preset]
    t0 = time.perf_counter()
    model = random_student(config, args.rank, dtype, device, gen)
    groups = prepare_for_training(model)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(groups["lora"].values()), "lr": 1e-4},
            {"params": list(groups["scale"].values()), "lr": 3e-4},
        ]
    )
    build_s = time.perf_counter() - t0
    h, w = args.resolution // 8, args.resolution // 8
    batch = {
        "x": torch.randn(1, 16, h, w, device=device, generator=gen),
        "timesteps": torch.rand(1, device=device, generator=gen),
        "context": torch.randn(
            1, args.txt_len, config.context_in_dim, device=device, generator=gen
        ),
        "y": torch.randn(1, config.vec_in_dim, device=device, generator=gen),
        "guidance": torch.full((1,), 3.5, device=device),
    }
    target = torch.randn(1, 16, h, w, device=device, generator=gen)
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def step() -> None:
        start = time.perf_counter()
        loss = F.mse_loss(model(**batch).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    for _ in range(args.warmup + args.steps):
        step()
    profile_table = None
    if args.profile:
        with torch.profiler.profile() as prof:
            step()
        times.pop()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=args.profile)
    trainable = sum(p.numel() for g in groups.values() for p in g.values())
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "backend": backend(batch["x"].device, torch.bfloat16),
        "resolution": args.resolution,
        "image_tokens": (h // 2) * (w // 2),
        "text_tokens": args.txt_len,
        "lora_rank": args.rank,
        "trainable_params": trainable,
        "compute_dtype": str(dtype),
        "build_s": round(build_s, 2),
        "step_s_all": [round(t, 4) for t in times],
        "step_s_median": round(statistics.median(times[args.warmup :]), 4),
        "losses": losses,
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }
    if profile_table is not None:
        result["profile"] = profile_table.splitlines()
    if cuda:
        result["resident_gib"] = round(resident / 2**30, 3)
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="dev")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--txt-len", type=int, default=256, help="T5 tokens (ComfyUI pads to 256)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", type=int, default=0, help="profile one more step: top N ops")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = measure(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
