"""SparseViT's evolutionary search: constrained by a resource budget, selected on one objective.

The first population is drawn by rejection sampling: random valid configurations, redrawn until
a resource predictor says they meet the budget. Each later generation keeps the ``top_k`` best
measured configurations (feasible ones first, then by the first objective) and breeds children
from them, half by mutation (each variable re-drawn with probability ``mutation_prob``) and half
by uniform crossover of two parents; a child over the predicted budget is re-drawn. The
predictor is only a filter: every child is still measured, and the measured budget decides.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import optuna

from hwnas.hwprofiles.cost_model import CostModel
from hwnas.search.objectives import Budget
from hwnas.search.optimizers import Proposal
from hwnas.spaces import Config, Space, config_hash

MAX_DRAWS = 200  # redraws per configuration before accepting one the predictor rejects


class Evolution:
    """Ask/tell evolutionary search over a space (``--optimizer evolution``)."""

    generational = True

    def __init__(self, space: Space, population: int, seed: int,
                 within_budget: Callable[[Config], bool] | None = None,
                 top_k: int | None = None, mutation_prob: float = 0.2,
                 initial: list[tuple[Config, np.ndarray, np.ndarray]] | None = None):
        self.space = space
        self.population = population
        self.top_k = top_k or max(2, population // 2)
        self.mutation_prob = mutation_prob
        self.within_budget = within_budget or (lambda config: True)
        self.rng = np.random.default_rng(seed)
        self.sampler = optuna.samplers.RandomSampler(seed=seed)  # never used: every trial is enqueued
        self.scored: dict[str, tuple[Config, tuple[float, float]]] = {}
        for config, minimised, constraints in initial or []:  # a resumed study's evaluations
            self._score(config, constraints, minimised)

    # ---- protocol shared with PymooNSGA2 (generational: the runner creates the trials) ---------
    def ask(self, study: optuna.Study, n: int) -> list[Proposal]:
        """One generation of ``population`` configurations (``n`` is ignored)."""
        if len(self.scored) < self.top_k:
            configs = [self._draw(self._random) for _ in range(self.population)]
            if not self.scored and self.within_budget(self.space.identity()):
                configs[0] = self.space.identity()  # the baseline: measured already, a free parent
        else:
            parents = self._parents()
            configs = [self._draw(lambda: self._mutate(parents)) if i % 2 == 0
                       else self._draw(lambda: self._crossover(parents)) for i in range(self.population)]
        return [Proposal(config, None) for config in configs]

    def tell(self, proposals: list[Proposal], minimised: np.ndarray) -> None:
        """Remember each measured configuration's (total budget violation, first objective)."""
        for proposal, values in zip(proposals, minimised):
            self._score(proposal.config, proposal.constraints, values)

    def _score(self, config: Config, constraints, minimised) -> None:
        violation = float(sum(max(0.0, c) for c in constraints))
        self.scored[config_hash(config)] = (config, (violation, float(minimised[0])))

    # ---- operators ----------------------------------------------------------------------------
    def _parents(self) -> list[Config]:
        ranked = sorted(self.scored.values(), key=lambda item: item[1])
        return [config for config, _ in ranked[:self.top_k]]

    def _random(self) -> Config:
        low, high = self.space.bounds()
        return self.space.decode(self.rng.integers(low, high + 1))

    def _mutate(self, parents: list[Config]) -> Config:
        vector = self.space.encode(parents[self.rng.integers(len(parents))])
        low, high = self.space.bounds()
        redraw = self.rng.random(len(vector)) < self.mutation_prob
        vector[redraw] = self.rng.integers(low[redraw], high[redraw] + 1)
        return self.space.decode(vector)

    def _crossover(self, parents: list[Config]) -> Config:
        first, second = (self.space.encode(parents[i]) for i in self.rng.choice(len(parents), 2, replace=False))
        take_second = self.rng.random(len(first)) < 0.5
        return self.space.decode(np.where(take_second, second, first))

    def _draw(self, make: Callable[[], Config]) -> Config:
        """A configuration from ``make`` that the predictor accepts (the last draw after MAX_DRAWS)."""
        for _ in range(MAX_DRAWS):
            config = make()
            if self.within_budget(config):
                return config
        return config


class PredictedBudget:
    """Evolution's filter: is a configuration predicted to meet the budget?

    Latency and energy come from the study's fitted cost model when it has one, else from the
    baseline's value scaled by the fraction of the dense FLOPs the configuration keeps (the cost
    model's features, unfitted); FLOPs are predicted that way too. Limits nothing predicts
    (accuracy, fidelity, parameters) are left to the measurement.
    """

    def __init__(self, space: Space, budget: Budget, baseline_metrics: dict[str, float], cost_model: CostModel):
        self.limits = budget.limits
        self.baseline = baseline_metrics
        self.cost_model = cost_model
        self.identity_work = cost_model.features(space.identity())[1:]

    def __call__(self, config: Config) -> bool:
        kept = 1.0 - float(np.sum(self.identity_work - self.cost_model.features(config)[1:]))
        fitted = self.cost_model.predict(config) if self.cost_model.coefficients else {}
        for metric, limit in self.limits.items():
            base = metric.removesuffix("_predicted")
            reference = self.baseline.get(metric, self.baseline.get(base))  # a profile's prediction, or measured
            if f"{base}_predicted" in fitted:
                value = fitted[f"{base}_predicted"]
            elif base in ("latency_ms", "energy_mj", "flops") and reference is not None:
                value = reference * min(1.0, max(0.0, kept))
            else:
                continue
            if value > limit:
                return False
        return True
