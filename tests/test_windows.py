"""Window activation pruning for Swin (SparseViT): parity with timm, pass-through, selection, space."""

import copy

import pytest
import timm
import torch
from torch import nn

from hwnas.errors import HwnasError
from hwnas.models.digits import build_digits_arch
from hwnas.pruning.apply import apply_config
from hwnas.pruning.block_pruner import BlockPruner
from hwnas.pruning.window_adaptation import RATIO_GRID, random_window_ratios
from hwnas.pruning.windows import (WindowSparseBlocks, apply_window_ratios, keep_windows, swin_blocks,
                                   window_count, window_sparse_forward, window_sparsity)
from hwnas.spaces import load_space


def _swin_tiny(img_size: int = 224) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=img_size).eval()


def _all_windows_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model with every block on the window path, keeping every window."""
    for stage in model.layers:
        blocks = list(stage.blocks)

        class AllWindows(nn.Sequential):
            def forward(self, h):
                norms = h.float().norm(dim=-1)
                for block in self:
                    h = window_sparse_forward(block, h, norms, window_count(block))
                return h

        stage.blocks = AllWindows(*blocks)
    return model(x)


@torch.inference_mode()
@pytest.mark.parametrize("make", [lambda: build_digits_arch("digits-swin").eval(), _swin_tiny],
                         ids=["digits-swin", "swin_tiny"])
def test_window_path_keeping_every_window_equals_timm(make):
    model = make()
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, model.patch_embed.proj.in_channels, size, size)
    reference = model(x)
    assert any(any(b.shift_size) for s in model.layers for b in s.blocks)  # shifted windows are covered
    assert (_all_windows_forward(copy.deepcopy(model), x) - reference).abs().max() <= 1e-5
    zeros = apply_window_ratios(copy.deepcopy(model), {t: 0.0 for t in range(len(swin_blocks(model)))})
    assert torch.equal(zeros(x), reference)


@torch.inference_mode()
def test_pruned_windows_pass_through_and_the_most_active_run():
    model = build_digits_arch("digits-swin").eval()
    block = model.layers[0].blocks[1]  # a shifted block: 16 windows of 4x4 tokens on a 16x16 map
    assert any(block.shift_size)
    x = torch.randn(1, 16, 16, block.dim) * 0.1
    norms = x.float().norm(dim=-1)
    norms[0, 5, 9] = 100.0  # one very active token decides its (shifted) window
    out = window_sparse_forward(block, x, norms, keep=1)
    changed = (out != x).any(dim=-1)[0]
    assert int(changed.sum()) == 16  # exactly one window of 16 tokens ran
    assert changed[5, 9]
    full = block(x)  # the kept window's tokens hold what the timm block computes there
    assert torch.allclose(out[0][changed], full[0][changed], atol=1e-5)


@torch.inference_mode()
def test_selection_is_per_image():
    model = build_digits_arch("digits-swin").eval()
    torch.manual_seed(0)
    model.patch_embed.norm.weight.uniform_(0.5, 2.0)  # untrained LayerNorms give every token the same norm
    model = apply_window_ratios(model, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.75})
    x = torch.randn(3, 1, 32, 32)
    batched = model(x)
    single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_ratios_change_the_model_and_count_skipped_windows():
    model = build_digits_arch("digits-swin").eval()
    ratios = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}
    pruned = apply_window_ratios(copy.deepcopy(model), ratios)
    assert isinstance(pruned.layers[0].blocks, WindowSparseBlocks)
    assert pruned.layers[0].blocks.ratios == [0.5, 0.5] and not isinstance(pruned.layers[2].blocks, WindowSparseBlocks)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(pruned(x), model(x))
    # stage 1: 2 blocks x 16 windows, 8 skipped each; stage 2: 2 x 4, 2 skipped each; stage 3: 2 x 1
    assert window_sparsity(model, ratios) == pytest.approx((8 + 8 + 2 + 2) / (32 + 8 + 2))
    assert keep_windows(1, 0.8) == 1 and keep_windows(16, 0.8) == 3


def test_bad_targets_and_ratios_are_one_line_errors():
    model = build_digits_arch("digits-swin").eval()
    with pytest.raises(HwnasError, match="not a block index"):
        apply_window_ratios(model, {6: 0.5})
    with pytest.raises(HwnasError, match=r"in \[0, 1\)"):
        apply_window_ratios(model, {0: 1.0})
    with pytest.raises(HwnasError, match="needs a timm SwinTransformer"):
        apply_window_ratios(build_digits_arch("digits-deit"), {0: 0.5})


def test_window_space_repairs_order_inside_each_stage():
    space = load_space("swin-windows")
    config = space.validate({"ratio.0": 0.6, "ratio.1": 0.2, "ratio.2": 0.8, "ratio.3": 0.1})
    assert config == {"ratio.0": 0.2, "ratio.1": 0.6, "ratio.2": 0.1, "ratio.3": 0.8}
    low, high = space.bounds()
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        vector = [int(torch.randint(int(h) + 1, (1,), generator=rng)) for h in high]
        decoded = space.decode(vector)
        assert decoded["ratio.0"] <= decoded["ratio.1"] and decoded["ratio.2"] <= decoded["ratio.3"]


def test_adaptation_draws_valid_configurations():
    model = build_digits_arch("digits-swin")
    generator = torch.Generator().manual_seed(0)
    draws = [random_window_ratios(model, generator) for _ in range(50)]
    for ratios in draws:
        assert set(ratios) == set(range(6)) and all(r in RATIO_GRID for r in ratios.values())
        assert ratios[0] <= ratios[1] and ratios[2] <= ratios[3] and ratios[4] <= ratios[5]
    assert len({tuple(r.values()) for r in draws}) > 40  # random, not a fixed schedule


def test_window_ratios_compose_with_block_sparsity():
    model = build_digits_arch("digits-swin").eval()
    space = load_space({
        "name": "joint", "model": {"name": "digits-swin"},
        "dimensions": [
            {"name": "ratio", "transform": "window_ratio", "targets": [0, 1], "values": [0.0, 0.5],
             "order": "non_decreasing"},
            {"name": "sparsity", "transform": "block_sparsity", "targets": {"fc1": "*.mlp.fc1"},
             "values": [0.0, 0.5]},
            {"name": "block", "transform": "block_size", "values": [16]}]})
    calib = torch.randn(32, 1, 32, 32)
    pruned = apply_config(model, space, {"ratio.0": 0.5, "ratio.1": 0.5, "sparsity.fc1": 0.5, "block": 16},
                          BlockPruner(model, calib))
    assert isinstance(pruned.layers[0].blocks, WindowSparseBlocks)
    kinds = {type(m).__name__ for m in pruned.modules()}
    assert "BlockSparseLinear" in kinds
    with torch.inference_mode():
        assert torch.isfinite(pruned(calib[:4])).all()
