"""apply_config: joint block sparsity + token keep on a timm ViT, targets, block sizes, metrics of the result."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from hwnas.errors import HwnasError
from hwnas.evaluators.metrics import count_flops, count_params
from hwnas.kernels.block_sparse import BlockSparseLinear
from hwnas.pruning.apply import apply_config, apply_structure, check_space
from hwnas.pruning.block_pruner import BlockPruner, resolve_targets
from hwnas.spaces import space_from_dict

KINDS = {"qkv": "*.attn.qkv", "proj": "*.attn.proj", "fc1": "*.mlp.fc1", "fc2": "*.mlp.fc2"}
SPACE = {
    "name": "joint",
    "model": {"name": "digits-deit"},
    "dimensions": [
        {"name": "keep", "transform": "token_keep", "targets": [1, 2], "values": [0.5, 1.0], "order": "non_increasing"},
        {"name": "sparsity", "transform": "block_sparsity", "targets": KINDS, "values": [0.0, 0.5, 0.9]},
        {"name": "block", "transform": "block_size", "values": [16, 32]},
    ],
}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=64, depth=3,
                             num_heads=2).eval()


@pytest.fixture(scope="module")
def pruner(vit, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # databases go to a fresh cache
        patch.setenv("HWNAS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield BlockPruner(vit, torch.randn(64, 1, 32, 32))


def config(space, **changes):
    return {**space.identity(), **changes}


def test_identity_is_exactly_the_dense_model(vit, pruner):
    space = space_from_dict(SPACE)
    pruned = apply_config(vit, space, space.identity(), pruner)
    x = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(pruned(x), vit(x))
    assert not any(isinstance(m, BlockSparseLinear) for m in pruned.modules())


@pytest.mark.parametrize("block", [16, 32])
def test_pruned_layers_hold_the_database_weights(vit, pruner, block):
    space = space_from_dict(SPACE)
    pruned = apply_config(vit, space, config(space, **{"sparsity.fc1": 0.5, "sparsity.qkv": 0.9, "block": block}), pruner)
    db = pruner.database(block)
    for name, level in (("blocks.1.mlp.fc1", 0.5), ("blocks.2.attn.qkv", 0.9)):
        layer = pruned.get_submodule(name)
        assert isinstance(layer, BlockSparseLinear) and layer.block == block
        weight, mask = db.weight(name, level)
        assert torch.equal(layer.weight.to_dense(), weight)
        assert mask.float().mean().item() == pytest.approx(1 - level, abs=0.05)
    assert isinstance(pruned.get_submodule("blocks.0.attn.proj"), torch.nn.Linear)  # level 0 stays dense
    assert isinstance(vit.get_submodule("blocks.1.mlp.fc1"), torch.nn.Linear)  # the input is untouched


def test_joint_config_matches_masked_dense_weights_and_counts_fewer_flops(vit, pruner):
    space = space_from_dict(SPACE)
    joint = config(space, **{"keep.1": 0.5, "keep.2": 0.5, "sparsity.fc1": 0.5, "sparsity.fc2": 0.5, "block": 16})
    pruned = apply_config(vit, space, joint, pruner)
    # the same model with plain nn.Linear layers holding the pruned dense weights
    reference = apply_structure(apply_config(vit, space, space.identity(), pruner), space, joint)
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, BlockSparseLinear):
                reference.get_submodule(name).weight.copy_(module.weight.to_dense())
    x = torch.randn(5, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(pruned(x), reference(x), atol=1e-5)
    dense_flops = count_flops(vit, (1, 32, 32))
    assert count_flops(reference, (1, 32, 32)) < dense_flops  # tokens only
    assert count_flops(pruned, (1, 32, 32)) < count_flops(reference, (1, 32, 32))  # and half the MLP blocks
    mlp = sum(m.weight.numel() for n, m in vit.named_modules() if n.endswith(("fc1", "fc2")))
    assert count_params(vit) - count_params(pruned) == pytest.approx(mlp / 2, rel=0.02)


def test_weight_pruning_without_a_pruner_is_an_error(vit):
    space = space_from_dict(SPACE)
    with pytest.raises(HwnasError, match="calibration data"):
        apply_config(vit, space, config(space, **{"sparsity.fc1": 0.5}))


def test_targets_resolve_to_layers(vit):
    assert resolve_targets(vit, "*.mlp.fc1") == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"]
    assert resolve_targets(vit, 1) == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    with pytest.raises(HwnasError, match="matches no qkv/proj/fc1/fc2 layer"):
        resolve_targets(vit, "*.mlp.fc3")


def test_check_space_rejects_block_sizes_that_do_not_divide(vit):
    data = {**SPACE, "dimensions": SPACE["dimensions"][:2] + [{"name": "block", "transform": "block_size",
                                                               "values": [16, 48]}]}
    with pytest.raises(HwnasError, match="block size 48 does not divide"):
        check_space(vit, space_from_dict(data))
    check_space(vit, space_from_dict(SPACE))


@pytest.mark.parametrize("dimension, message", [
    ({"name": "block", "transform": "block_size", "values": ["big"]}, "block sizes must be positive integers"),
    ({"name": "s", "transform": "block_sparsity", "targets": ["*.mlp.fc1"], "values": [0.0, 0.55]},
     "levels must come from the grid"),
])
def test_check_space_rejects_values_no_pruner_can_build(vit, dimension, message):
    data = {**SPACE, "dimensions": SPACE["dimensions"][:1] + [dimension]}
    with pytest.raises(HwnasError, match=message):
        check_space(vit, space_from_dict(data))


def test_spectral_weight_sets_the_ucc_score_and_leaves_other_methods_alone(vit):
    from hwnas.pruning.token_methods import SPECTRAL_WEIGHT
    data = {"name": "tokens", "model": {"name": "digits-deit"}, "dimensions": [
        {"name": "keep", "transform": "token_keep", "targets": [1], "values": [0.5, 1.0]},
        {"name": "tokens", "transform": "token_method", "values": ["ucc", "ucc-blocks", "tome"]},
        {"name": "beta", "transform": "spectral_weight", "values": [0.0, 0.5]}]}
    space = space_from_dict(data)
    check_space(vit, space)
    for method in ("ucc", "ucc-blocks"):
        model = apply_config(vit, space, {"keep.1": 0.5, "tokens": method, "beta": 0.5})
        assert model.blocks.method.name == method and model.blocks.method.spectral_weight == 0.5
    assert apply_config(vit, space, {"keep.1": 0.5, "tokens": "tome", "beta": 0.5}).blocks.method.name == "tome"
    unset = space_from_dict({**data, "dimensions": data["dimensions"][:2]})
    assert apply_config(vit, unset, {"keep.1": 0.5, "tokens": "ucc"}).blocks.method.spectral_weight == SPECTRAL_WEIGHT


@pytest.mark.parametrize("values", [[0.3, 1.5], ["high"], [True]])
def test_check_space_rejects_spectral_weights_outside_0_1(vit, values):
    data = {**SPACE, "dimensions": SPACE["dimensions"][:1] + [
        {"name": "beta", "transform": "spectral_weight", "values": values}]}
    with pytest.raises(HwnasError, match="spectral weights must be numbers in"):
        check_space(vit, space_from_dict(data))
