"""Ranking tokens best first: the Triton kernel against torch's stable argsort, ties and NaN included.

The Triton tests run on the CPU under ``TRITON_INTERPRET=1`` (or on CUDA) and skip otherwise.
"""

import importlib
import os

import pytest
import torch

from hwnas.kernels import descending_order
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
