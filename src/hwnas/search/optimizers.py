"""Optimizers behind ``--optimizer``: pymoo's NSGA-II and Optuna's samplers, all over one Optuna study.

Each optimizer proposes a batch of configurations as Optuna trials (so every evaluation lands
in the same storage) and, for pymoo, hears back the objective and constraint values. A
configuration already evaluated in the study (same hash) is not measured again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import optuna
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import IntegerRandomSampling

from hwnas.errors import HwnasError
from hwnas.spaces import Config, Space, config_hash


@dataclass
class Proposal:
    """A configuration to evaluate, the Optuna trial that will record it (None when cached for pymoo)."""

    config: Config
    trial: optuna.Trial | None
    metrics: dict | None = None  # filled once evaluated (or from the cache)
    constraints: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def enqueued_trial(study: optuna.Study, space: Space, config: Config) -> tuple[optuna.Trial, Config]:
    """A new trial of ``study`` with its parameters fixed to ``config``, and the configuration as it records it."""
    study.enqueue_trial(config, skip_if_exists=False)
    trial = study.ask()
    return trial, space.suggest(trial)


class OptunaOptimizer:
    """Any Optuna sampler, asked ``batch`` trials at a time."""

    def __init__(self, sampler: optuna.samplers.BaseSampler, space: Space):
        self.sampler = sampler
        self.space = space

    def ask(self, study: optuna.Study, n: int) -> list[Proposal]:
        proposals = []
        for _ in range(n):
            trial = study.ask()
            proposals.append(Proposal(self.space.suggest(trial), trial))
        return proposals

    def tell(self, proposals: list[Proposal], minimised: np.ndarray) -> None:
        """Optuna learns from the study itself; nothing to do."""


class _SpaceRepair(Repair):
    """Project integer vectors onto the space's ordering constraints (decode, repair, encode)."""

    def __init__(self, space: Space):
        super().__init__()
        self.space = space

    def _do(self, problem, X, **kwargs):
        return np.array([self.space.encode(self.space.decode(x)) for x in np.round(X).astype(int)])


class _IdentityFirstSampling(IntegerRandomSampling):
    """Random integer vectors, the first replaced by the unpruned configuration.

    The unpruned model is already measured (the baseline), so it is a free, accurate parent:
    its mutations are the mild configurations random sampling seldom draws.
    """

    def __init__(self, space: Space):
        super().__init__()
        self.space = space

    def _do(self, problem, n_samples, **kwargs):
        X = super()._do(problem, n_samples, **kwargs)
        X[0] = self.space.encode(self.space.identity())
        return X


class PymooNSGA2:
    """pymoo's NSGA-II in ask/tell mode over the integer encoding of the space.

    On resume the previous evaluations seed the first population, so the search continues
    from where it stopped instead of starting again.
    """

    generational = True  # proposes whole generations; the runner creates their trials (enqueued_trial)

    def __init__(self, space: Space, n_objectives: int, n_constraints: int, population: int, seed: int,
                 initial: list[tuple[Config, np.ndarray, np.ndarray]] | None = None):
        self.space = space
        self.sampler = optuna.samplers.RandomSampler(seed=seed)  # never used: every trial is enqueued
        low, high = space.bounds()
        problem = Problem(n_var=len(low), n_obj=n_objectives, n_ieq_constr=n_constraints, xl=low, xu=high, vtype=int)
        sampling = _IdentityFirstSampling(space)
        if initial:
            sampling = Population.new("X", np.array([space.encode(c) for c, _, _ in initial]))
        self.algorithm = NSGA2(
            pop_size=population, sampling=sampling, repair=_SpaceRepair(space), eliminate_duplicates=True,
            crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
            mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()))
        self.algorithm.setup(problem, seed=seed)
        self._population: Population | None = None

    def ask(self, study: optuna.Study, n: int) -> list[Proposal]:
        """One generation (``n`` is ignored: NSGA-II proposes whole generations); none once the space is exhausted."""
        self._population = self.algorithm.ask()
        if self._population is None:  # pymoo found no individual it has not seen: a small space, all proposed
            return []
        proposals = []
        for x in self._population.get("X"):
            config = self.space.decode(x)
            proposals.append(Proposal(config, None))
        return proposals

    def tell(self, proposals: list[Proposal], minimised: np.ndarray) -> None:
        constraints = np.array([p.constraints for p in proposals], dtype=float).reshape(len(proposals), -1)
        self._population.set("F", minimised, "G", constraints)
        self.algorithm.tell(infills=self._population)


OPTIMIZERS = ("nsga2", "optuna-nsga2", "optuna-tpe", "evolution", "random", "lpvit")


def make_optimizer(name: str, space: Space, n_objectives: int, n_constraints: int, population: int, seed: int,
                   initial: list[tuple[Config, np.ndarray, np.ndarray]] | None = None,
                   within_budget: Callable[[Config], bool] | None = None, cost_model=None, budget=None):
    """The optimizer named on the command line. ``seed`` is already offset for resumed studies.

    ``within_budget`` predicts whether a configuration meets the budget (evolution's rejection
    sampling); ``initial`` holds a resumed study's (config, minimised objectives, constraints).
    ``cost_model`` (a fitted ``CostModel``) and ``budget`` drive lpvit's allocation.

    Optuna's samplers read the budget from each trial's constraints (``Trial.set_constraint``).
    """
    if name == "nsga2":
        return PymooNSGA2(space, n_objectives, n_constraints, population, seed, initial)
    if name == "optuna-nsga2":
        return OptunaOptimizer(optuna.samplers.NSGAIISampler(
            population_size=population, seed=seed), space)
    if name == "optuna-tpe":
        return OptunaOptimizer(optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=population), space)
    if name == "evolution":
        from hwnas.search.evolution import Evolution  # evolution.py builds on this module's Proposal
        return Evolution(space, population, seed, within_budget, initial=initial)
    if name == "random":
        return OptunaOptimizer(optuna.samplers.RandomSampler(seed=seed), space)
    if name == "lpvit":
        from hwnas.pruning.block_obs import DEFAULT_LEVELS
        from hwnas.search.allocation import LpvitAllocation, layer_losses  # allocation.py builds on Proposal

        if cost_model is None:
            raise HwnasError("lpvit needs the study's fitted cost model")
        return LpvitAllocation(space, cost_model, layer_losses(space), DEFAULT_LEVELS, budget, seed, initial)
    raise HwnasError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")
