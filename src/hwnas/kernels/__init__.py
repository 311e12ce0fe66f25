"""Kernels: the Triton block-sparse × dense linear (BSR weights) and the token kernels, with their torch paths."""

from hwnas.kernels.block_sparse import BlockSparseLinear, BsrWeight, bsr_linear, bsr_linear_reference
from hwnas.kernels.class_attention import class_attention
from hwnas.kernels.descending_order import descending_order, mixed_descending_order
from hwnas.kernels.gather_scatter import gather_rows, scatter_add_rows_, scatter_rows_

__all__ = [
    "BlockSparseLinear",
    "BsrWeight",
    "bsr_linear",
    "bsr_linear_reference",
    "class_attention",
    "descending_order",
    "gather_rows",
    "mixed_descending_order",
    "scatter_add_rows_",
    "scatter_rows_",
]
