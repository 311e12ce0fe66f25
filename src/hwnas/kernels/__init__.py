"""Kernels: the Triton block-sparse × dense linear (BSR weights), its torch reference and CPU paths."""

from hwnas.kernels.block_sparse import BlockSparseLinear, BsrWeight, bsr_linear, bsr_linear_reference

__all__ = ["BlockSparseLinear", "BsrWeight", "bsr_linear", "bsr_linear_reference"]
