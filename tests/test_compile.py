"""torch.compile takes a pruned model whole: token cuts, window pruning and block-sparse layers, matching eager."""

import pytest
import timm
import torch
from torch import nn

from hwnas.models.digits import build_digits_arch
from hwnas.pruning.block_layers import to_block_sparse_layers
from hwnas.pruning.tokens import apply_token_keep
from hwnas.pruning.windows import apply_window_ratios

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


def assert_one_graph_matching_eager(model: nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    with torch.inference_mode():  # how a deployed model runs; it failed to compile, or compiled wrong, here
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        got = torch.compile(model)(x)
    assert explanation.graph_count == 1, [reason.reason for reason in explanation.break_reasons]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ONE_GRAPH_METHODS)
def test_a_compiled_pruned_vit_is_one_graph_and_matches_eager(method):
    assert_one_graph_matching_eager(pruned_vit(method), torch.randn(2, 3, 32, 32))


def test_a_compiled_window_pruned_swin_is_one_graph_and_matches_eager():
    model = apply_window_ratios(build_digits_arch("digits-swin").eval(), {0: 0.5, 1: 0.5, 2: 0.25, 3: 0.25})
    assert_one_graph_matching_eager(model, torch.randn(2, 1, 32, 32))


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
