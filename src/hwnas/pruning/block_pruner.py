"""Block sparsity for a search: layer targets, and the pruned-weight databases of one model.

A ``block_sparsity`` dimension targets layer groups: an ``int`` is a block index (all of that
block's qkv/proj/fc1/fc2), a string is a glob over linear-layer names (``"*.mlp.fc1"`` = every
fc1, ``"blocks.3.attn.qkv"`` = one layer). ``BlockPruner`` builds the second-order
``LayerDatabase`` of a model once per block size — calibrated on the space's calibration
images — and caches it on disk, keyed by a hash of the weights and the calibration data, so
every Ray worker and every later run reuses it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
from typing import Any

from torch import Tensor, nn

from hwnas.errors import HwnasError
from hwnas.paths import cache_dir
from hwnas.pruning.block_layers import to_block_sparse_layers
from hwnas.pruning.block_obs import DEFAULT_LEVELS, LayerDatabase, find_linear_layers, set_pruned_weights_

DEFAULT_BLOCK = 32
DAMP = 0.01
CACHE_REVISION = 2  # bumped when databases gain fields the search reads (2: per-level losses for lpvit)


def resolve_targets(model: nn.Module, target: Any) -> list[str]:
    """Names of the prunable linear layers a ``block_sparsity`` target stands for (never empty)."""
    names = list(find_linear_layers(model))
    if isinstance(target, int) and not isinstance(target, bool):
        found = [n for n in names if n.startswith(f"blocks.{target}.")]
    elif isinstance(target, str):
        found = [n for n in names if fnmatch.fnmatchcase(n, target)]
    else:
        found = []
    if not found:
        example = names[0] if names else "none"
        raise HwnasError(f"block_sparsity target {target!r} matches no qkv/proj/fc1/fc2 layer of "
                         f"{type(model).__name__} (a block index, or a glob like '*.mlp.fc1'; e.g. {example})")
    return found


def layer_levels(model: nn.Module, targets: dict[Any, float]) -> dict[str, float]:
    """Per layer name, the sparsity level of the target that covers it (later targets win)."""
    levels: dict[str, float] = {}
    for target, level in targets.items():
        for name in resolve_targets(model, target):
            levels[name] = float(level)
    return levels


class BlockPruner:
    """Assembles block-pruned models from per-block-size second-order databases of one dense model."""

    def __init__(self, model: nn.Module, calib_x: Tensor, batch_size: int = 64, progress: bool = False):
        self.model = model
        self.calib_x = calib_x
        self.batch_size = batch_size
        self.progress = progress
        self._databases: dict[int, LayerDatabase] = {}

    def database(self, block: int) -> LayerDatabase:
        """The database for ``block``: from memory, else from the disk cache, else built and cached."""
        if block not in self._databases:
            path = cache_dir() / "block-databases" / f"{self._key(block)}.safetensors"
            if path.is_file():
                self._databases[block] = LayerDatabase.load(path)
            else:
                db = LayerDatabase.build(self.model, self.calib_x.split(self.batch_size), block, DEFAULT_LEVELS,
                                         damp=DAMP, progress=self.progress)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                db.save(tmp)
                os.replace(tmp, path)
                self._databases[block] = db
        return self._databases[block]

    def prune_(self, model: nn.Module, levels: dict[str, float], block: int) -> nn.Module:
        """In place: set each layer of ``levels`` to its pruned weight and swap it for a block-sparse layer."""
        pruned_levels = {name: level for name, level in levels.items() if level > 0}
        masks = set_pruned_weights_(model, self.database(block), pruned_levels)
        return to_block_sparse_layers(model, masks, block)

    def _key(self, block: int) -> str:
        digest = hashlib.sha256(self._inputs_digest)
        digest.update(repr((block, DEFAULT_LEVELS, DAMP, type(self.model).__name__, CACHE_REVISION)).encode())
        return f"b{block}-{digest.hexdigest()[:16]}"

    @functools.cached_property
    def _inputs_digest(self) -> bytes:
        """Hash of the weights and the calibration images, computed once for all block sizes."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(self.calib_x.cpu().contiguous().numpy().tobytes())
        return digest.digest()
