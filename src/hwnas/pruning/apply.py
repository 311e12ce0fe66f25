"""One call transforms a model: ``apply_config(model, space, config)`` returns the pruned copy."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

from torch import nn

from hwnas.errors import HwnasError
from hwnas.pruning.tokens import apply_token_keep
from hwnas.spaces import Config, Space


def apply_config(model: nn.Module, space: Space, config: Config) -> nn.Module:
    """A deep copy of ``model`` with every transform of ``config`` applied; ``model`` is untouched."""
    config = space.validate(config)
    by_transform: dict[str, dict[Any, Any]] = defaultdict(dict)
    for dim in space.dimensions:
        by_transform[dim.transform][dim.target] = config[dim.name]
    pruned = copy.deepcopy(model)
    for transform, values in by_transform.items():
        if transform == "token_keep":
            apply_token_keep(pruned, values)
        else:
            raise HwnasError(f"transform '{transform}' is not available yet in this version of hwnas")
    return pruned.eval()
