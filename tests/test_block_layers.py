"""Block-sparse kernel layers swapped into a ViT: same logits as the dense masked weights, on every CPU path."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from hwnas.errors import HwnasError
from hwnas.kernels.block_sparse import IMPLS, BlockSparseLinear
from hwnas.pruning.block_layers import calibrate_block_sparse, forced_impl, to_block_sparse_layers
from hwnas.pruning.block_obs import find_linear_layers

BLOCK = 16


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2).eval()


def masked(model: VisionTransformer, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero random blocks of every qkv/proj/fc1/fc2 weight in place; return the masks (True = kept)."""
    gen = torch.Generator().manual_seed(1)
    masks = {}
    with torch.no_grad():
        for name, linear in find_linear_layers(model).items():
            grid = (linear.out_features // BLOCK, linear.in_features // BLOCK)
            masks[name] = torch.rand(grid, generator=gen) >= sparsity
            linear.weight.mul_(masks[name].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1))
    return masks


@pytest.fixture(scope="module")
def pair():
    """(dense model with masked weights, input, its logits, masks)."""
    model = tiny_vit()
    masks = masked(model)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model, x, model(x), masks


def converted(pair) -> torch.nn.Module:
    model, _, _, masks = pair
    sparse = tiny_vit()
    sparse.load_state_dict(model.state_dict())
    return to_block_sparse_layers(sparse, masks, BLOCK)


def test_layers_are_replaced(pair):
    model = converted(pair)
    kernels = {n for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    assert kernels == set(pair[3]) and len(kernels) == 8
    assert all(torch.equal(model.get_submodule(n).weight.block_mask(), pair[3][n]) for n in kernels)


@pytest.mark.parametrize("impl", IMPLS["cpu"])
def test_logits_match_every_cpu_impl(pair, impl):
    _, x, reference, _ = pair
    model = converted(pair)
    calibrated = calibrate_block_sparse(model, x, warmup=0, repeats=1)
    with forced_impl(model, impl), torch.no_grad():
        assert {m.impl["cpu"] for m in model.modules() if isinstance(m, BlockSparseLinear)} == {impl}
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-5)
    assert {n: model.get_submodule(n).impl["cpu"] for n in calibrated} == calibrated  # restored


def test_logits_match_after_calibration(pair):
    _, x, reference, masks = pair
    model = converted(pair)
    chosen = calibrate_block_sparse(model, x, warmup=1, repeats=2)
    assert set(chosen) == set(masks) and set(chosen.values()) <= set(IMPLS["cpu"])
    assert all(model.get_submodule(n).impl["cpu"] == impl for n, impl in chosen.items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel)")
def test_logits_match_on_cuda(pair):
    _, x, reference, _ = pair
    model = converted(pair).cuda()
    for impl in IMPLS["cuda"]:
        with forced_impl(model, impl), torch.no_grad():
            torch.testing.assert_close(model(x.cuda()).cpu(), reference, rtol=0, atol=1e-4)
    chosen = calibrate_block_sparse(model, x.cuda(), warmup=1, repeats=3)
    assert set(chosen) == set(pair[3]) and set(chosen.values()) <= set(IMPLS["cuda"])
    assert all(model.get_submodule(n).impl == {"cpu": "dense", "cuda": impl} for n, impl in chosen.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x.cuda()).cpu(), reference, rtol=0, atol=1e-4)


def test_bad_names_leave_the_model_unchanged(pair):
    masks = pair[3]
    model = converted(pair)  # the converted layers are no longer nn.Linear
    with pytest.raises(HwnasError, match="'blocks.0.attn.qkv' is not a linear layer"):
        to_block_sparse_layers(model, {"blocks.0.attn.qkv": masks["blocks.0.attn.qkv"]}, BLOCK)
    model = tiny_vit()
    bad = {"blocks.0.mlp.fc1": masks["blocks.0.mlp.fc1"], "blocks.1.nope": masks["blocks.1.mlp.fc1"]}
    with pytest.raises(HwnasError, match="'blocks.1.nope' is not a linear layer.*no such module"):
        to_block_sparse_layers(model, bad, BLOCK)
    with pytest.raises(HwnasError, match="'blocks.0.norm1' is not a linear layer.*LayerNorm"):
        to_block_sparse_layers(model, {"blocks.0.norm1": masks["blocks.0.mlp.fc1"]}, BLOCK)
    with pytest.raises(HwnasError, match="layer 'blocks.0.mlp.fc1'.*does not match"):
        to_block_sparse_layers(model, {"blocks.0.mlp.fc1": masks["blocks.0.mlp.fc2"]}, BLOCK)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())
