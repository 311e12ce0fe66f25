"""Token-keep schedules for timm ViT/DeiT: each block processes only its share of the patch tokens.

A schedule gives, per block, the fraction of the original patch tokens that block processes
(non-increasing along depth). Where block ``l`` keeps fewer tokens than block ``l-1`` produced,
a token method (``token_methods``: ``ucc`` by default, or the ``tome``/``evit``/``random``
baselines) cuts them down, from what the earlier blocks observed. Prefix tokens (class,
distillation, registers) are always kept. Blocks that neither observe nor need a size bias run
as the untouched timm modules, so a schedule of all 1.0 is exactly the timm model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.kernels.class_attention import class_attention
from hwnas.pruning.token_methods import DEFAULT_TOKEN_METHOD, TokenMethod, TokenState, low_pass_basis, token_method


class TokenKeepBlocks(nn.Sequential):
    """Drop-in replacement for ``VisionTransformer.blocks`` that cuts tokens between blocks.

    The children are the original timm blocks, so the state-dict keys stay those of timm. A method that
    scores spectral energy finds the grid's low-pass basis in the buffer ``low_pass`` (not saved: rebuilt
    from the grid), so it follows the model's device and dtype and is a constant under torch.compile.
    """

    def __init__(self, blocks: Sequence[nn.Module], keep_tokens: Sequence[int | None], num_prefix_tokens: int,
                 grid: tuple[int, int], method: TokenMethod):
        super().__init__(*blocks)
        self.num_prefix_tokens = num_prefix_tokens
        self.method = method
        self.register_buffer("low_pass", low_pass_basis(*grid).clone() if method.needs_low_pass else None,
                             persistent=False)
        # where the token count actually drops
        self.prune_to: list[int | None] = []
        current = None
        for keep in keep_tokens:
            prunes = keep is not None and (current is None or keep < current)
            self.prune_to.append(keep if prunes else None)
            current = keep if prunes else current
        cuts = [i for i, keep in enumerate(self.prune_to) if keep is not None]
        if not (method.needs_attention or method.needs_keys):
            self.observes = [False] * len(self.prune_to)
        elif method.accumulates:
            self.observes = [i < cuts[-1] for i in range(len(self.prune_to))]
        else:
            self.observes = [i + 1 in cuts for i in range(len(self.prune_to))]
        # keys serve the merge at the next cut only, so only the block just before a cut returns them
        self.returns_keys = [method.needs_keys and i + 1 in cuts for i in range(len(self.prune_to))]
        self.size_bias = [method.proportional and i >= cuts[0] for i in range(len(self.prune_to))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = TokenState(x=x, prefix=self.num_prefix_tokens, low_pass=self.low_pass)
        log_size = None  # the proportional-attention bias from the first cut on: the sizes change at the cuts only
        for block, keep, observes, returns_keys, size_bias in zip(self, self.prune_to, self.observes, self.returns_keys,
                                                                  self.size_bias):
            if keep is not None:
                state = self.method.reduce(state, keep)
                log_size = log_sizes(state.size, self.num_prefix_tokens, x.dtype) if size_bias else None
            if observes or size_bias:
                want_attention = observes and self.method.needs_attention
                running = self.method.running_attention(state) if want_attention else None
                out, attention, keys = observed_block(
                    block, state.x, self.num_prefix_tokens, log_size, want_attention=want_attention,
                    want_keys=returns_keys, attention_into=running, use_triton=self.method.use_triton)
                state = self.method.observe(state, attention, keys) if observes else state
                state = replace(state, x=out)
            else:
                state = replace(state, x=block(state.x))
        return state.x


def log_sizes(size: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The proportional-attention bias ``[B, T]`` in ``dtype``: ``log size`` of each patch token
    (``size [B, N]``), 0 for the prefix tokens (they stand for themselves)."""
    return F.pad(size.log(), (num_prefix_tokens, 0)).to(dtype)


def observed_block(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int, log_size: torch.Tensor | None = None,
                   want_attention: bool = False, want_keys: bool = False, attention_into: torch.Tensor | None = None,
                   use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run a timm ``Block``, optionally with proportional attention, and return what it saw.

    ``log_size [B, T]`` (``log_sizes``: how many patches each token stands for) is added to the
    attention logits of every key. Returns the block output, the class token's attention to each patch
    token averaged over heads ``[B, N]`` (or None) and the patch tokens' keys averaged over heads
    ``[B, N, head_dim]`` (or None). With ``attention_into [B, N]`` (a running sum) the attention
    is added to it in place, and it is what is returned. ``use_triton`` is the class-attention
    kernel's switch (``hwnas.kernels.class_attention``).
    """
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if log_size is None else log_size.to(q.dtype)[:, None, None, :]
    attention = (class_attention(q, k, attn.scale, log_size, use_triton, skip=num_prefix_tokens, out=attention_into)
                 if want_attention else None)
    keys = k.mean(dim=1)[:, num_prefix_tokens:] if want_keys else None
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, attention, keys


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


def apply_token_keep(model: nn.Module, keep: dict[int, float], method: str | TokenMethod = DEFAULT_TOKEN_METHOD
                     ) -> nn.Module:
    """Install a token-keep schedule cut by ``method`` on a timm VisionTransformer, in place; returns the model."""
    counts = keep_counts(model, keep)
    method = token_method(method) if isinstance(method, str) else method
    if any(c is not None for c in counts):
        grid = tuple(model.patch_embed.grid_size)
        model.blocks = TokenKeepBlocks(list(model.blocks), counts, model.num_prefix_tokens, grid, method)
    return model


def _check_vit(model: nn.Module) -> None:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise HwnasError(f"token_keep needs a timm VisionTransformer/DeiT; got {type(model).__name__}")
    if not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise HwnasError(f"token_keep needs timm ViT blocks with attn.qkv; {type(model).__name__} has others")
