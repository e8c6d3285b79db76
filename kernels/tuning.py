"""Launch configurations of the Triton kernels, one table per GPU family: data only.

Each table maps a token-count bucket to a few candidates; the launcher times them once per
(bucket, shape) and keeps the fastest (kernels/triton_launch.py). Candidates that do not fit
a GPU (shared memory, registers) are skipped there. Only the Hopper table was measured (H100,
H200); the Ampere and Ada tables are educated guesses sized for their shared memory. GPUs of
no family here (Blackwell and later, sm_100+) get no table: kernels/plan.py gives them its
stated conservative plan instead of another family's numbers.
"""

from __future__ import annotations

from typing import NamedTuple


class MatmulConfig(NamedTuple):
    """Forward / scale-gradient tile: BLOCK_N weight rows x BLOCK_M tokens, BLOCK_K columns
    per step (a multiple of the 128-column packing group), K split over SPLIT_K programs."""

    block_n: int
    block_m: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


class DxConfig(NamedTuple):
    """Input-gradient tile: BLOCK_K input columns x BLOCK_M tokens, BLOCK_N rows per step."""

    block_k: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class GemvConfig(NamedTuple):
    """One-token tile (the token padded to 16 tensor-core columns): BLOCK_N rows, BLOCK_BYTES
    packed bytes per row per step (4x as many columns), K split over SPLIT_K programs."""

    block_n: int
    block_bytes: int
    split_k: int
    num_warps: int


GEMV_MAX_TOKENS = 1  # up to this many tokens the forward pass uses the GEMV kernel
M_BUCKETS = (16, 64, 512)  # upper bounds of the small buckets; larger M is "large"

_MM = MatmulConfig
_DX = DxConfig

MATMUL_TABLES: dict[str, dict[str, dict[str, list[MatmulConfig]]]] = {
    "hopper": {
        "a16": {
            "m16": [
                _MM(64, 16, 128, 1, 4, 4),
                _MM(32, 16, 256, 1, 4, 3),
                _MM(64, 16, 128, 4, 4, 4),
            ],
            "m64": [
                _MM(64, 64, 128, 1, 4, 4),
                _MM(128, 64, 128, 1, 4, 4),
                _MM(64, 32, 128, 2, 4, 4),
            ],
            "m512": [_MM(128, 128, 128, 1, 8, 4), _MM(128, 64, 128, 1, 4, 4)],
            "large": [_MM(128, 256, 128, 1, 8, 2), _MM(128, 128, 128, 1, 8, 4)],
        },
        "a8": {
            "m16": [_MM(64, 16, 128, 1, 4, 4), _MM(64, 16, 256, 4, 4, 3)],
            "m64": [_MM(64, 64, 128, 1, 4, 4), _MM(128, 64, 256, 1, 4, 3)],
            "m512": [_MM(128, 128, 256, 1, 8, 3), _MM(128, 64, 256, 1, 4, 3)],
            "large": [
                _MM(128, 256, 128, 1, 8, 3),
                _MM(128, 256, 256, 1, 8, 2),
                _MM(128, 128, 256, 1, 8, 3),
            ],
        },
    },
    "ada": {
        "a16": {
            "m16": [_MM(64, 16, 128, 1, 4, 3), _MM(64, 16, 128, 4, 4, 3)],
            "m64": [_MM(64, 64, 128, 1, 4, 3)],
            "m512": [_MM(128, 64, 128, 1, 4, 2), _MM(64, 128, 128, 1, 4, 2)],
            "large": [_MM(128, 128, 128, 1, 8, 2), _MM(64, 128, 128, 1, 4, 2)],
        },
        "a8": {
            "m16": [_MM(64, 16, 128, 1, 4, 3)],
            "m64": [_MM(64, 64, 128, 1, 4, 3)],
            "m512": [_MM(128, 64, 128, 1, 4, 3)],
            "large": [_MM(128, 128, 128, 1, 8, 3), _MM(128, 128, 256, 1, 8, 2)],
        },
    },
    "ampere": {  # no fp8: the 8-bit path runs bf16 codes, so both share one table
        "a16": {
            "m16": [_MM(64, 16, 128, 1, 4, 3), _MM(64, 16, 128, 4, 4, 3)],
            "m64": [_MM(64, 64, 128, 1, 4, 3)],
            "m512": [_MM(128, 64, 128, 1, 4, 3), _MM(128, 128, 128, 1, 8, 3)],
            "large": [_MM(128, 128, 128, 1, 8, 3), _MM(128, 256, 128, 1, 8, 2)],
        },
    },
}
MATMUL_TABLES["ampere"]["a8"] = MATMUL_TABLES["ampere"]["a16"]

