"""Row gather / scatter: the Triton kernels against the torch reference, round trips, errors, autograd.

The Triton tests run on the CPU under ``TRITON_INTERPRET=1`` (or on CUDA) and skip otherwise.
"""

import os

import pytest
import torch

from hwnas.kernels import gather_rows, scatter_add_rows_, scatter_rows_
from hwnas.kernels.block_sparse import triton_available

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="needs Triton, and CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
L, R = 70, 45  # R is not a multiple of any row block


def make(batch: int, channels: int, dtype=torch.float32, index_dtype=torch.int64, repeat: bool = False, seed: int = 0):
    """``x [B, L, C]``, ``rows [B, R]`` (distinct per image unless ``repeat``), ``values [B, R, C]``, on ``DEVICE``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, channels, generator=gen).to(dtype)
    if repeat:
        rows = torch.randint(0, L, (batch, R), generator=gen)
    else:
        rows = torch.stack([torch.randperm(L, generator=gen)[:R] for _ in range(batch)])
    values = torch.randn(batch, R, channels, generator=gen).to(dtype)
    return x.to(DEVICE), rows.to(DEVICE, index_dtype), values.to(DEVICE)


def test_torch_path_matches_advanced_indexing():
    x = torch.randn(2, 9, 5)
    rows = torch.tensor([[3, 0, 8], [1, 1, 4]])
    batch = torch.arange(2)[:, None]
    assert torch.equal(gather_rows(x, rows, use_triton=False), x[batch, rows])
    values = torch.randn(2, 3, 5)
    expected = x.clone()
    expected[batch, rows[:, [0, 2]]] = values[:, [0, 2]]
    got = scatter_rows_(x.clone(), rows[:, [0, 2]], values[:, [0, 2]].contiguous(), use_triton=False)
    assert torch.equal(got, expected)
    weights = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.25, 1.0]])
    expected = x.clone().index_put_((batch.expand_as(rows), rows), values * weights[..., None], accumulate=True)
    torch.testing.assert_close(scatter_add_rows_(x.clone(), rows, values, weights, use_triton=False), expected)


def test_torch_path_on_views_gradients_and_bad_rows():
    full = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)
    patches = full[:, 1:]  # the patch tokens: rows contiguous, images not
    rows = torch.tensor([[8, 0, 8], [2, 5, 1], [0, 0, 3]])
    batch = torch.arange(3)[:, None]
    out = gather_rows(patches, rows, use_triton=False)
    assert torch.equal(out, patches[batch, rows])
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), full)[0],
                               torch.autograd.grad(patches[batch, rows].square().sum(), full)[0])
    transposed = torch.randn(3, 4, 9, dtype=torch.float64).transpose(1, 2)  # no row table: written back
    values = torch.randn(3, 3, 4, dtype=torch.float64)
    expected = transposed.clone().index_put_((batch.expand_as(rows), rows), values, accumulate=True)
    assert torch.equal(scatter_add_rows_(transposed, rows, values, use_triton=False), expected)
    base = torch.randn(3, 10, 4, dtype=torch.float64)
    expected = base.clone()
    expected[:, 1:].index_put_((batch.expand_as(rows), rows), values, accumulate=True)
    sliced = base[:, 1:]  # written through the row table's view: the class rows stay as they were
    assert scatter_add_rows_(sliced, rows, values, use_triton=False) is sliced and torch.equal(base, expected)
    for bad in (-1, 9):  # would silently land in the neighbouring image of the flattened table
        with pytest.raises(IndexError, match=r"rows must lie in \[0, 9\)"):
            gather_rows(patches.detach(), torch.tensor([[bad]] * 3), use_triton=False)
        with pytest.raises(IndexError, match=r"rows must lie in \[0, 9\)"):
            scatter_add_rows_(sliced, torch.tensor([[bad]] * 3), values[:, :1].contiguous(), use_triton=False)


@needs_triton
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels", [33, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_matches_reference(batch, channels, dtype, index_dtype):
    x, rows, _ = make(batch, channels, dtype, index_dtype)
    out = gather_rows(x, rows, use_triton=True)
    assert out.shape == (batch, R, channels) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, gather_rows(x, rows, use_triton=False))


@needs_triton
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels", [33, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_matches_reference_and_leaves_other_rows(batch, channels, dtype):
    x, rows, values = make(batch, channels, dtype, torch.int32)
    out = scatter_rows_(x.clone(), rows, values, use_triton=True)
    assert torch.equal(out, scatter_rows_(x.clone(), rows, values, use_triton=False))
    touched = torch.zeros(batch, L, dtype=torch.bool, device=DEVICE).scatter_(1, rows.long(), True)
    assert torch.equal(out[~touched], x[~touched])
    assert torch.equal(gather_rows(out, rows), values)


@needs_triton
def test_gather_scatter_round_trip_restores_x():
    x, rows, _ = make(3, 33)
    kept = gather_rows(x, rows, use_triton=True)
    y = x.clone()
    y[torch.arange(3)[:, None], rows] = 0.0
    assert scatter_rows_(y, rows, kept, use_triton=True) is y
    assert torch.equal(y, x)


@needs_triton
def test_scatter_writes_through_a_strided_view():
    base, rows, values = make(2, 40)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel stride L
    scatter_rows_(x, rows, values, use_triton=True)
    assert not x.is_contiguous() and torch.equal(x, scatter_rows_(base.clone(), rows, values, use_triton=False))
    assert torch.equal(gather_rows(x, rows, use_triton=True), values)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_scatter_add_with_repeated_rows_matches_reference(dtype, weighted):
    x, rows, values = make(3, 33, dtype, repeat=True)
    weights = torch.rand(rows.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) if weighted else None
    out = scatter_add_rows_(x.clone(), rows, values, weights, use_triton=True)
    ref = scatter_add_rows_(x.float(), rows, values.float(), weights, use_triton=False)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@needs_triton
def test_kernels_ignore_out_of_range_rows():
    x, rows, values = make(1, 33)
    rows[0, :2] = torch.tensor([-1, L])
    out = gather_rows(x, rows, use_triton=True)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.equal(out[:, 2:], gather_rows(x, rows[:, 2:], use_triton=False))
    expected = scatter_rows_(x.clone(), rows[:, 2:], values[:, 2:].contiguous(), use_triton=False)
    assert torch.equal(scatter_rows_(x.clone(), rows, values, use_triton=True), expected)


@needs_triton
def test_empty_tables():
    x, rows, values = make(2, 33)
    assert gather_rows(x, rows[:, :0], use_triton=True).shape == (2, 0, 33)
    assert torch.equal(scatter_rows_(x.clone(), rows[:, :0], values[:, :0], use_triton=True), x)


def test_shifted_window_table_fuses_roll_and_partition():
    """A table built from a shifted window partition gathers what roll + partition would."""
    batch, size, window, shift, channels = 2, 8, 4, 2, 6
    x = torch.randn(batch, size * size, channels)
    grid = torch.arange(size * size).reshape(size, size).roll((-shift, -shift), (0, 1))
    table = grid.reshape(2, window, 2, window).permute(0, 2, 1, 3).reshape(4, window * window)
    keep = torch.tensor([[3, 0], [1, 2]])  # two windows per image, window-major
    rows = table[keep].reshape(batch, -1)
    image = x.reshape(batch, size, size, channels).roll((-shift, -shift), (1, 2))
    windows = image.reshape(batch, 2, window, 2, window, channels).permute(0, 1, 3, 2, 4, 5)
    expected = windows.reshape(batch, 4, window * window, channels)[torch.arange(batch)[:, None], keep]
    use = triton_available("cpu")
    assert torch.equal(gather_rows(x, rows, use_triton=use), expected.reshape(batch, -1, channels))


def test_autograd_uses_the_torch_path():
    x = torch.randn(2, 10, 8, requires_grad=True)
    rows = torch.tensor([[1, 4, 4], [0, 9, 2]])
    gather_rows(x, rows).sum().backward()
    counts = torch.zeros(2, 10).scatter_add_(1, rows, torch.ones(2, 3))
    assert torch.equal(x.grad, counts[..., None].expand(-1, -1, 8))
    values = torch.randn(2, 2, 8, requires_grad=True)
    scatter_rows_(x.detach().clone(), rows[:, :2], values).sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))


@needs_triton
def test_forcing_triton_with_autograd_raises():
    x = torch.randn(1, 10, 8, device=DEVICE, requires_grad=True)
    rows = torch.tensor([[1, 2]], device=DEVICE)
    with pytest.raises(ValueError, match="autograd"):
        gather_rows(x, rows, use_triton=True)
    with torch.no_grad():
        assert torch.equal(gather_rows(x, rows, use_triton=True), x[:, [1, 2]])


@pytest.mark.parametrize(
    ("x", "rows", "values", "match"),
    [
        (torch.zeros(10, 8), torch.zeros(1, 2, dtype=torch.long), None, r"x \[B, L, C\]"),
        (torch.zeros(2, 10, 8), torch.zeros(1, 2, dtype=torch.long), None, r"x \[B, L, C\]"),
        (torch.zeros(1, 10, 8), torch.zeros(1, 2), None, "int32 or int64"),
        (torch.zeros(1, 10, 8), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, 8), "values must be"),
        (torch.zeros(1, 10, 8), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 8).half(), "values must be"),
    ],
)
def test_bad_inputs_raise(x, rows, values, match):
    with pytest.raises(ValueError, match=match):
        if values is None:
            gather_rows(x, rows)
        else:
            scatter_rows_(x, rows, values)


def test_bad_weights_and_forced_triton_raise():
    x, rows, values = torch.zeros(1, 10, 8), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="weights must be float"):
        scatter_add_rows_(x, rows, values, torch.ones(1, 3))
    with pytest.raises(ValueError, match="Triton"):
        gather_rows(x.double(), rows, use_triton=True)
    if not triton_available("cpu"):
        with pytest.raises(ValueError, match="CUDA tensors or TRITON_INTERPRET"):
            gather_rows(x, rows, use_triton=True)


@needs_cuda
def test_cuda_default_dispatch_matches_reference():
    x, rows, values = (t.cuda() for t in make(3, 96, torch.float16))
    with torch.inference_mode():
        assert torch.equal(gather_rows(x, rows), gather_rows(x, rows, use_triton=False))
        assert torch.equal(
            scatter_rows_(x.clone(), rows, values), scatter_rows_(x.clone(), rows, values, use_triton=False)
        )
