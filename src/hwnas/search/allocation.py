"""LPViT's layer-wise allocation as an optimizer (``--optimizer lpvit``): least loss under a predicted cost.

LPViT chooses the block sparsity of each layer by minimising the summed second-order loss of the
pruned layers subject to its hardware objective (latency or power, linear in the blocks each
layer keeps). Here, per ``block_sparsity`` variable and grid level, the *loss* is the sum over the
variable's layers of the relative OBS loss the ``LayerDatabase`` recorded (the pruned layer's
output error over its dense output, both on the calibration images), and the *cost* is the
change of the cost model's prediction (``latency_ms_predicted``, or ``energy_mj_predicted`` under
an energy budget). The multiple-choice knapsack (one level per variable, total cost under a
target) is solved exactly as a 0/1 program by scipy's MILP solver (HiGHS), which on spaces this
small is both exact and fast; a Lagrangian/greedy allocation lost to uniform allocations in tests.
Every block size of the space is tried; the lowest loss wins.

The proposals trace a front: the cost targets sweep from the dense model (or, under a budget,
from the budget) down to the sparsest allocation in van der Corput order, so any number of
trials covers the range evenly and a resumed study continues the same sequence. Variables LPViT
does not allocate — ``token_keep``, ``window_ratio`` and any other transform — stay at their
unpruned values; run ``nsga2`` on the same space to see what the joint search adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from hwnas.errors import HwnasError
from hwnas.hwprofiles.cost_model import PREDICTED, CostModel
from hwnas.pruning.block_pruner import DEFAULT_BLOCK
from hwnas.search.objectives import Budget
from hwnas.search.optimizers import Proposal, enqueued_trial
from hwnas.spaces import Config, Space, config_hash

_TRIES_PER_ASK = 256  # targets tried per ask before giving up on finding a new allocation


@dataclass
class Table:
    """Loss and cost of every level of every ``block_sparsity`` variable, for one block size."""

    block: int
    names: list[str]
    values: list[tuple]
    loss: np.ndarray  # [variables, levels], inf where a variable has fewer levels
    cost: np.ndarray  # [variables, levels], predicted cost change from the unpruned model


def allocate(loss: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray:
    """A level per row minimising Σ loss[row, level] with Σ cost[row, level] <= ``budget``.

    The multiple-choice knapsack, solved exactly as a 0/1 program by scipy's MILP (HiGHS); rows
    may be padded with infinite loss. When nothing fits, the cheapest allocation.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    rows, width = loss.shape
    usable = np.isfinite(loss)
    cheapest = np.where(usable, cost, np.inf).argmin(axis=1)
    if cost[np.arange(rows), cheapest].sum() > budget:
        return cheapest
    one_per_row = np.kron(np.eye(rows), np.ones(width))
    limit = budget - 1e-9 * max(1.0, abs(budget))  # HiGHS's feasibility tolerance must not break the budget
    result = milp(np.where(usable, loss, 0).ravel(), integrality=np.ones(loss.size),
                  bounds=Bounds(0, usable.ravel().astype(float)),
                  constraints=[LinearConstraint(one_per_row, 1, 1),
                               LinearConstraint(cost.ravel()[None], -np.inf, limit)],
                  options={"mip_rel_gap": 0})
    if result.x is None:  # only the cheapest allocation fits, within the tolerance
        return cheapest
    return result.x.reshape(rows, width).argmax(axis=1)


def van_der_corput(i: int) -> float:
    """The i-th point of the base-2 van der Corput sequence (0, 1/2, 1/4, 3/4, 1/8, ...)."""
    value, denominator = 0.0, 1.0
    while i:
        denominator *= 2
        i, bit = divmod(i, 2)
        value += bit / denominator
    return value


