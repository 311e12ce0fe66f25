"""Transforms: ``apply_config(model, space, config, pruner)`` and the techniques behind it —
token keep schedules (``tokens``), second-order block pruning (``block_obs``, ``block_pruner``)
and the swap to block-sparse kernel layers (``block_layers``)."""
