"""Window activation pruning for timm Swin Transformers (SparseViT).

Each Swin block gets a window ratio r: it runs LayerNorm, windowed attention and the MLP on its
``max(1, round((1 - r) * windows))`` most active windows only and copies the others through.
Activity is the L2 norm of each token's features, computed once when a stage starts and reused
by every block of the stage, so blocks of a stage rank windows consistently; a block sums the
token norms over each of its windows (shifted windows included).

A block works on a flat ``[B, H*W, C]`` view: a per-block table maps each window to its token
rows, with the cyclic shift folded in, so gathering the kept windows *is* the shift and the
window partition, and scattering them back is the reverse (``hwnas.kernels.gather_rows`` /
``scatter_rows_``: Triton on CUDA, torch indexing on the CPU). Selection is per image. A block
with ratio 0 runs as the untouched timm block, so all-zero ratios are exactly the timm model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.models.swin_transformer import SwinTransformerBlock, window_partition
from torch import nn

from hwnas.errors import HwnasError
from hwnas.kernels.gather_scatter import gather_rows, scatter_rows_


class WindowSparseBlocks(nn.Sequential):
    """Drop-in replacement for a Swin stage's ``blocks``: scores tokens once, prunes windows per block.

    The children are the original timm blocks, so the state-dict keys stay those of timm.
    """

    def __init__(self, blocks: Sequence[SwinTransformerBlock], ratios: Sequence[float]):
        super().__init__(*blocks)
        self.ratios = [float(r) for r in ratios]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token_norms = x.detach().float().norm(dim=-1)  # [B, H, W], once per stage
        for block, ratio in zip(self, self.ratios):
            if ratio > 0:
                x = window_sparse_forward(block, x, token_norms, keep_windows(window_count(block), ratio))
            else:
                x = block(x)
        return x


def window_count(block: SwinTransformerBlock) -> int:
    height, width = block.input_resolution
    return (height // block.window_size[0]) * (width // block.window_size[1])


def keep_windows(windows: int, ratio: float) -> int:
    """Windows a block with window ratio ``ratio`` runs on (at least one)."""
    return max(1, round((1.0 - ratio) * windows))


def window_sparse_forward(block: SwinTransformerBlock, x: torch.Tensor, token_norms: torch.Tensor,
                          keep: int) -> torch.Tensor:
    """One Swin block on the ``keep`` windows with the largest summed ``token_norms``, per image.

    ``x`` is ``[B, H, W, C]``; the result has the same shape, pruned windows holding their input.
    """
    batch, height, width, channels = x.shape
    table = _window_rows(block, height, width, x.device)  # [windows, N]
    tokens = table.shape[1]
    window_scores = token_norms.reshape(batch, -1)[:, table].sum(-1)  # [B, windows]
    kept = window_scores.topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep]
    rows = table[kept].reshape(batch, keep * tokens)
    flat = x.reshape(batch, height * width, channels)
    windows = gather_rows(flat, rows).reshape(batch * keep, tokens, channels)
    mask = block.attn_mask if block.attn_mask is not None else block.get_attn_mask(x)
    if mask is not None:  # shifted windows: each kept window brings its own mask
        mask = mask.to(x.dtype)[kept].reshape(batch * keep, tokens, tokens)
    windows = windows + block.drop_path1(block.attn(block.norm1(windows), mask=mask))
    windows = windows + block.drop_path2(block.mlp(block.norm2(windows)))
    out = scatter_rows_(flat.clone(), rows, windows.reshape(batch, keep * tokens, channels))
    return out.reshape(batch, height, width, channels)


def _window_rows(block: SwinTransformerBlock, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[windows, N]`` token rows of each (shifted) window, in timm's window order; cached per size."""
    cache = block.__dict__.setdefault("_hwnas_window_rows", {})
    key = (height, width, str(device))
    if key not in cache:
        if height % block.window_size[0] or width % block.window_size[1]:
            raise HwnasError(f"window pruning needs feature maps divisible by the window size: "
                             f"{height}x{width} with windows of {block.window_size}")
        index = torch.arange(height * width, device=device).reshape(1, height, width, 1)
        if any(block.shift_size):
            index = torch.roll(index, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
        cache[key] = window_partition(index, block.window_size).reshape(-1, block.window_area)
    return cache[key]


def swin_blocks(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, block-in-stage) of every Swin block, in depth order (the global block index)."""
    layers = getattr(model, "layers", None)
    if layers is None or not all(isinstance(b, SwinTransformerBlock) for s in layers for b in s.blocks):
        raise HwnasError(f"window_ratio needs a timm SwinTransformer; got {type(model).__name__}")
    return [(s, b) for s, stage in enumerate(layers) for b in range(len(stage.blocks))]


def stage_targets(model: nn.Module) -> list[list[int]]:
    """The global block indices of each stage, in order (the stages of a non-decreasing ratio order)."""
    stages: dict[int, list[int]] = {}
    for target, (stage, _) in enumerate(swin_blocks(model)):
        stages.setdefault(stage, []).append(target)
    return list(stages.values())


def stage_ratios(model: nn.Module, ratios: dict[int, float]) -> list[list[float]]:
    """Per stage, the ratio of each block (0 where ``ratios`` names none); validates targets and values."""
    where = swin_blocks(model)
    per_stage = [[0.0] * len(stage.blocks) for stage in model.layers]
    for target, ratio in ratios.items():
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < len(where):
            raise HwnasError(f"window_ratio target {target!r} is not a block index of this Swin "
                             f"(0..{len(where) - 1}, counted across stages)")
        if not 0.0 <= ratio < 1.0:
            raise HwnasError(f"window_ratio {ratio} at block {target} must be in [0, 1)")
        stage, index = where[target]
        per_stage[stage][index] = float(ratio)
        block = model.layers[stage].blocks[index]
        height, width = block.input_resolution
        if ratio > 0 and (height % block.window_size[0] or width % block.window_size[1]):
            raise HwnasError(f"window_ratio target {target}: its {height}x{width} feature map is not divisible "
                             f"by the window size {block.window_size}, so it cannot skip whole windows")
    return per_stage


def apply_window_ratios(model: nn.Module, ratios: dict[int, float]) -> nn.Module:
    """Install per-block window ratios on a timm SwinTransformer, in place; returns the model."""
    per_stage = stage_ratios(model, ratios)
    for stage, stage_values in zip(model.layers, per_stage):
        blocks = list(stage.blocks)
        if any(stage_values):
            stage.blocks = WindowSparseBlocks(blocks, stage_values)
        elif isinstance(stage.blocks, WindowSparseBlocks):
            stage.blocks = nn.Sequential(*blocks)
    return model


def window_sparsity(model: nn.Module, ratios: dict[int, float]) -> float:
    """Fraction of all (block, window) computations the ratios skip — the effective window sparsity."""
    where = swin_blocks(model)
    total = skipped = 0
    for target, (stage, index) in enumerate(where):
        windows = window_count(model.layers[stage].blocks[index])
        total += windows
        skipped += windows - keep_windows(windows, ratios.get(target, 0.0))
    return skipped / total
