"""The permutation that sorts each row of scores from best to worst: how token pruning ranks tokens.

``descending_order(scores)`` is ``scores.argsort(dim=1, descending=True, stable=True)`` with NaN
counted as -inf: ties keep their index order. ``mixed_descending_order(first, second, weight)``
ranks ``mixed_scores``: the two scores, each scaled to sum to one per row, mixed as
``torch.lerp`` mixes them (UCC's spatial and spectral parts).

* On CUDA, one Triton program per row counts, for every token, the tokens that rank above it
  (a higher score, or an equal one at a lower index) — its position — and writes its index there.
  For a few hundred tokens that is one short launch: on an H100, 5.9 µs on average over
  deit_small's three cuts at batch 1, where PyTorch's sort took 31 µs, 21 of them a radix sort of
  the first cut's 196 scores (torch sorts more than 128 values per row that way). Token pruning
  sorts once per cut, and at batch 1 on a GPU those microseconds are a share of the model.
  The mixed ranking sums and mixes the two rows in the same program, where torch takes seven
  launches (two sums, two clamps, two divisions, the lerp) before its sort.
  Beyond ``MAX_TRITON_TOKENS`` per row, torch.
* Elsewhere (CPU, autograd, long rows): ``torch.argsort`` (of ``mixed_scores``).

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
#: the smallest total a score is divided by when it is scaled to sum to one (an all-zero row stays zero)
_SMALLEST_TOTAL = 1e-12


if triton is not None:

    @triton.jit
    def _row_scores(first_ptr, second_ptr, offs, mask, first_total, second_total, weight, MIXED: tl.constexpr):
        """The scores at ``offs`` in fp32 (NaN as -inf): the first row's, or with MIXED the two rows' mix."""
        score = tl.load(first_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MIXED:  # torch.lerp(first / Σfirst, second / Σsecond, weight), in its two-sided form
            start = tl.div_rn(score, first_total)
            end = tl.div_rn(tl.load(second_ptr + offs, mask=mask, other=0.0).to(tl.float32), second_total)
            score = tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))
        return tl.where(score != score, float("-inf"), score)

    @triton.jit
    def _descending_order_kernel(first_ptr, second_ptr, order_ptr, N, stride_fb, stride_sb, weight, smallest_total,
                                 BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, MIXED: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        first_ptr += b * stride_fb
        second_ptr += b * stride_sb
        offs_j = tl.arange(0, BLOCK_N)
        in_j = offs_j < N
        first_total, second_total = 1.0, 1.0
        if MIXED:  # each row's total, as torch's clamp_min keeps it (a NaN total stays NaN)
            first_total = tl.sum(tl.load(first_ptr + offs_j, mask=in_j, other=0.0).to(tl.float32), axis=0)
            second_total = tl.sum(tl.load(second_ptr + offs_j, mask=in_j, other=0.0).to(tl.float32), axis=0)
            first_total = tl.maximum(first_total, smallest_total, propagate_nan=tl.PropagateNan.ALL)
            second_total = tl.maximum(second_total, smallest_total, propagate_nan=tl.PropagateNan.ALL)
        s_j = _row_scores(first_ptr, second_ptr, offs_j, in_j, first_total, second_total, weight, MIXED)
        for start in range(0, N, CHUNK):  # CHUNK tokens at a time: their positions
            offs_i = start + tl.arange(0, CHUNK)
            in_i = offs_i < N
            s_i = _row_scores(first_ptr, second_ptr, offs_i, in_i, first_total, second_total, weight, MIXED)
            # j ranks above i: a higher score, or the same score at a lower index
            tie = (s_j[None, :] == s_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
            above = (s_j[None, :] > s_i[:, None]) | tie
            position = tl.sum((above & in_j[None, :]).to(tl.int32), axis=1)
            tl.store(order_ptr + b * N + position, offs_i.to(tl.int64), mask=in_i)


@one_launch
def descending_order(scores: Tensor, use_triton: bool | None = None) -> Tensor:
    """Per row of ``scores [B, N]``, the indices from the highest score to the lowest: ``[B, N]`` int64.

    Ties keep index order; NaN counts as -inf.
    """
    _check_rows(scores)
    if not _runs_triton(use_triton, scores):
        ranked = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        return ranked.argsort(dim=1, descending=True, stable=True)
    return _ranked_by_triton(scores, None, 0.0)


@one_launch
def mixed_descending_order(first: Tensor, second: Tensor, weight: float, use_triton: bool | None = None) -> Tensor:
    """``descending_order(mixed_scores(first, second, weight))``: on CUDA one launch mixes and ranks."""
    _check_rows(first)
    if second.shape != first.shape:
        raise ValueError(f"expected two scores of one shape [B, N], got {tuple(first.shape)} and {tuple(second.shape)}")
    if not _runs_triton(use_triton, first, second):
        return descending_order(mixed_scores(first, second, weight), use_triton=False)
    return _ranked_by_triton(first, second, weight)


def mixed_scores(first: Tensor, second: Tensor, weight: float) -> Tensor:
    """``(1 - weight)·first/Σfirst + weight·second/Σsecond`` per row of ``[B, N]`` (each total at least 1e-12).

    For non-negative scores each part sums to one per row; ``torch.lerp`` mixes them.
    """
    return torch.lerp(scaled_to_one(first), scaled_to_one(second), weight)


def scaled_to_one(score: Tensor) -> Tensor:
    """``score [B, N]`` divided by its total per row (at least 1e-12)."""
    return score / score.sum(dim=1, keepdim=True).clamp_min(_SMALLEST_TOTAL)


def _check_rows(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"expected scores [B, N], got {tuple(scores.shape)}")


def _runs_triton(use_triton: bool | None, scores: Tensor, *others: Tensor) -> bool:
    return (should_use_triton(use_triton, scores, *others) and scores.shape[1] <= MAX_TRITON_TOKENS
            and scores.numel() > 0)


def _ranked_by_triton(first: Tensor, second: Tensor | None, weight: float) -> Tensor:
    batch, tokens = first.shape
    order = torch.empty(batch, tokens, dtype=torch.int64, device=first.device)
    first = first if first.stride(1) == 1 else first.contiguous()
    if second is not None and second.stride(1) != 1:
        second = second.contiguous()
    block_n = triton.next_power_of_2(tokens)
    _descending_order_kernel[(batch,)](
        first, first if second is None else second, order, tokens, first.stride(0),
        first.stride(0) if second is None else second.stride(0), float(weight), _SMALLEST_TOTAL, BLOCK_N=block_n,
        CHUNK=max(2, _TILE // block_n), MIXED=second is not None, num_warps=4 if block_n <= 1024 else 8,
    )  # fmt: skip
    return order
