"""Host (CPU) time per call of a ternary linear and of its parts, on a GPU (CUDA).

The GPU is kept busy by a long sleep kernel queued first, so the host enqueues every call
while the GPU is still sleeping: the wall time of N calls is then the host's work alone
(Python, the dispatcher, kernel launches), which is what starves the GPU in eager sampling
when it exceeds the kernels' own time. Shapes: FLUX.1's mlp_down (12288 -> 3072) and qkv
(3072 -> 9216) at 4608 tokens, and a modulation GEMV (3072 -> 18432) at one token.
Compared in the same run with what ComfyUI's own layers cost: cuBLAS ``F.linear`` and
``torch._scaled_mm``. Writes JSON.

    python bench/host_overhead.py --out host.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from comfyui_ternary_flux.kernels import triton_launch
from comfyui_ternary_flux.kernels.layout import pack_2bit
from comfyui_ternary_flux.kernels.op import ternary_linear
from comfyui_ternary_flux.kernels.weight import LoraBranch, TernaryWeight
from comfyui_ternary_flux.ternary.module import TernaryLinear

CALLS = 200  # per timing; the launch queue holds about a thousand kernels


def host_us(fn, repeats: int = 3) -> float:
    """Median host microseconds per call, the GPU busy all the while."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: the queue never drains
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def shape_point(k: int, n: int, m: int, gen) -> dict:
    dev = "cuda"
    t = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8, generator=gen)
    weight = TernaryWeight(pack_2bit(t), torch.rand(n, device=dev, generator=gen) + 0.5, k)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    dense = torch.randn(n, k, device=dev, generator=gen).to(torch.bfloat16)
    w8 = dense.to(torch.float8_e4m3fn)
    q8 = x.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
    lora = LoraBranch(
        torch.randn(64, k, device=dev, generator=gen).to(torch.bfloat16) * 0.01,
        torch.randn(n, 64, device=dev, generator=gen).to(torch.bfloat16) * 0.01,
        1.0,
    )
    module = TernaryLinear.from_dense(dense.float(), bias, dtype=torch.bfloat16)
    module8 = TernaryLinear.from_dense(dense.float(), bias, dtype=torch.bfloat16)
    module8.act_bits = 8
    calls = {
        "cublas_bf16_F.linear": lambda: F.linear(x, dense, bias),
        "cublas_fp8_scaled_mm": lambda: torch._scaled_mm(
            q8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
        "a16": lambda: ternary_linear(x, weight, bias),
        "a8": lambda: ternary_linear(x, weight, bias, act_bits=8),
        "a16_lora": lambda: ternary_linear(x, weight, bias, lora),
        "module_a16": lambda: module(x),
        "module_a8": lambda: module8(x),
        "quantize_fp8_only": lambda: triton_launch.quantize_fp8(x),
        "unpack_fp8_only": lambda: triton_launch.unpack_dense(
            weight, torch.float8_e4m3fn, scaled=False
        ),
    }
    with torch.inference_mode():
        return {name: round(host_us(fn), 2) for name, fn in calls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="host-overhead.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/host_overhead.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = {
        "mlp_down M=4608": shape_point(12288, 3072, 4608, gen),
        "qkv M=4608": shape_point(3072, 9216, 4608, gen),
        "modulation M=1": shape_point(3072, 18432, 1, gen),
    }
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "us": points}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, row in points.items():
        print(name, json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
