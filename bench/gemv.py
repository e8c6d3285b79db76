"""Benchmark the one-token ternary GEMV against cuBLAS bf16 at the FLUX.1 linear shapes (CUDA).

For each (K -> N) shape at M = 1, in one run: cuBLAS bf16 ``F.linear``, the ternary A16
forward as the op runs it (GEMV kernel, configuration autotuned) and the GEMV
kernel with each configuration of the GPU's table forced. Each is checked against a float32
reference first. Two floors put the times in proportion: ``launch_floor``, an empty kernel,
and ``read_floor``, a kernel that only streams the packed weight once (no unpacking, no
math): no GEMV over that weight can beat it. Times are medians of CUDA-graph replays; every
op cycles through enough copies of its weight (>= 160 MB) that it does not stay in L2.
Writes JSON.

    python bench/gemv.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from comfyui_ternary_flux.bench.kernels import SHAPES, copies, median_us, rel_err
from comfyui_ternary_flux.kernels import plan, triton_launch, tuning
from comfyui_ternary_flux.kernels.layout import pack_2bit
from comfyui_ternary_flux.kernels.op import ternary_linear
from comfyui_ternary_flux.kernels.weight import TernaryWeight

REP_MS = 50  # one-token calls are short: more replays per median
MOST_COPIES = 256  # a packed weight is small: up to 256 copies to fill 160 MB


READ_BLOCK = 4096  # int32 words (16 KB) per program of the read floor


@triton.jit
def _empty_kernel(out_ptr):
    pass


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read_kernel(words_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    """XOR of BLOCK words per program: every byte is loaded, almost nothing is computed."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(words_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.reduce(v, 0, _xor))


def read_programs(packed: torch.Tensor) -> int:
    """Programs of the read floor over ``packed`` (one result word each in the sink)."""
    return triton.cdiv(packed.numel() // 4, READ_BLOCK)


def read_floor(packed: torch.Tensor, sink: torch.Tensor) -> None:
    words = packed.view(torch.int32).reshape(-1)
    _read_kernel[(read_programs(packed),)](
        words, sink, words.numel(), BLOCK=READ_BLOCK, num_warps=8
    )


def launch_floor(sink: torch.Tensor) -> None:
    _empty_kernel[(1,)](sink)


def bench_shape(k: int, n: int, family: str, gen: torch.Generator) -> dict:
    t = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8, generator=gen)
    scale = torch.rand(n, device="cuda", generator=gen) + 0.5
    packed = pack_2bit(t)
    dense = (t.float() * scale[:, None]).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    ref = (x.float() @ t.float().t()) * scale

    def a16(xx, w):
        return ternary_linear(xx, TernaryWeight(w, scale, k))

    def gemv(xx, w, config):
        return triton_launch.ternary_matmul(xx, TernaryWeight(w, scale, k), (config,), family)

    packs = [packed] + [packed.clone() for _ in range(copies(packed.numel(), MOST_COPIES) - 1)]
    denses = [dense] + [dense.clone() for _ in range(copies(dense.numel() * 2, MOST_COPIES) - 1)]
    us = {"cublas_bf16": median_us(F.linear, [(x, d) for d in denses], REP_MS)}
    sink = torch.empty(read_programs(packed), dtype=torch.int32, device="cuda")
    us["read_floor"] = median_us(read_floor, [(w, sink) for w in packs], REP_MS)
    us["launch_floor"] = median_us(launch_floor, [(sink,)], REP_MS)
    errors = {"a16": rel_err(a16(x, packed), ref)}
    us["a16"] = median_us(a16, [(x, w) for w in packs], REP_MS)
    for config in tuning.GEMV_TABLES[family]:
        triton_launch._chosen.clear()
        name = "gemv" + "_".join(str(v) for v in config)
        try:
            errors[name] = rel_err(gemv(x, packed, config), ref)
            us[name] = median_us(gemv, [(x, w, config) for w in packs], REP_MS)
        except Exception as error:  # a config may not fit; report it
            errors[name] = repr(error)
    triton_launch._chosen.clear()
    return {"K": k, "N": n, "us": us, "rel_err": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ.get("OUT", "."), "bench-gemv.json")
    parser.add_argument("--out", default=default_out, help="JSON path (default: %(default)s)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemv.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    family = plan.family_of(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = {}
    for name, (k, n) in SHAPES.items():
        points[name] = bench_shape(k, n, family, gen)
        p = points[name]
        base = p["us"]["cublas_bf16"]
        best = min((v, key) for key, v in p["us"].items() if key.startswith("gemv"))
        print(
            f"{name} {k}->{n}: cuBLAS {base:.1f} us, A16 {p['us']['a16']:.1f} us "
            f"({base / p['us']['a16']:.2f}x), best GEMV {best[1]} {best[0]:.1f} us "
            f"({base / best[0]:.2f}x), read floor {p['us']['read_floor']:.1f} us, "
            f"4x needs {base / 4:.1f} us | {p}",
            flush=True,
        )
    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": "median of CUDA-graph replays, weights cycled through >= 160 MB",
        "points": points,
    }
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
