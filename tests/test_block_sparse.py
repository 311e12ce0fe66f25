"""Block-sparse linear: BSR round trips, the Triton kernel and the CPU paths against the dense masked matmul.

The Triton tests run on the CPU under ``TRITON_INTERPRET=1`` (or on CUDA) and skip otherwise.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.kernels.block_sparse import (
    IMPLS,
    BlockSparseLinear,
    BsrWeight,
    bsr_linear,
    bsr_linear_reference,
    triton_available,
)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="needs Triton, and CUDA or TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def random_mask(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Exactly ``round(sparsity × rows × cols)`` blocks removed."""
    order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows * cols, dtype=torch.bool)
    mask[order[: round(sparsity * rows * cols)]] = False
    return mask.reshape(rows, cols)


def make(out: int, inp: int, block: int, mask: torch.Tensor, dtype=torch.float32, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen) / inp**0.5
    b = torch.randn(out, generator=gen) if bias else None
    bsr = BsrWeight.from_dense(weight.to(dtype), mask)
    return bsr, None if b is None else b.to(dtype)


def check(x: torch.Tensor, weight: BsrWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Run the kernel on ``DEVICE`` and compare with the fp32 reference; return the output."""
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    moved = BsrWeight(on(weight.blocks), on(weight.col_indices), on(weight.row_offsets), weight.shape, weight.block)
    y = bsr_linear(on(x), moved, on(bias)).cpu()
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    fp32 = BsrWeight(weight.blocks.float(), weight.col_indices, weight.row_offsets, weight.shape, weight.block)
    ref = bsr_linear_reference(x.float(), fp32, None if bias is None else bias.float())
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    return y


def test_bsr_round_trip():
    mask = random_mask(4, 3, 0.5)
    weight = torch.randn(64, 48)
    bsr = BsrWeight.from_dense(weight, mask)
    expanded = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert bsr.blocks.shape == (6, 16, 16) and bsr.block == 16 and bsr.shape == (64, 48)
    assert bsr.col_indices.dtype == bsr.row_offsets.dtype == torch.int32
    assert torch.equal(bsr.to_dense(), weight * expanded)
    assert torch.equal(bsr.block_mask(), mask)
    state = bsr.state()
    assert set(state) == {"blocks", "col_indices", "row_offsets", "shape"}
    again = BsrWeight.from_state(state)
    assert again.shape == bsr.shape and again.block == bsr.block
    assert torch.equal(again.to_dense(), bsr.to_dense())


def test_bsr_rejects_a_mask_that_does_not_tile_the_weight():
    with pytest.raises(ValueError, match="does not tile"):
        BsrWeight.from_dense(torch.randn(64, 48), torch.ones(4, 4, dtype=torch.bool))


@needs_triton
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_kernel_matches_reference_at_several_sparsities(block, sparsity):
    out, inp = 128, 128
    weight, bias = make(out, inp, block, random_mask(out // block, inp // block, sparsity, seed=block))
    check(torch.randn(197, inp), weight, bias)


@needs_triton
@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("blocks_per_step", [1, 2, 4])
def test_every_kernel_layout_is_exact(monkeypatch, blocks_per_step, feature_major):
    """Every KB and tile layout the autotuner may pick is exact, also where a kept count is no multiple of KB."""
    import triton

    from hwnas.kernels import block_sparse

    kernel = block_sparse._bsr_linear_kernel
    config = {"BLOCK_M": 32, "KB": blocks_per_step, "FEATURE_MAJOR": feature_major}
    monkeypatch.setattr(kernel, "configs", [triton.Config(config)])
    monkeypatch.setattr(kernel, "cache", {})
    mask = random_mask(6, 7, 0.4, seed=blocks_per_step)
    mask[0], mask[1] = False, True  # an empty block-row and a full one (7 kept blocks)
    weight, bias = make(96, 112, 16, mask)
    check(torch.randn(45, 112), weight, bias)
    assert block_sparse.tuned_config() == {**config, "num_warps": 4, "num_stages": 3}


@needs_triton
@pytest.mark.parametrize("tokens", [1, 7, 197])
def test_kernel_odd_token_counts(tokens):
    weight, bias = make(96, 128, 32, random_mask(3, 4, 0.5))
    check(torch.randn(tokens, 128), weight, bias)


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_3d_input_and_empty_block_rows(bias):
    mask = random_mask(8, 4, 0.25)
    mask[[0, 5]] = False
    weight, b = make(128, 64, 16, mask, bias=bias)
    y = check(torch.randn(2, 9, 64), weight, b)
    for features in (slice(0, 16), slice(80, 96)):
        expected = torch.zeros(16) if b is None else b[features]
        assert torch.equal(y[..., features], expected.expand(2, 9, 16))


@needs_triton
def test_kernel_all_zero_mask_gives_the_bias():
    weight, bias = make(64, 64, 32, torch.zeros(2, 2, dtype=torch.bool))
    assert weight.blocks.shape[0] == 0
    y = check(torch.randn(5, 64), weight, bias)
    assert torch.equal(y, bias.expand(5, -1))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32])
def test_kernel_half_precision(dtype, block):
    weight, bias = make(128, 64, block, random_mask(128 // block, 64 // block, 0.5), dtype=dtype)
    check(torch.randn(2, 33, 64, dtype=dtype), weight, bias)


@needs_triton
def test_kernel_uses_the_mask():
    mask = random_mask(4, 4, 0.5)
    dense = torch.randn(64, 64)
    x = torch.randn(7, 64)
    y = check(x, BsrWeight.from_dense(dense, mask), None)
    assert not torch.allclose(y, F.linear(x, dense), atol=1e-2)


@needs_triton
def test_kernel_rejects_mismatched_inputs():
    weight, _ = make(64, 64, 32, random_mask(2, 2, 0.5))
    with pytest.raises(ValueError, match="features"):
        bsr_linear(torch.randn(3, 32), weight)
    with pytest.raises(ValueError, match="dtype"):
        bsr_linear(torch.randn(3, 64, dtype=torch.float16), weight)


@pytest.fixture()
def layer():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    mask = random_mask(3, 4, 0.5)
    mask[1] = False
    return linear, mask, BlockSparseLinear.from_linear(linear, mask, 32)


@pytest.mark.parametrize("impl", IMPLS["cpu"])
def test_module_cpu_paths_match_the_reference(layer, impl):
    linear, mask, module = layer
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)
    for x in (torch.randn(197, 128), torch.randn(2, 7, 128)):
        with torch.no_grad():
            ref = F.linear(x, linear.weight * expanded, linear.bias)
            torch.testing.assert_close(module.forward_with(x, impl), ref, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(module.forward_with(x, impl), linear(x), atol=1e-2)


@needs_triton
def test_module_triton_path_matches_the_reference(layer):
    """The path CUDA runs by default (here under the interpreter on the CPU, or on CUDA)."""
    linear, mask, module = layer
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        ref = F.linear(x, linear.weight * expanded, linear.bias)
        got = module.to(DEVICE).forward_with(x.to(DEVICE), "triton").cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_module_without_bias_and_state_round_trip(layer):
    linear, mask, _ = layer
    linear.bias = None
    module = BlockSparseLinear.from_linear(linear, mask, 32)
    state = module.state_dict()
    assert set(state) == {"blocks", "col_indices", "row_offsets", "shape"}
    rebuilt = BlockSparseLinear(BsrWeight.from_state(state), impl={"cpu": "gather"})
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), bsr_linear_reference(x, module.weight), rtol=1e-5, atol=1e-5)


def test_module_calibrate_records_the_fastest_path(layer):
    _, _, module = layer
    assert module.impl == {"cpu": "dense", "cuda": "triton"}  # before calibration
    x = torch.randn(197, 128)
    timings = module.calibrate(x, warmup=1, repeats=3, margin=0.0)
    assert set(timings) == set(IMPLS["cpu"])
    assert module.impl["cpu"] == min(timings, key=lambda impl: timings[impl].median_ms)
    assert module.impl["cuda"] == "triton"  # a CPU example decides the CPU's path only
    assert f"cpu={module.impl['cpu']}" in repr(module)
    module.calibrate(x, warmup=0, repeats=1, margin=1.0)  # nothing is 100% faster than dense
    assert module.impl["cpu"] == "dense"


def test_module_refuses_an_implementation_its_device_lacks(layer):
    _, _, module = layer
    with pytest.raises(ValueError, match="no implementation 'gather' on 'cuda'"):
        BlockSparseLinear(module.weight, impl={"cuda": "gather"})
    with pytest.raises(ValueError, match="no implementation 'dense' on 'tpu'"):
        BlockSparseLinear(module.weight, impl={"tpu": "dense"})
    with pytest.raises(ValueError, match="nothing to calibrate on 'meta'"):
        module.calibrate(torch.empty(4, 128, device="meta"))


def test_module_calibrate_leaves_out_unsupported_paths(layer):
    _, _, module = layer
    x = torch.randn(9, 128, dtype=torch.float16)
    timings = module.half().calibrate(x, warmup=0, repeats=1)
    try:  # PyTorch's CPU BSR matmul has no fp16 (torch 2.x)
        module.forward_with(x, "torch_bsr")
        supported = True
    except RuntimeError:
        supported = False
    assert "dense" in timings and ("torch_bsr" in timings) == supported and module.impl["cpu"] in timings


@pytest.mark.parametrize("impl", IMPLS["cpu"])
def test_module_sees_new_weights_after_load_state_dict(layer, impl):
    _, _, module = layer
    module.impl["cpu"] = impl
    x = torch.randn(4, 128)
    with torch.no_grad():
        module(x)  # builds the cached operand
        state = module.state_dict()
        state["blocks"] = torch.randn_like(state["blocks"])
        module.load_state_dict(state)
        torch.testing.assert_close(module(x), bsr_linear_reference(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available("cuda"), reason="needs CUDA and Triton")
def test_module_runs_the_kernel_on_cuda(layer):
    _, _, module = layer
    module = module.cuda().half()
    x = torch.randn(2, 197, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), bsr_linear_reference(x, module.weight, module.bias), rtol=1e-2, atol=1e-2)


def test_bench_masks_and_summary():
    from hwnas.bench.kernels import block_mask, summary

    mask = block_mask(24, 24, 0.75, seed=3)
    assert int((~mask).sum()) == 432 and torch.equal(mask, block_mask(24, 24, 0.75, seed=3))
    case = {"shape": [197, 768, 768], "batch": 1, "dtype": "float16", "sparsity": 0.75, "block": 32}
    timing = {"min_ms": 0.0, "max_ms": 0.0, "repeats": 1}
    rows = [
        {"case": case, "impl": "dense", "median_ms": 2.0, **timing},
        {"case": case, "impl": "hwnas", "median_ms": 1.0, **timing, "metrics": {"torch_bsr_skipped": "unsupported"}},
    ]
    table = summary(rows)
    assert table.row_count == 1 and "unsupported" in table.caption
    assert [next(iter(column.cells)) for column in table.columns][-3:] == ["triton", "2.00x", "n/a"]
