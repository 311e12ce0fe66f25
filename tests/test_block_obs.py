"""Block OBS pruning: quality against magnitude pruning, exact sparsity, errors, Hessians, the layer database."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from hwnas.errors import HwnasError
from hwnas.pruning.block_obs import (
    DEFAULT_LEVELS,
    LayerDatabase,
    apply_block_sparsity,
    collect_hessians,
    find_linear_layers,
    prune_blocks_magnitude,
    prune_blocks_obs,
)

BLOCK = 8


def correlated_layer(rows: int = 2048, inp: int = 128, out: int = 64, held_out: int = 0):
    """Rows of X = Z·A, with a random mixing A of decaying scale (H far from diagonal and ill-conditioned),
    a weight W and H = 2/n·XᵀX of the first ``rows``; the last ``held_out`` rows are not in H."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(inp, inp, generator=g) / inp**0.5 * torch.logspace(0, -2, inp)[:, None]
    x = torch.randn(rows + held_out, inp, generator=g) @ mixing
    weight = torch.randn(out, inp, generator=g) * 0.05
    calib = x[:rows].double()
    return x, weight, 2 / rows * calib.T @ calib


def rel_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return ((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm()).item()


def blocks(weight: torch.Tensor, b: int) -> torch.Tensor:
    return weight.reshape(weight.shape[0] // b, b, weight.shape[1] // b, b).permute(0, 2, 1, 3)


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()


@pytest.fixture(scope="module")
def vit_and_db():
    model = tiny_vit()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]  # 8 images × 65 tokens ≥ 256 = fc2 in_features
    return model, calib, LayerDatabase.build(model, calib, block=16, progress=False)


def test_obs_reconstructs_much_better_than_magnitude():
    x, weight, hessian = correlated_layer(held_out=2048)
    calib, held_out = x[:2048], x[2048:]
    obs, _ = prune_blocks_obs(weight, hessian, 0.5, BLOCK)
    mag, _ = prune_blocks_magnitude(weight, 0.5, BLOCK)
    errors = {f"{name} {part}": rel_error(rows, weight, w) for name, w in (("OBS", obs), ("magnitude", mag))
              for part, rows in (("calib", calib), ("held-out", held_out))}
    print(f"50% of {BLOCK}x{BLOCK} blocks, relative output error:", errors)
    assert errors["OBS calib"] < 0.7 * errors["magnitude calib"]
    assert errors["OBS held-out"] < 0.7 * errors["magnitude held-out"]


def test_compensation_matches_sequential_least_squares():
    """Each removed block's row error is optimally absorbed by that row's later columns (direct solve)."""
    torch.manual_seed(3)
    x = torch.randn(256, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)
    weight = torch.randn(8, 32, dtype=torch.float64)
    hessian = 2 / 256 * x.T @ x
    pruned, mask = prune_blocks_obs(weight, hessian, 0.25, 4, damp=0.01)
    h = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    ref = weight.clone()
    for c in range(8):
        cols, later = slice(4 * c, 4 * c + 4), slice(4 * c + 4, 32)
        for row in range(8):
            if not mask[row // 4, c]:
                ref[row, later] += torch.linalg.solve(h[later, later], h[later, cols] @ ref[row, cols])
                ref[row, cols] = 0
    torch.testing.assert_close(pruned, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prune", ["obs", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.55, 0.9])
def test_exact_fraction_removed_and_pruned_blocks_zero(prune: str, sparsity: float):
    _, weight, hessian = correlated_layer(rows=512, inp=64, out=48)
    if prune == "obs":
        pruned, mask = prune_blocks_obs(weight, hessian, sparsity, BLOCK)
    else:
        pruned, mask = prune_blocks_magnitude(weight, sparsity, BLOCK)
    assert mask.shape == (48 // BLOCK, 64 // BLOCK) and mask.dtype == torch.bool
    assert int((~mask).sum()) == round(sparsity * mask.numel())
    assert pruned.shape == weight.shape and pruned.dtype == weight.dtype
    assert torch.all(blocks(pruned, BLOCK)[~mask] == 0)
    assert torch.all(blocks(pruned, BLOCK)[mask].abs().sum(dim=(-1, -2)) > 0)


def test_sparsity_zero_is_identity():
    _, weight, hessian = correlated_layer(rows=256, inp=64, out=32)
    for pruned, mask in (prune_blocks_obs(weight, hessian, 0.0, BLOCK), prune_blocks_magnitude(weight, 0.0, BLOCK)):
        assert torch.equal(pruned, weight)
        assert mask.all() and mask.shape == (4, 8)


def test_errors():
    _, weight, hessian = correlated_layer(rows=256, inp=64, out=32)
    with pytest.raises(HwnasError, match=r"block size 12 does not divide weight of shape \[32, 64\]"):
        prune_blocks_obs(weight, hessian, 0.5, 12)
    with pytest.raises(HwnasError, match="block size 12"):
        prune_blocks_magnitude(weight, 0.5, 12)
    for bad in (1.0, -0.1):
        with pytest.raises(HwnasError, match=r"sparsity must be in \[0, 1\)"):
            prune_blocks_obs(weight, hessian, bad, BLOCK)
        with pytest.raises(HwnasError, match=r"sparsity must be in \[0, 1\)"):
            prune_blocks_magnitude(weight, bad, BLOCK)
    with pytest.raises(HwnasError, match="hessian has shape"):
        prune_blocks_obs(weight, hessian[:32, :32], 0.5, BLOCK)


def test_too_few_calibration_rows():
    model = tiny_vit()
    with pytest.raises(HwnasError, match=r"'blocks\.0\.mlp\.fc2' saw 65 calibration rows but needs at least 256.*≥ 4 images"):
        collect_hessians(model, find_linear_layers(model), [torch.randn(1, 3, 32, 32)])
    with pytest.raises(HwnasError, match="needs at least"):
        LayerDatabase.build(model, [torch.randn(1, 3, 32, 32)], block=16, progress=False)


def test_collect_hessians_matches_captured_inputs():
    model = tiny_vit()
    layers = find_linear_layers(model)
    assert list(layers) == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    batches = [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    captured = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda m, args, out, name=name: captured[name].append(args[0].reshape(-1, m.in_features)))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    model.train()
    hessians = collect_hessians(model, layers, batches)
    assert model.training and all(not layer._forward_pre_hooks for layer in layers.values())
    for name, rows in captured.items():
        x = torch.cat(rows).double()
        torch.testing.assert_close(hessians[name], 2 / x.shape[0] * x.T @ x)


def test_database_round_trip(vit_and_db, tmp_path):
    _, _, db = vit_and_db
    assert db.levels == DEFAULT_LEVELS and db.block == 16 and len(db.layer_names) == 8
    loaded = LayerDatabase.load(db.save(tmp_path / "db.safetensors"))
    assert loaded.levels == db.levels and loaded.block == db.block and loaded.shapes == db.shapes
    for name in db.layer_names:
        for level in db.levels:
            weight, mask = db.weight(name, level)
            weight2, mask2 = loaded.weight(name, level)
            assert torch.equal(weight, weight2) and torch.equal(mask, mask2)
            assert int((~mask).sum()) == round(level * mask.numel())
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HwnasError, match="is not a hwnas.block_obs v1 layer database"):
        LayerDatabase.load(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"")
    with pytest.raises(HwnasError, match="cannot read layer database"):
        LayerDatabase.load(tmp_path / "broken.safetensors")


def test_database_matches_direct_pruning(vit_and_db):
    model, calib, db = vit_and_db
    layers = find_linear_layers(model)
    hessians = collect_hessians(model, layers, calib)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2"):
        for level in (0.0, 0.4, 0.9):
            weight, mask = db.weight(name, level)
            direct, direct_mask = prune_blocks_obs(layers[name].weight, hessians[name], level, 16)
            assert torch.equal(mask, direct_mask)
            torch.testing.assert_close(weight, direct.detach())


def test_apply_block_sparsity(vit_and_db):
    model, _, db = vit_and_db
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        same = apply_block_sparsity(model, db, dict.fromkeys(db.layer_names, 0.0))
        assert torch.equal(same(x), dense)
        config = {name: 0.5 for name in db.layer_names}
        pruned = apply_block_sparsity(model, db, config)
        assert not torch.allclose(pruned(x), dense)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    modules = dict(pruned.named_modules())
    assert set(pruned.block_masks) == set(config)
    for name in config:
        weight, mask = db.weight(name, 0.5)
        assert torch.equal(modules[name].weight, weight) and torch.equal(pruned.block_masks[name], mask)
    with pytest.raises(HwnasError, match=r"level 0.25 is not in the database grid; allowed: 0, 0.1, 0.2"):
        apply_block_sparsity(model, db, {"blocks.0.attn.qkv": 0.25})
    with pytest.raises(HwnasError, match="not a linear layer"):
        apply_block_sparsity(model, db, {"blocks.9.attn.qkv": 0.5})


def test_database_records_the_second_order_loss_of_each_level(vit_and_db, tmp_path):
    model, calib, db = vit_and_db
    layers = find_linear_layers(model)
    hessians = collect_hessians(model, layers, calib)
    for name in db.layer_names[:3]:
        dense, h = layers[name].weight.detach().double(), hessians[name]
        deltas = [db.weight(name, level)[0].double() - dense for level in db.levels]
        expected = [0.5 * float((d @ h * d).sum()) for d in deltas]
        assert db.losses[name] == pytest.approx(expected, rel=1e-3, abs=1e-9)
        assert db.output_energy[name] == pytest.approx(0.5 * float((dense @ h * dense).sum()), rel=1e-4)
        assert db.losses[name][0] == 0 and 0 < db.losses[name][1] < db.losses[name][-1]
    loaded = LayerDatabase.load(db.save(tmp_path / "db.safetensors"))
    assert loaded.losses == db.losses and loaded.output_energy == db.output_energy


def test_database_progress_goes_to_stderr(capsys):
    """stdout carries results (the front table, piped to files); progress bars belong on stderr."""
    LayerDatabase.build(tiny_vit(), [torch.randn(4, 3, 32, 32) for _ in range(2)], block=16, progress=True)
    assert capsys.readouterr().out == ""
