"""Token-keep schedules on timm ViTs: identity at 1.0, the right tokens kept, the right counts, errors."""

import copy

import pytest
import timm
import torch

from hwnas.errors import HwnasError
from hwnas.pruning.tokens import apply_token_keep, block_with_cls_attention, keep_counts, keep_top_tokens


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()


def test_all_ones_is_exactly_timm(vit):
    x = torch.randn(2, 3, 64, 64)
    pruned = apply_token_keep(copy.deepcopy(vit), {b: 1.0 for b in range(1, len(vit.blocks))})
    with torch.inference_mode():
        assert torch.equal(vit(x), pruned(x))
    assert type(pruned.blocks) is type(vit.blocks)


def test_blocks_process_the_scheduled_token_counts(vit):
    schedule = {2: 0.5, 3: 0.5, 5: 0.25}
    assert keep_counts(vit, schedule) == [None, None, 8, 8, None, 4] + [None] * 6
    pruned = apply_token_keep(copy.deepcopy(vit), schedule)
    assert pruned.blocks.prune_to[:6] == [None, None, 8, None, None, 4]
    assert pruned.blocks.scores_for_next[:6] == [False, True, False, False, True, False]
    seen = []
    for block in pruned.blocks:  # norm1 sees every block's input, whichever path runs the block
        block.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.inference_mode():
        out = pruned(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 10)
    assert seen == [17, 17, 9, 9, 9] + [5] * 7  # 16 patches + class token


def test_keep_top_tokens_picks_highest_scores_in_order():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)  # token i has value i (+5 for image 1)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8], [0.5, 0.1, 0.2, 0.7]])  # over the 4 patch tokens
    kept = keep_top_tokens(x, scores, keep=2, num_prefix_tokens=1)
    assert kept[0, :, 0].tolist() == [0, 2, 4]   # cls, patches 1 and 3 (scores 0.9, 0.8), original order
    assert kept[1, :, 0].tolist() == [5, 6, 9]   # cls, patches 0 and 3


def test_scoring_block_matches_timm_and_explicit_attention(vit):
    block = vit.blocks[1]
    x = torch.randn(2, 17, vit.embed_dim)
    with torch.inference_mode():
        out, scores = block_with_cls_attention(block, x, num_prefix_tokens=1)
        assert torch.allclose(out, block(x), atol=1e-5)
        attn = block.attn
        h = block.norm1(x)
        q, k, _ = attn.qkv(h).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)  # [B, H, N, N]
        expected = probs[:, :, 0, 1:].mean(1)
    assert torch.allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("keep, message", [
    ({0: 0.5}, "block 0 has no earlier attention"),
    ({12: 0.5}, "not a block index"),
    ({3: 1.5}, "must be in \\(0, 1\\]"),
])
def test_bad_schedules(vit, keep, message):
    with pytest.raises(HwnasError, match=message):
        apply_token_keep(copy.deepcopy(vit), keep)


def test_rejects_non_vit():
    with pytest.raises(HwnasError, match="needs a timm VisionTransformer"):
        apply_token_keep(torch.nn.Linear(2, 2), {1: 0.5})
