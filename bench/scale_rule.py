"""Effect of the opt-in least-squares scale (``--scale-rule lsq``) against absmean.

Real FLUX weights cannot be had here, so rows are drawn from a Gaussian and from
heavier-tailed Student-t distributions (trained weights have heavier tails than a
Gaussian). Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json

import torch

from comfyui_ternary_flux.ternary.quantize import dequantize, ternarize

DISTRIBUTIONS = {
    "gaussian": lambda shape: torch.randn(shape),
    "student-t (nu=5)": lambda shape: torch.distributions.StudentT(5.0).sample(shape),
    "student-t (nu=3)": lambda shape: torch.distributions.StudentT(3.0).sample(shape),
}


def relative_error(w: torch.Tensor, rule: str) -> float:
    t, s = ternarize(w, rule)
    return float((w - dequantize(t, s)).norm() / w.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3072)
    parser.add_argument("--cols", type=int, default=3072)
    parser.add_argument("--out", default="scale-rule.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    print("| weights | absmean error | lsq error | change |")
    print("|---|---|---|---|")
    for name, draw in DISTRIBUTIONS.items():
        w = draw((args.rows, args.cols))
        absmean, lsq = relative_error(w, "absmean"), relative_error(w, "lsq")
        results[name] = {"absmean": absmean, "lsq": lsq}
        print(f"| {name} | {absmean:.4f} | {lsq:.4f} | {100 * (lsq / absmean - 1):+.1f} % |")
    with open(args.out, "w") as f:
        json.dump({"rows": args.rows, "cols": args.cols, "relative_error": results}, f, indent=2)


if __name__ == "__main__":
    main()
