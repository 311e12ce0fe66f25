"""Swap block-pruned ``nn.Linear`` layers for ``BlockSparseLinear`` kernel layers, and tune their CPU paths.

``to_block_sparse_layers`` takes the masks that block pruning produced (bool ``[out/b, in/b]``,
True = kept; the weights already zero outside them) and replaces each layer in place.
``calibrate_block_sparse`` then lets every kernel layer time its implementations (on the CPU or
on CUDA) on the input it actually receives in the model, since which path is fastest depends on
the device, the layer's shape, its sparsity and the token count.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from hwnas.errors import HwnasError
from hwnas.kernels.block_sparse import IMPLS, BlockSparseLinear


@torch.no_grad()
def to_block_sparse_layers(model: nn.Module, masks: dict[str, Tensor], block: int) -> nn.Module:
    """In place: replace each ``nn.Linear`` named in ``masks`` by a ``BlockSparseLinear`` of its kept blocks.

    Weight values outside the masks are dropped (prune first). All names are checked before any
    layer is replaced, so on an error the model is unchanged. Returns ``model``.
    """
    layers = {}
    for name, mask in masks.items():
        linear = _linear(model, name)
        try:
            layers[name] = BlockSparseLinear.from_linear(linear, mask, block)
        except ValueError as exc:
            raise HwnasError(f"layer '{name}': {exc}") from None
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    return model


@torch.no_grad()
def calibrate_block_sparse(model: nn.Module, example: Tensor, warmup: int = 2, repeats: int = 7) -> dict[str, str]:
    """Run ``example`` through ``model`` once; each ``BlockSparseLinear`` times its paths on its own input.

    Returns {layer name: the implementation chosen for the example's device}. Each layer
    calibrates inside a forward pre-hook, on the first input it receives, so no activations are kept.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    if example.device.type not in IMPLS:  # nothing to choose from: those devices run dense
        return {name: "dense" for name in layers}
    pending = set(layers)

    def hook_for(name: str):
        def hook(layer: BlockSparseLinear, args: tuple) -> None:
            if name in pending:
                pending.discard(name)
                layer.calibrate(args[0].detach(), warmup=warmup, repeats=repeats)

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: layer.impl[example.device.type] for name, layer in layers.items()}


@contextmanager
def forced_impl(model: nn.Module, impl: str) -> Iterator[None]:
    """Inside the block, every ``BlockSparseLinear`` of ``model`` runs ``impl`` on every device.

    E.g. ``dense`` for training (the only path autograd goes through) or ``gather`` for counting
    the FLOPs of kept blocks. The calibrated choice is restored on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    calibrated = [layer.impl for layer in layers]
    for layer in layers:
        layer.impl = {device: impl for device in layer.impl}
    try:
        yield
    finally:
        for layer, chosen in zip(layers, calibrated):
            layer.impl = chosen


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        found = "no such module" if module is None else type(module).__name__
        raise HwnasError(f"'{name}' is not a linear layer of {type(model).__name__} ({found})")
    return module
