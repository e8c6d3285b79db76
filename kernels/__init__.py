"""Ternary matmul kernels: Triton on CUDA, a pure-torch reference everywhere else."""
