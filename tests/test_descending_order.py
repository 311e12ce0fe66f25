"""Ranking tokens best first: the Triton kernel against torch's stable argsort, ties and NaN included,
and UCC's mixed ranking (two scores scaled to one and mixed in the same kernel) against torch's mix.

The Triton tests run on the CPU under ``TRITON_INTERPRET=1`` (or on CUDA) and skip otherwise.
"""

import importlib
import os

import pytest
import torch

from hwnas.kernels import descending_order
from hwnas.kernels.descending_order import mixed_descending_order, mixed_scores
from hwnas.kernels.block_sparse import triton_available

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="needs Triton, and CUDA or TRITON_INTERPRET=1")


def reference(scores: torch.Tensor) -> torch.Tensor:
    """Sorted by (score descending, index ascending), NaN as -inf, one element at a time."""
    rows = []
    for row in scores.tolist():
        key = [(float("-inf") if v != v else v) for v in row]
        rows.append(sorted(range(len(row)), key=lambda i: (-key[i], i)))
    return torch.tensor(rows, dtype=torch.int64)


def with_ties_and_nan(batch: int, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, max(tokens // 3, 2), (batch, tokens), generator=gen).float()  # many ties
    scores[0, :: max(tokens // 4, 1)] = float("nan")
    scores[-1, -1] = float("-inf")
    return scores


@pytest.mark.parametrize("tokens", [1, 7, 32, 196, 300])
def test_torch_path_is_the_stable_descending_order(tokens):
    scores = with_ties_and_nan(3, tokens, tokens)
    assert torch.equal(descending_order(scores, use_triton=False), reference(scores))


@needs_triton
@pytest.mark.parametrize("tokens", [1, 7, 32, 55, 196, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_gives_the_same_permutation(tokens, dtype):
    """Odd lengths, several chunks of the kernel's loop, ties, NaN, -inf, half precision."""
    scores = with_ties_and_nan(3, tokens, tokens).to(dtype)
    got = descending_order(scores.to(DEVICE), use_triton=True).cpu()
    assert got.dtype == torch.int64
    assert torch.equal(got, reference(scores))


@needs_triton
def test_kernel_on_distinct_scores_and_a_strided_view():
    scores = torch.rand(4, 2 * 196)[:, ::2]  # no ties: argsort's order, whatever its stability
    got = descending_order(scores.to(DEVICE), use_triton=True).cpu()
    assert torch.equal(got, scores.argsort(dim=1, descending=True))


@needs_triton
def test_long_rows_take_the_torch_path(monkeypatch):
    module = importlib.import_module("hwnas.kernels.descending_order")  # the package's name is the function
    monkeypatch.setattr(module, "MAX_TRITON_TOKENS", 16)
    monkeypatch.setattr(module, "_descending_order_kernel", None)  # launching it would fail
    scores = with_ties_and_nan(2, 17, 0)
    assert torch.equal(descending_order(scores.to(DEVICE), use_triton=True).cpu(), reference(scores))


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        descending_order(torch.rand(5))


def test_mixed_scores_scale_each_part_to_one_then_mix():
    first, second = torch.tensor([[1.0, 3.0, 0.0, 4.0]]), torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    expected = 0.2 * torch.tensor([[0.125, 0.375, 0.0, 0.5]]) + 0.8 * torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    assert torch.allclose(mixed_scores(first, second, 0.8), expected)
    zero_part = mixed_scores(torch.zeros(1, 3), second[:, :3], 0.5)  # an all-zero part stays zero, not NaN
    assert torch.equal(zero_part, 0.5 * second[:, :3] / 4)


def exactly_mixable(batch: int, tokens: int, seed: int) -> torch.Tensor:
    """Small integers (many ties) whose row totals are powers of two: scaled to one and mixed with weight 0.75,
    every step is exact in fp32, so any correct kernel ranks them exactly as torch does, ties included."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (batch, tokens), generator=gen).float()
    totals = scores.sum(dim=1)
    scores[:, -1] += 2.0 ** torch.ceil(torch.log2(totals + 1)) - totals
    return scores


@needs_triton
@pytest.mark.parametrize("tokens", [1, 7, 55, 196, 300])
def test_mixed_kernel_ranks_as_torch_ties_nan_and_zero_rows_included(tokens):
    first, second = exactly_mixable(4, tokens, tokens), exactly_mixable(4, tokens, tokens + 1)
    first[1] = 0.0                   # a zero part: its total is clamped, its share is zero
    second[2, tokens // 2] = float("nan")  # NaN spreads through the row's total: every token ties at -inf
    expected = reference(mixed_scores(first, second, 0.75))
    got = mixed_descending_order(first.to(DEVICE), second.to(DEVICE), 0.75, use_triton=True).cpu()
    assert torch.equal(got, expected)
    assert torch.equal(mixed_descending_order(first, second, 0.75, use_triton=False), expected)


@needs_triton
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.8, 1.0])
def test_mixed_kernel_on_real_valued_scores_and_strided_views(weight):
    """Sums in another order may move a score by an ulp, so the check is that the order sorts torch's mix."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.rand(3, 2 * 196, generator=gen)[:, ::2], torch.rand(3, 196, generator=gen) ** 4
    got = mixed_descending_order(first.to(DEVICE), second.to(DEVICE), weight, use_triton=True).cpu()
    assert torch.equal(got.sort(dim=1).values, torch.arange(196).expand(3, -1))  # a permutation
    ranked = mixed_scores(first, second, weight).gather(1, got)
    assert bool((ranked[:, 1:] <= ranked[:, :-1] * (1 + 1e-6)).all())


def test_mixed_ranking_rejects_two_shapes():
    with pytest.raises(ValueError, match="one shape"):
        mixed_descending_order(torch.rand(2, 5), torch.rand(2, 4), 0.5)
