"""Sparsity-aware adaptation (SparseViT): fine-tune a Swin so one model serves every window configuration.

Each training step runs a random valid configuration of window ratios — per block a value of
the grid, non-decreasing inside each stage — so the weights learn to work with any subset of
windows. The adapted model then ranks search candidates reliably without per-candidate
fine-tuning. ``train_step_hook`` plugs the sampling into any training loop.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from hwnas.pruning.windows import apply_window_ratios, stage_targets

#: SparseViT's grid of window ratios
RATIO_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def random_window_ratios(model: nn.Module, generator: torch.Generator,
                         grid: Sequence[float] = RATIO_GRID) -> dict[int, float]:
    """A random valid configuration: per block a ratio from ``grid``, non-decreasing inside each stage."""
    stages = stage_targets(model)
    draws = torch.randint(len(grid), (sum(map(len, stages)),), generator=generator).tolist()
    ratios: dict[int, float] = {}
    for targets in stages:
        for target, index in zip(targets, sorted(draws[t] for t in targets)):
            ratios[target] = float(grid[index])
    return ratios


def train_step_hook(model: nn.Module, generator: torch.Generator,
                    grid: Sequence[float] = RATIO_GRID) -> Callable[[], None]:
    """A callable that installs a fresh random window configuration on ``model`` (call before each step)."""
    def before_step() -> None:
        apply_window_ratios(model, random_window_ratios(model, generator, grid))
    return before_step
