"""One call transforms a model: ``apply_config(model, space, config, pruner)`` returns the pruned copy.

Weight transforms (``block_sparsity`` with its ``block_size``) take their pruned weights from a
``BlockPruner``; structural transforms (``token_keep`` with its ``token_method`` and ``spectral_weight``,
``window_ratio``) only change how the model runs.
``apply_structure`` applies the structural ones alone: an export's weights already hold the rest.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

from torch import nn

from hwnas.errors import HwnasError
from hwnas.pruning.block_obs import DEFAULT_LEVELS
from hwnas.pruning.block_pruner import DEFAULT_BLOCK, BlockPruner, layer_levels
from hwnas.pruning.token_methods import DEFAULT_TOKEN_METHOD, TOKEN_METHODS, TokenMethod, UccMethod, token_method
from hwnas.pruning.tokens import apply_token_keep
from hwnas.pruning.windows import apply_window_ratios
from hwnas.spaces import Config, Space

WEIGHT_TRANSFORMS = ("block_sparsity", "block_size")
TOKEN_TRANSFORMS = ("token_keep", "token_method", "spectral_weight")
STRUCTURAL_TRANSFORMS = (*TOKEN_TRANSFORMS, "window_ratio")
#: the three sparsity techniques, each with the transforms that make it up
TECHNIQUES = {"block": WEIGHT_TRANSFORMS, "tokens": TOKEN_TRANSFORMS, "windows": ("window_ratio",)}


def apply_config(model: nn.Module, space: Space, config: Config, pruner: BlockPruner | None = None) -> nn.Module:
    """A deep copy of ``model`` with every transform of ``config`` applied; ``model`` is untouched.

    ``pruner`` (built on ``model``) is needed only when the configuration removes weight blocks.
    """
    config = space.validate(config)
    by_transform = _by_transform(space, config)
    pruned = copy.deepcopy(model)
    levels = layer_levels(pruned, by_transform.get("block_sparsity", {}))
    if any(levels.values()):
        if pruner is None:
            raise HwnasError("this configuration removes weight blocks: it needs calibration data (a BlockPruner)")
        pruner.prune_(pruned, levels, block_size(space, config))
    return _apply_structural(pruned, by_transform)


def apply_structure(model: nn.Module, space: Space, config: Config) -> nn.Module:
    """``model`` (in place) with the structural transforms of ``config`` only."""
    return _apply_structural(model, _by_transform(space, space.validate(config)))


def block_size(space: Space, config: Config) -> int:
    """The configuration's block size (its ``block_size`` variable, else the default)."""
    for dim in space.dimensions:
        if dim.transform == "block_size":
            return int(config[dim.name])
    return DEFAULT_BLOCK


def block_sizes(space: Space) -> list[int]:
    """Every block size a configuration of ``space`` can use; empty when it prunes no weight blocks."""
    if not any(d.transform == "block_sparsity" for d in space.dimensions):
        return []
    sizes = [int(v) for d in space.dimensions if d.transform == "block_size" for v in d.values]
    return sizes or [DEFAULT_BLOCK]


def check_space(model: nn.Module, space: Space) -> None:
    """Fail with a clear message unless every variable of ``space`` binds to ``model``'s architecture."""
    for dim in space.dimensions:
        if dim.transform == "block_size" and not all(isinstance(v, int) and v > 0 for v in dim.values):
            raise HwnasError(f"{dim.name}: block sizes must be positive integers, got {list(dim.values)}")
        if dim.transform == "token_method" and not set(dim.values) <= set(TOKEN_METHODS):
            unknown = sorted(set(map(str, dim.values)) - set(TOKEN_METHODS))[0]
            raise HwnasError(f"{dim.name}: unknown token method '{unknown}' (known: {', '.join(TOKEN_METHODS)})")
        if dim.transform == "spectral_weight" and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in dim.values):
            raise HwnasError(f"{dim.name}: spectral weights must be numbers in [0, 1], got {list(dim.values)}")
        if dim.transform == "block_sparsity" and not all(
                any(abs(v - level) < 1e-9 for level in DEFAULT_LEVELS) for v in dim.values):
            raise HwnasError(f"{dim.name}: block sparsity levels must come from the grid "
                             f"{', '.join(f'{x:g}' for x in DEFAULT_LEVELS)}; got {list(dim.values)}")
    low, high = space.bounds()
    for vector in (low, high):
        config = space.decode(vector)
        by_transform = _by_transform(space, config)
        levels = layer_levels(model, by_transform.get("block_sparsity", {}))
        if levels:
            _check_block_divides(model, levels, block_sizes(space))
        _apply_structural(copy.deepcopy(model), by_transform)


def _check_block_divides(model: nn.Module, levels: dict[str, float], sizes: list[int]) -> None:
    modules = dict(model.named_modules())
    for size in sizes:
        for name in levels:
            out, inp = modules[name].weight.shape
            if out % size or inp % size:
                raise HwnasError(f"block size {size} does not divide layer '{name}' of shape [{out}, {inp}]; "
                                 "choose block_size values that divide every targeted layer")


def _by_transform(space: Space, config: Config) -> dict[str, dict[Any, Any]]:
    by_transform: dict[str, dict[Any, Any]] = defaultdict(dict)
    for dim in space.dimensions:
        by_transform[dim.transform][dim.target] = config[dim.name]
    unknown = set(by_transform) - set(WEIGHT_TRANSFORMS) - set(STRUCTURAL_TRANSFORMS)
    if unknown:
        raise HwnasError(f"transform '{sorted(unknown)[0]}' is not available yet in this version of hwnas")
    return by_transform


def uses_default_spectral_weight(space: Space) -> bool:
    """Whether ``space`` can run a UCC method with the default spectral weight (it sets no ``spectral_weight``)."""
    transforms = space.transforms()
    if "token_keep" not in transforms or "spectral_weight" in transforms:
        return False
    methods = {v for d in space.dimensions if d.transform == "token_method" for v in d.values} or {DEFAULT_TOKEN_METHOD}
    return any(issubclass(TOKEN_METHODS[name], UccMethod) for name in methods if name in TOKEN_METHODS)


def _token_method(by_transform: dict[str, dict[Any, Any]]) -> TokenMethod:
    """The configuration's token method (space-level variables), with its spectral weight where it scores with one."""
    name = by_transform.get("token_method", {}).get(None, DEFAULT_TOKEN_METHOD)
    weight = by_transform.get("spectral_weight", {}).get(None)
    if weight is None or not issubclass(TOKEN_METHODS[name], UccMethod):
        return token_method(name)
    return token_method(name, spectral_weight=float(weight))


def _apply_structural(model: nn.Module, by_transform: dict[str, dict[Any, Any]]) -> nn.Module:
    if "token_keep" in by_transform:
        apply_token_keep(model, by_transform["token_keep"], _token_method(by_transform))
    if "window_ratio" in by_transform:
        apply_window_ratios(model, by_transform["window_ratio"])
    return model.eval()
