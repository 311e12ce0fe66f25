"""Kernels: the Triton block-sparse × dense linear (BSR weights), its torch reference and CPU paths."""

from hwnas.kernels.block_sparse import BlockSparseLinear, BsrWeight, bsr_linear, bsr_linear_reference
from hwnas.kernels.gather_scatter import gather_rows, scatter_add_rows_, scatter_rows_

__all__ = [
    "BlockSparseLinear",
    "BsrWeight",
    "bsr_linear",
    "bsr_linear_reference",
    "gather_rows",
    "scatter_add_rows_",
    "scatter_rows_",
]