_GV = GemvConfig

# block_n 64 runs wgmma on Hopper (one warpgroup), mma.sync below and on Ampere / Ada. The
# GEMV is latency bound on the H100: split-K wins at N = 3072 (8 slices at K >= 12288, 4 at
# K = 3072), 2-3 at N = 9216-12288, none at N = 21504; 12-16 slices, 16-32 row mma.sync
# tiles, 128-row tiles, 128-byte steps and deeper pipelines were measured and never won.
GEMV_TABLES: dict[str, list[GemvConfig]] = {
    "hopper": [
        _GV(64, 64, 1, 4),
        _GV(64, 64, 2, 4),
        _GV(64, 64, 3, 4),
        _GV(64, 64, 4, 4),
        _GV(64, 64, 8, 4),
    ],
    "ada": [_GV(32, 64, 1, 2), _GV(64, 64, 3, 4)],
    "ampere": [_GV(32, 64, 1, 2), _GV(64, 64, 3, 4)],
}

DX_TABLES: dict[str, dict[str, list[DxConfig]]] = {
    "hopper": {
        "m16": [_DX(128, 16, 128, 4, 4)],
        "m64": [_DX(128, 64, 64, 4, 4)],
        "m512": [_DX(128, 128, 64, 8, 4), _DX(128, 64, 64, 4, 4)],
        "large": [_DX(128, 256, 64, 8, 3), _DX(128, 128, 64, 8, 4), _DX(128, 128, 128, 8, 3)],
    },
    "ada": {
        "m16": [_DX(128, 16, 128, 4, 3)],
        "m64": [_DX(128, 64, 64, 4, 3)],
        "m512": [_DX(128, 64, 64, 4, 3)],
        "large": [_DX(128, 128, 64, 8, 2)],
    },
    "ampere": {
        "m16": [_DX(128, 16, 128, 4, 3)],
        "m64": [_DX(128, 64, 64, 4, 3)],
        "m512": [_DX(128, 128, 64, 8, 3)],
        "large": [_DX(128, 128, 64, 8, 3), _DX(128, 256, 64, 8, 2)],
    },
}

# From this many tokens on, the forward pass unpacks the layer into a transient dense scratch
# weight and runs cuBLAS (see kernels/triton_linear.py): on the H100 the fused kernels reached
# 0.2-0.5x of cuBLAS bf16 at M >= 256 but matched it at M <= 16.
DENSE_MIN_TOKENS = {"hopper": 65, "ada": 65, "ampere": 65, "interpreter": 1 << 62}
UNPACK_BLOCK = (64, 128)  # (BLOCK_N, BLOCK_K) of the unpack kernel

# Used under TRITON_INTERPRET=1 (CPU tests): small tiles keep the interpreter fast.
INTERPRETER_MATMUL = MatmulConfig(32, 16, 128, 1, 4, 1)
INTERPRETER_DX = DxConfig(128, 16, 32, 4, 1)
INTERPRETER_GEMV = GemvConfig(16, 32, 1, 4)


def gpu_family(capability: tuple[int, int]) -> str | None:
    """'hopper' (sm_90), 'ada' (sm_89), 'ampere' (sm_80-87); None for GPUs without tables."""
    if capability[0] == 9:
        return "hopper"
    if capability == (8, 9):
        return "ada"
    if capability[0] == 8:
        return "ampere"
    return None


def m_bucket(m: int) -> str:
    """Token-count bucket that selects a table row."""
    for bound in M_BUCKETS:
        if m <= bound:
            return f"m{bound}"
    return "large"
