"""The permutation that sorts each row of scores from best to worst: how token pruning ranks tokens.

``descending_order(scores)`` is ``scores.argsort(dim=1, descending=True, stable=True)`` with NaN
counted as -inf: ties keep their index order.

* On CUDA, one Triton program per row counts, for every token, the tokens that rank above it
  (a higher score, or an equal one at a lower index) — its position — and writes its index there.
  For a few hundred tokens that is one short launch: on an H100, 5.9 µs on average over
  deit_small's three cuts at batch 1, where PyTorch's sort took 31 µs, 21 of them a radix sort of
  the first cut's 196 scores (torch sorts more than 128 values per row that way). Token pruning
  sorts once per cut, and at batch 1 on a GPU those microseconds are a share of the model.
  Beyond ``MAX_TRITON_TOKENS`` per row, torch.
* Elsewhere (CPU, autograd, long rows): ``torch.argsort``.

``use_triton`` follows ``hwnas.kernels.gather_scatter``: None runs Triton on CUDA tensors unless
autograd records the call, True forces it (CPU tensors under ``TRITON_INTERPRET=1``), False forces torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hwnas.kernels.gather_scatter import should_use_triton
from hwnas.kernels.launches import one_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86-64 only
    triton = None

#: the longest row one program ranks (its O(N²) comparisons run in tiles of ``_TILE`` elements)
MAX_TRITON_TOKENS = 4096
_TILE = 8192


if triton is not None:

    @triton.jit
    def _descending_order_kernel(scores_ptr, order_ptr, N, stride_sb, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_j = tl.arange(0, BLOCK_N)
        s_j = tl.load(scores_ptr + b * stride_sb + offs_j, mask=offs_j < N, other=0.0).to(tl.float32)
        s_j = tl.where(s_j != s_j, float("-inf"), s_j)  # NaN counts as -inf
        for start in range(0, N, CHUNK):  # CHUNK tokens at a time: their positions
            offs_i = start + tl.arange(0, CHUNK)
            in_i = offs_i < N
            s_i = tl.load(scores_ptr + b * stride_sb + offs_i, mask=in_i, other=0.0).to(tl.float32)
            s_i = tl.where(s_i != s_i, float("-inf"), s_i)
            # j ranks above i: a higher score, or the same score at a lower index
            tie = (s_j[None, :] == s_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
            above = (s_j[None, :] > s_i[:, None]) | tie
            position = tl.sum((above & (offs_j < N)[None, :]).to(tl.int32), axis=1)
            tl.store(order_ptr + b * N + position, offs_i.to(tl.int64), mask=in_i)


@one_launch
def descending_order(scores: Tensor, use_triton: bool | None = None) -> Tensor:
    """Per row of ``scores [B, N]``, the indices from the highest score to the lowest: ``[B, N]`` int64.

    Ties keep index order; NaN counts as -inf.
    """
    if scores.dim() != 2:
        raise ValueError(f"expected scores [B, N], got {tuple(scores.shape)}")
    batch, tokens = scores.shape
    if not should_use_triton(use_triton, scores) or tokens > MAX_TRITON_TOKENS or scores.numel() == 0:
        ranked = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        return ranked.argsort(dim=1, descending=True, stable=True)
    order = torch.empty(batch, tokens, dtype=torch.int64, device=scores.device)
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    block_n = triton.next_power_of_2(tokens)
    _descending_order_kernel[(batch,)](scores, order, tokens, scores.stride(0), BLOCK_N=block_n,
                                       CHUNK=max(2, _TILE // block_n), num_warps=4 if block_n <= 1024 else 8)
    return order
