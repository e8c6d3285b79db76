"""Benchmark the ternary Triton kernels against cuBLAS at FLUX.1 linear shapes (CUDA only).

For each (K -> N) shape and token count M, in one run: cuBLAS bf16 ``F.linear``, cuBLAS fp8
rowwise ``torch._scaled_mm`` (activation quantization by torch ops included, and without; fast
accumulation, as the A8 path runs it),
the ternary A16 forward as dispatched (fused kernels at small M, dense scratch + cuBLAS at
large M) and the fused kernels alone, A16 + LoRA rank 64, A8 (activation quantization
included) both ways, the input-gradient kernel dX beside cuBLAS ``dy @ W``. Each kernel is
checked against a float32 reference on the GPU first. Times are medians of CUDA-graph
replays; every op cycles through enough copies of its inputs that they do not stay in L2
(as in a real model, where the next layer's weights differ). Writes JSON and a markdown
table.

    python bench/kernels.py [--out PATH] [--m 1 16 256 1536 4608] [--shapes qkv mlp_up]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from comfyui_ternary_flux.kernels import plan, triton_launch, tuning
from comfyui_ternary_flux.kernels.layout import pack_2bit
from comfyui_ternary_flux.kernels.op import ternary_linear
from comfyui_ternary_flux.kernels.reference import quantize_activations
from comfyui_ternary_flux.kernels.triton_linear import forward, input_grad
from comfyui_ternary_flux.kernels.tuning import m_bucket
from comfyui_ternary_flux.kernels.weight import LoraBranch, TernaryWeight

SHAPES = {  # name: (K, N)
    "qkv": (3072, 9216),
    "proj": (3072, 3072),
    "mlp_up": (3072, 12288),
    "mlp_down": (12288, 3072),
    "linear1": (3072, 21504),
    "linear2": (15360, 3072),
}
TOKENS = (1, 16, 256, 1536, 4608)
LORA_RANK = 64
L2_FLUSH_BYTES = 160e6  # inputs cycled per op: comfortably more than the H100's 50 MB L2
TOLERANCE = 1e-2  # bf16 outputs


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


def median_us(fn, inputs: list, rep_ms: int = 40) -> float:
    """Median time of one call, cycling through input sets inside one CUDA graph."""

    def all_sets():
        for args in inputs:
            fn(*args)

    all_sets()  # compile, autotune, allocate outside the capture
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(all_sets, rep=rep_ms, return_mode="median")
    return ms * 1e3 / len(inputs)


def copies(bytes_per_set: float, most: int = 64) -> int:
    return max(1, min(most, math.ceil(L2_FLUSH_BYTES / bytes_per_set)))


def torch_fp8_rowwise(x: torch.Tensor):
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def bench_point(k: int, n: int, m: int, gen: torch.Generator) -> dict:
    dev = "cuda"
    t = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8, generator=gen)
    scale = torch.rand(n, device=dev, generator=gen) + 0.5
    packed = pack_2bit(t)
    dense = (t.float() * scale[:, None]).to(torch.bfloat16)
    w8_t = t.to(torch.float8_e4m3fn).t()  # [K, N] column-major, as _scaled_mm wants
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    dy = torch.randn(m, n, device=dev, generator=gen).to(torch.bfloat16)
    down = (torch.randn(LORA_RANK, k, device=dev, generator=gen) / k**0.5).to(torch.bfloat16)
    up = (torch.randn(n, LORA_RANK, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
    tf = t.float()

    device = torch.device(dev)
    family = plan.family_of(device)
    fused16 = plan.Plan("fused", family, tuple(tuning.MATMUL_TABLES[family]["a16"][m_bucket(m)]))
    fused8 = plan.Plan("fused", family, tuple(tuning.MATMUL_TABLES[family]["a8"][m_bucket(m)]))
    dx_plan = plan.plan_input_grad(m, n, k, torch.bfloat16, device)
    dx_fused_configs = tuple(tuning.DX_TABLES[family][m_bucket(m)])
    lora = LoraBranch(down, up, 1.0)

    def weight(w):
        return TernaryWeight(w, scale, k)

    def a16(xx, w):
        return ternary_linear(xx, weight(w))

    def a16_lora(xx, w):
        return ternary_linear(xx, weight(w), lora=lora)

    def a8(xx, w):
        return ternary_linear(xx, weight(w), act_bits=8)

    def a16_fused(xx, w):
        return forward(xx, weight(w), None, None, 16, fused16)

    def a8_fused(xx, w):
        return forward(xx, weight(w), None, None, 8, fused8)

    def unpack(w):
        return triton_launch.unpack_dense(weight(w), torch.bfloat16)

    def dx(g, w):
        return input_grad(g, weight(w), dx_plan)

    def dx_fused(g, w):
        return triton_launch.ternary_dx(g, weight(w), dx_fused_configs, family)

    def fp8_gemm_only(q, s, w):
        return torch._scaled_mm(
            q, w, scale_a=s, scale_b=scale[None, :], out_dtype=torch.bfloat16, use_fast_accum=True
        )

    def cublas_fp8(xx, w):
        return fp8_gemm_only(*torch_fp8_rowwise(xx), w)

    q_ref, s_ref = quantize_activations(x)
    ref16 = (x.float() @ tf.t()) * scale
    ref8 = (q_ref @ tf.t()) * s_ref * scale
    ref_lora = ref16 + (x.float() @ down.float().t()) @ up.float().t()
    ref_dx = dy.float() @ (tf * scale[:, None])
    errors = {
        "a16": rel_err(a16(x, packed), ref16),
        "a16_lora64": rel_err(a16_lora(x, packed), ref_lora),
        "a8": rel_err(a8(x, packed), ref8),
        "a16_fused": rel_err(a16_fused(x, packed), ref16),
        "a8_fused": rel_err(a8_fused(x, packed), ref8),
        "dx": rel_err(dx(dy, packed), ref_dx),
        "dx_fused": rel_err(dx_fused(dy, packed), ref_dx),
        "cublas_fp8": rel_err(cublas_fp8(x, w8_t), ref8),
    }

    x_bytes = m * k * 2
    ternary_sets = copies(packed.numel() + x_bytes)
    dense_sets = copies(dense.numel() * 2 + x_bytes)
    fp8_sets = copies(w8_t.numel() + x_bytes)
    xs = [x] + [x.clone() for _ in range(max(ternary_sets, dense_sets, fp8_sets) - 1)]
    dys = [dy] + [dy.clone() for _ in range(max(ternary_sets, dense_sets) - 1)]
    packs = [packed] + [packed.clone() for _ in range(ternary_sets - 1)]
    denses = [dense] + [dense.clone() for _ in range(dense_sets - 1)]
    w8s = [w8_t] + [w8_t.t().clone().t() for _ in range(fp8_sets - 1)]

    q_s = [torch_fp8_rowwise(xx) for xx in xs[:fp8_sets]]
    times = {
        "cublas_bf16": median_us(F.linear, list(zip(xs, denses, strict=False))),
        "cublas_fp8": median_us(cublas_fp8, list(zip(xs, w8s, strict=False))),
        "cublas_fp8_gemm_only": median_us(
            fp8_gemm_only, [(q, s, w) for (q, s), w in zip(q_s, w8s, strict=True)]
        ),
        "a16": median_us(a16, list(zip(xs, packs, strict=False))),
        "a16_lora64": median_us(a16_lora, list(zip(xs, packs, strict=False))),
        "a8": median_us(a8, list(zip(xs, packs, strict=False))),
        "a16_fused": median_us(a16_fused, list(zip(xs, packs, strict=False))),
        "a8_fused": median_us(a8_fused, list(zip(xs, packs, strict=False))),
        "unpack_bf16_only": median_us(unpack, [(w,) for w in packs]),
        "a8_quantize_only": median_us(
            triton_launch.quantize_fp8, [(xx,) for xx in xs[:ternary_sets]]
        ),
        "dx": median_us(dx, list(zip(dys, packs, strict=False))),
        "dx_fused": median_us(dx_fused, list(zip(dys, packs, strict=False))),
        "cublas_bf16_dx": median_us(torch.matmul, list(zip(dys, denses, strict=False))),
    }
    return {"K": k, "N": n, "M": m, "us": times, "rel_err": errors}


def markdown(points: list[dict], gpu: str) -> str:
    lines = [
        f"Median us per call on {gpu}; speed-up vs cuBLAS bf16 in brackets (dX: vs cuBLAS dy @ W).",
        "",
        "| layer K->N | M | cuBLAS bf16 | cuBLAS fp8 (+quant) | A16 | A16 fused | A16+LoRA64 "
        "| A8 (+quant) | A8 fused | cuBLAS dX | dX | dX fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {v: k for k, v in SHAPES.items()}
    for p in points:
        t = p["us"]
        base = t["cublas_bf16"]

        def cell(key, ref=base, t=t):
            return f"{t[key]:.1f} ({ref / t[key]:.2f}x)"

        lines.append(
            f"| {names[(p['K'], p['N'])]} {p['K']}->{p['N']} | {p['M']} | {base:.1f} "
            f"| {cell('cublas_fp8')} | {cell('a16')} | {cell('a16_fused')} | {cell('a16_lora64')} "
            f"| {cell('a8')} | {cell('a8_fused')} "
            f"| {t['cublas_bf16_dx']:.1f} | {cell('dx', t['cublas_bf16_dx'])} "
            f"| {cell('dx_fused', t['cublas_bf16_dx'])} |"
        )
    return "\n".join(lines)


def write_json(path: str, gpu: str, points: list[dict], failures: list) -> None:
    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": "median of CUDA-graph replays (triton.testing.do_bench_cudagraph), inputs "
        f"cycled through >= {L2_FLUSH_BYTES / 1e6:.0f} MB to defeat L2",
        "points": points,
        "configs": {repr(key): repr(cfg) for key, cfg in triton_launch.chosen_configs().items()},
        "failures": [repr(f) for f in failures],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ.get("OUT", "."), "bench-kernels.json")
    parser.add_argument("--out", default=default_out, help="JSON path (default: %(default)s)")
    parser.add_argument("--m", type=int, nargs="+", default=list(TOKENS), help="token counts")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points, failures = [], []
    for name in args.shapes:
        k, n = SHAPES[name]
        for m in args.m:
            start = time.time()
            try:
                point = bench_point(k, n, m, gen)
            except Exception as error:  # keep measuring the rest; the failure is reported
                failures.append((name, m, repr(error)))
                print(f"{name} M={m}: FAILED {error!r}", flush=True)
                continue
            points.append(point)
            bad = {op: e for op, e in point["rel_err"].items() if not e < TOLERANCE}
            if bad:
                failures.append((name, m, bad))
            print(
                f"{name} M={m}: "
                + " ".join(f"{op}={us:.1f}" for op, us in point["us"].items())
                + f" errors={ {op: f'{e:.1e}' for op, e in point['rel_err'].items()} }"
                + f" [{time.time() - start:.0f}s]",
                flush=True,
            )
            write_json(args.out, gpu, points, failures)
    write_json(args.out, gpu, points, failures)
    print(markdown(points, gpu))
    if failures:
        print("FAILURES:", failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
