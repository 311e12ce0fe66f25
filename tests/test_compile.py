"""torch.compile takes a pruned model whole: token cuts and block-sparse layers compile and match eager."""

import pytest
import timm
import torch
from torch import nn

from hwnas.pruning.block_layers import to_block_sparse_layers
from hwnas.pruning.tokens import apply_token_keep

#: the token methods a compiled model traces in one graph (``random`` draws its rows outside the graph)
ONE_GRAPH_METHODS = ("ucc", "tome", "evit")


def pruned_vit(method: str) -> nn.Module:
    """A 16-patch ViT cut by ``method`` at blocks 1 and 2, with block-sparse fc1 layers (about half the blocks kept)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=4).eval()
    apply_token_keep(model, {1: 0.5, 2: 0.25}, method)
    masks = {f"blocks.{i}.mlp.fc1": torch.rand(768 // 16, 192 // 16) < 0.5 for i in range(3)}
    return to_block_sparse_layers(model, masks, block=16)


@pytest.mark.parametrize("method", ONE_GRAPH_METHODS)
def test_a_compiled_pruned_model_is_one_graph_and_matches_eager(method):
    model = pruned_vit(method)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.inference_mode():  # how a deployed model runs; it failed to compile, or compiled wrong, here
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        got = torch.compile(model)(x)
    assert explanation.graph_count == 1, [reason.reason for reason in explanation.break_reasons]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ONE_GRAPH_METHODS)
def test_a_compiled_pruned_model_matches_eager_on_cuda(method):
    """On CUDA eager runs the Triton kernels (token and block-sparse); compiled, the token ops are the compiler's."""
    model = pruned_vit(method).cuda().half()
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.half)
    torch._dynamo.reset()
    with torch.inference_mode():
        expected = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
