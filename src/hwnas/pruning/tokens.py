"""Token-keep schedules for timm ViT/DeiT: each block processes only the best-scoring patch tokens.

A schedule gives, per block, the fraction of the original patch tokens that block processes
(non-increasing along depth). When block ``l`` keeps fewer tokens than block ``l-1`` produced,
the tokens are ranked by the attention the class token paid them in block ``l-1`` (averaged
over heads), the best are kept in their original order, and the rest are dropped. Prefix tokens
(class, distillation, registers) are always kept. Blocks that neither prune nor score run as
the untouched timm modules, so a schedule of all 1.0 is exactly the timm model.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError


class TokenKeepBlocks(nn.Sequential):
    """Drop-in replacement for ``VisionTransformer.blocks`` that prunes tokens between blocks.

    The children are the original timm blocks, so the state-dict keys stay those of timm.
    """

    def __init__(self, blocks: Sequence[nn.Module], keep_tokens: Sequence[int | None], num_prefix_tokens: int):
        super().__init__(*blocks)
        self.keep_tokens = list(keep_tokens)
        self.num_prefix_tokens = num_prefix_tokens
        # where the token count actually drops, and so which blocks must score tokens for the next
        self.prune_to: list[int | None] = []
        current = None
        for keep in self.keep_tokens:
            prunes = keep is not None and (current is None or keep < current)
            self.prune_to.append(keep if prunes else None)
            current = keep if prunes else current
        self.scores_for_next = [k is not None for k in self.prune_to[1:]] + [False]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = None
        for block, keep, score in zip(self, self.prune_to, self.scores_for_next):
            if keep is not None:
                x = keep_top_tokens(x, scores, keep, self.num_prefix_tokens)
            if score:
                x, scores = block_with_cls_attention(block, x, self.num_prefix_tokens)
            else:
                x = block(x)
        return x


def keep_top_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix_tokens: int) -> torch.Tensor:
    """Keep the prefix tokens and the ``keep`` patch tokens with the highest ``scores`` (order preserved)."""
    index = scores.topk(keep, dim=1).indices.sort(dim=1).values + num_prefix_tokens
    kept = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix_tokens], kept], dim=1)


def block_with_cls_attention(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ``Block`` and also return the class token's attention to each patch token [B, N - prefix]."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)
    cls_attn = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, N]
    scores = cls_attn.mean(dim=1)[:, 0, num_prefix_tokens:]
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, scores


def keep_counts(model: nn.Module, keep: dict[int, float]) -> list[int | None]:
    """Per block, the number of patch tokens it processes (None where it keeps everything)."""
    _check_vit(model)
    depth = len(model.blocks)
    num_patches = model.patch_embed.num_patches
    counts: list[int | None] = [None] * depth
    for block, ratio in keep.items():
        if not isinstance(block, int) or not 0 <= block < depth:
            raise HwnasError(f"token_keep target {block!r} is not a block index of this model (0..{depth - 1})")
        if not 0.0 < ratio <= 1.0:
            raise HwnasError(f"token_keep ratio {ratio} at block {block} must be in (0, 1]")
        if ratio < 1.0:
            if block == 0:
                raise HwnasError("token_keep target 0: block 0 has no earlier attention to rank tokens; "
                                 f"prune at blocks 1..{depth - 1}")
            counts[block] = max(1, round(ratio * num_patches))
    return counts


def apply_token_keep(model: nn.Module, keep: dict[int, float]) -> nn.Module:
    """Install a token-keep schedule on a timm VisionTransformer, in place; returns the model."""
    counts = keep_counts(model, keep)
    if any(c is not None for c in counts):
        model.blocks = TokenKeepBlocks(list(model.blocks), counts, model.num_prefix_tokens)
    return model


def _check_vit(model: nn.Module) -> None:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise HwnasError(f"token_keep needs a timm VisionTransformer/DeiT; got {type(model).__name__}")
    if not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise HwnasError(f"token_keep needs timm ViT blocks with attn.qkv; {type(model).__name__} has others")
