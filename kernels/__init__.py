"""Ternary matmul kernels, tensors only: the 2bit layout, the weight objects, device facts,
the plan, tuning tables, the torch reference, the Triton kernels and the one op
(``kernels.op.ternary_linear``). Nothing here knows a model or a file format."""