class LpvitAllocation:
    """Proposes LPViT allocations of the ``block_sparsity`` variables at a sweep of predicted-cost targets.

    ``losses``: per block size, each layer's relative loss at each level of ``levels`` (see
    ``layer_losses``). ``budget``: its first latency or energy limit (measured or predicted) is the
    allocation's cost limit; without one the sweep starts at the dense model.
    """

    def __init__(self, space: Space, cost_model: CostModel, losses: dict[int, dict[str, list[float]]],
                 levels: tuple[float, ...], budget: Budget | None = None, seed: int = 0,
                 initial: list[tuple[Config, np.ndarray, np.ndarray]] | None = None):
        self.space = space
        self.sampler = optuna.samplers.RandomSampler(seed=seed)  # never used: every trial is enqueued
        self.model = cost_model
        self.identity = space.identity()
        names = [d.name for d in space.dimensions if d.transform == "block_sparsity"]
        if not names:
            raise HwnasError(f"lpvit allocates block_sparsity variables; space '{space.name}' has none")
        self.metric, limit = _cost_metric(cost_model, budget)
        self.base = cost_model.predict(self.identity)[self.metric]
        block_dims = [d for d in space.dimensions if d.transform == "block_size"]
        self.block_dim = block_dims[0].name if block_dims else None
        blocks = [int(v) for v in block_dims[0].values] if block_dims else [DEFAULT_BLOCK]
        self.tables = [self._table(names, block, losses, levels) for block in blocks]
        cheapest = min(self.base + np.where(np.isfinite(t.loss), t.cost, np.inf).min(axis=1).sum() for t in self.tables)
        if cheapest >= self.base:
            raise HwnasError(f"lpvit: the cost model predicts no block-sparsity allocation with a lower {self.metric} "
                             f"than the dense model on {cost_model.device or 'this device'} (block pruning does not "
                             "pay here; see cost_model.json): search token/other variables with nsga2 instead")
        self.high = min(limit, self.base) if limit is not None else self.base
        self.low = min(cheapest, self.high)
        self._index = 0
        self._seen = {config_hash(self.identity)} | {config_hash(c) for c, _, _ in initial or []}

    # ---- the allocation -----------------------------------------------------------------------
    def config_for(self, target: float) -> Config:
        """The lowest-loss allocation whose predicted cost is at most ``target`` (the cheapest if none is)."""
        best = None
        for table in self.tables:
            levels = allocate(table.loss, table.cost, target - self.base)
            rows = np.arange(len(levels))
            total = (table.cost[rows, levels].sum() > target - self.base, table.loss[rows, levels].sum())
            if best is None or total < best[0]:
                best = (total, table, levels)
        _, table, levels = best
        config = dict(self.identity)
        config.update({name: values[k] for name, values, k in zip(table.names, table.values, levels)})
        if self.block_dim is not None and config != self.identity:
            config[self.block_dim] = table.block
        return self.space.repair(config)

    def target(self, i: int) -> float:
        """The i-th cost target of the sweep, from ``high`` down towards ``low``."""
        return self.high - van_der_corput(i) * (self.high - self.low)

    # ---- ask/tell -----------------------------------------------------------------------------
    def ask(self, study: optuna.Study, n: int) -> list[Proposal]:
        """Up to ``n`` allocations not proposed before (none when the sweep finds no new one)."""
        proposals = []
        for _ in range(_TRIES_PER_ASK):
            if len(proposals) == n:
                break
            config = self.config_for(self.target(self._index))
            self._index += 1
            if config_hash(config) in self._seen:
                continue
            self._seen.add(config_hash(config))
            trial, config = enqueued_trial(study, self.space, config)
            proposals.append(Proposal(config, trial))
        return proposals

    def tell(self, proposals: list[Proposal], minimised: np.ndarray) -> None:
        """The allocation does not learn from measurements (LPViT trusts its model); nothing to do."""

    def _table(self, names: list[str], block: int, losses: dict, levels: tuple[float, ...]) -> Table:
        if block not in losses:
            raise HwnasError(f"no second-order losses for block size {block}")
        dims = [self.space.dimension(n) for n in names]
        width = max(len(d.values) for d in dims)
        loss = np.full((len(dims), width), np.inf)
        cost = np.zeros((len(dims), width))
        scopes = {v.name: v.scope for v in self.model.variables}
        start = dict(self.identity)
        if self.block_dim is not None:
            start[self.block_dim] = block
        base = self.model.predict(start)[self.metric]
        for row, dim in enumerate(dims):
            for k, value in enumerate(dim.values):
                index = int(np.argmin([abs(level - value) for level in levels]))
                loss[row, k] = sum(losses[block][layer][index] for layer in scopes[dim.name])
                cost[row, k] = self.model.predict({**start, dim.name: value})[self.metric] - base
        return Table(block, names, [d.values for d in dims], loss, cost)


def _cost_metric(model: CostModel, budget: Budget | None) -> tuple[str, float | None]:
    """The predicted metric the allocation spends, and its limit (from the budget) if any."""
    for metric, limit in (budget.limits.items() if budget else []):
        predicted = PREDICTED.get(metric, metric)
        if predicted in model.metrics:
            return predicted, limit
    if not model.metrics:
        raise HwnasError("lpvit needs a fitted cost model")
    return ("latency_ms_predicted" if "latency_ms_predicted" in model.metrics else model.metrics[0]), None


def layer_losses(space: Space) -> dict[int, dict[str, list[float]]]:
    """Per block size of ``space``, each layer's relative second-order loss at each database level.

    Read from the model's pruned-weight databases (built and cached on first use): loss over the
    dense output energy, so layers of different output scales weigh alike.
    """
    from hwnas.evaluators.data import load_eval_data
    from hwnas.models.registry import load_model
    from hwnas.pruning.apply import block_sizes
    from hwnas.pruning.block_pruner import BlockPruner

    model = load_model(space.model, progress=False)
    pruner = BlockPruner(model, load_eval_data(space.data, space.model, model).calib_x)
    losses = {}
    for block in block_sizes(space):
        db = pruner.database(block)
        if not db.losses:
            raise HwnasError(f"the layer database for block size {block} has no losses; delete it to rebuild")
        losses[block] = {name: [x / max(db.output_energy[name], 1e-30) for x in values]
                         for name, values in db.losses.items()}
    return losses
