"""The search loop: measure the baseline, then ask, evaluate and record until the trial count is met.

Every finished evaluation is told to the Optuna study at once and ``pareto.json`` is rewritten,
so an interrupted run loses nothing but the evaluations in flight (which are recorded as
failed with the reason ``interrupted``); ``--resume`` then continues to the same trial count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hwnas.errors import BudgetError, HwnasError
from hwnas.search.costs import study_cost_model
from hwnas.search.objectives import LATENCY_VS_DENSE, format_metric
from hwnas.search.optimizers import Proposal, enqueued_trial, make_optimizer
from hwnas.search.pareto import DENSE_TRIAL, Record, dense_record, hypervolume, pareto_front
from hwnas.search.report import write_pareto, write_report
from hwnas.search.study import StudyDir
from hwnas.spaces import Config

if TYPE_CHECKING:
    from hwnas.evaluators.pool import Outcome

FAILED_VALUE = 1e18  # what pymoo sees for a candidate whose evaluation failed
MAX_STALLED_BATCHES = 5


class Interrupted(HwnasError):
    exit_code = 130


@dataclass
class RunSummary:
    records: list[Record]
    front: list[Record]
    hypervolume: float
    baseline: dict


class SearchRun:
    """Runs (or resumes) the search of one study directory on an evaluator pool."""

    def __init__(self, study_dir: StudyDir, pool, console: Console | None = None, progress: bool = True):
        self.dir = study_dir
        self.pool = pool
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.objectives = study_dir.objectives
        self.budget = study_dir.budget

    # ---- public -------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        settings = self.dir.settings
        study = self.dir.load()
        self._fail_stale(study)
        baseline = self._baseline(study)
        self.cost_model = study_cost_model(self.dir, self.pool, baseline, self.console, self.show_progress)
        if self.cost_model is not None and not set(self.cost_model.metrics) <= set(baseline["metrics"]):
            baseline["metrics"].update(self.cost_model.predict(baseline["config"]))  # labelled _predicted
            study.set_user_attr("baseline", baseline)
        records = self.dir.records(study)
        self.cache = {r.config_hash: r for r in records}
        # the unpruned configuration is already measured: proposing it costs nothing
        self.dense = dense_record(baseline, self.budget)
        self.cache.setdefault(self.dense.config_hash, self.dense)
        n_trials_so_far = len(study.trials)
        initial = [(r.config, np.array(self._minimised_metrics(r.metrics)),
                    np.array(self.budget.constraints(r.metrics, baseline["metrics"]))) for r in records] or None
        self.optimizer = make_optimizer(
            settings.optimizer, self.dir.space, len(self.objectives), len(self.budget.limits),
            settings.population_size(), settings.seed + n_trials_so_far, initial,
            within_budget=self._predicted_budget(baseline), cost_model=self.cost_model, budget=self.budget)
        study = self.dir.load(self.optimizer.sampler)
        self.study, self.baseline, self.records = study, baseline, records

        self.in_flight = []
        with self._progress() as progress:
            task = progress.add_task("trials", total=settings.trials, completed=len(records), **self._fields())
            on_record = lambda: progress.update(task, completed=len(self.records), **self._fields())  # noqa: E731
            try:
                stalled = 0
                while len(self.records) < settings.trials:
                    before = len(self.records)
                    if getattr(self.optimizer, "generational", False):
                        self.in_flight = self._next_generation(settings.trials - len(self.records))
                        self._evaluate_generation(self.in_flight, on_record)
                    else:  # one proposal whenever a worker comes free
                        self._evaluate_stream(settings.trials, on_record)
                    self.in_flight = []
                    stalled = stalled + 1 if len(self.records) == before else 0
                    if stalled >= MAX_STALLED_BATCHES:
                        self.console.print(f"[yellow]the optimizer proposed no new configuration in "
                                           f"{MAX_STALLED_BATCHES} batches: the space "
                                           f"({self.dir.space.size():,} grid points) looks exhausted")
                        break
            except KeyboardInterrupt:
                self._interrupt(self.in_flight)
                self._write_outputs()
                raise Interrupted(f"interrupted after {len(self.records)} finished trial(s); "
                                  f"continue with: search run --resume {self.dir.path}") from None
        summary = self._write_outputs()
        if not any(r.feasible for r in self.records):
            raise BudgetError(self._impossible_budget_message())
        if not summary.front:
            self.console.print(f"[yellow]no feasible candidate of {len(self.records)} trials improves on the dense model "
                               "in any objective: the front is empty. Search longer or widen the space")
        return summary

    # ---- steps --------------------------------------------------------------------------------
    def _baseline(self, study: optuna.Study) -> dict:
        baseline = self.dir.baseline(study)
        if baseline is None:
            identity = self.dir.space.identity()
            outcome = next(iter(self.pool.evaluate([identity])))
            if outcome.error:
                raise HwnasError(f"the unpruned model could not be evaluated: {outcome.error}")
            metrics = dict(outcome.metrics)
            if LATENCY_VS_DENSE in metrics:  # timed against itself: 1 by definition, whatever the noise
                metrics[LATENCY_VS_DENSE] = 1.0
            baseline = {"config": identity, "metrics": metrics, **self.pool.info()}
            self._check_metrics(baseline["metrics"])
            study.set_user_attr("baseline", baseline)
            study.set_user_attr("objectives", {o.metric: o.direction for o in self.objectives})
            study.set_user_attr("budget", self.budget.limits)
        return baseline

    def _predicted_budget(self, baseline: dict):
        """Evolution's rejection filter (None for the other optimizers, or without a budget)."""
        if self.dir.settings.optimizer != "evolution" or not self.budget.limits:
            return None
        from hwnas.hwprofiles.cost_model import CostModel
        from hwnas.models.registry import build_arch
        from hwnas.search.evolution import PredictedBudget

        space = self.dir.space
        cost_model = self.cost_model or CostModel.for_space(space, build_arch(space.model))
        return PredictedBudget(space, self.budget, baseline["metrics"], cost_model)

    def _check_metrics(self, metrics: dict) -> None:
        read = self.dir.settings.metrics_read()
        missing = [m for m in read if m not in metrics and not m.endswith("_predicted")]  # the cost model's
        if missing:
            hint = " (the data has no labels: use --objectives fidelity,latency)" if "accuracy" in missing else ""
            raise HwnasError(f"this evaluation does not measure {', '.join(missing)}{hint}")

    def _next_generation(self, remaining: int) -> list[Proposal]:
        """A generational optimizer's next proposals: trials for up to ``remaining`` new ones, cached ones filled in."""
        generation = self.optimizer.ask(self.study, max(1, min(remaining, self.pool.workers)))
        new = 0
        for proposal in generation:
            cached = self.cache.get(proposal.config_hash)
            if cached is not None:
                self._fill_from(proposal, cached)
            elif new < remaining:
                proposal.trial, proposal.config = enqueued_trial(self.study, self.dir.space, proposal.config)
                new += 1
        return generation

    def _evaluate_generation(self, generation: list[Proposal], on_record) -> None:
        """Evaluate a generational optimizer's proposals, then tell it the results."""
        todo = []
        for proposal in generation:
            if not self._answered_from_cache(proposal, on_record) and proposal.trial is not None:
                todo.append(proposal)
        for outcome in self.pool.evaluate([p.config for p in todo]):
            self._finish(todo[outcome.index], outcome, on_record)
        if generation and all(p.metrics or p.error for p in generation):
            self.optimizer.tell(generation, np.array([self._minimised(p) for p in generation]))

    def _evaluate_stream(self, trials: int, on_record) -> None:
        """Ask the optimizer for one proposal whenever a worker is free, until ``trials`` are recorded or running.

        The pool reads ``self._proposals`` lazily, so each proposal is asked knowing every result
        recorded before it, and no worker waits for the slowest candidate of a batch.
        """
        for outcome in self.pool.evaluate(self._proposals(trials, on_record)):
            self._finish(self.in_flight[outcome.index], outcome, on_record)

    def _proposals(self, trials: int, on_record) -> Iterator[Config]:
        """New configurations to measure (kept in ``self.in_flight``); cached ones are recorded on the way."""
        while len(self.records) + sum(p.metrics is None and p.error is None for p in self.in_flight) < trials:
            batch = self.optimizer.ask(self.study, 1)
            if not batch:  # the optimizer has nothing new to propose
                return
            proposal = batch[0]
            if self._answered_from_cache(proposal, on_record):
                continue
            self.in_flight.append(proposal)
            yield proposal.config

    def _answered_from_cache(self, proposal: Proposal, on_record) -> bool:
        """Record ``proposal`` from an earlier measurement of its configuration, if there is one."""
        cached = self.cache.get(proposal.config_hash)
        if proposal.metrics is not None or cached is None or proposal.trial is None:
            return False
        self._fill_from(proposal, cached)
        proposal.trial.set_user_attr("cached_from", "baseline" if cached.trial == DENSE_TRIAL else cached.trial)
        self._record(proposal)
        on_record()
        return True

    def _finish(self, proposal: Proposal, outcome: Outcome, on_record) -> None:
        proposal.metrics, proposal.error = outcome.metrics, outcome.error
        if proposal.metrics and self.cost_model is not None:
            proposal.metrics = {**proposal.metrics, **self.cost_model.predict(proposal.config)}
        self._record(proposal)
        on_record()

    def _fill_from(self, proposal: Proposal, cached: Record) -> None:
        proposal.metrics = cached.metrics
        proposal.constraints = self.budget.constraints(cached.metrics, self.baseline["metrics"])

    def _record(self, proposal: Proposal) -> None:
        trial = proposal.trial
        trial.set_user_attr("config", proposal.config)
        trial.set_user_attr("config_hash", proposal.config_hash)
        if proposal.error:
            trial.set_user_attr("error", proposal.error)
            self.study.tell(trial, state=TrialState.FAIL)
            self.console.print(f"[red]trial {trial.number} failed: {proposal.error}")
            proposal.constraints = [FAILED_VALUE] * len(self.budget.limits)
            return
        metrics = proposal.metrics
        proposal.constraints = self.budget.constraints(metrics, self.baseline["metrics"])
        feasible = all(c <= 0 for c in proposal.constraints)
        trial.set_user_attr("metrics", metrics)
        for metric, violation in zip(self.budget.limits, proposal.constraints):
            trial.set_constraint(metric, violation)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("device", self.baseline.get("device"))
        self.study.tell(trial, values=[metrics[o.metric] for o in self.objectives])
        record = Record(trial.number, proposal.config, metrics, feasible, proposal.config_hash)
        self.records.append(record)
        self.cache.setdefault(record.config_hash, record)
        write_pareto(self.dir, self.records, self.baseline)

    def _minimised(self, proposal: Proposal) -> list[float]:
        if proposal.error:
            return [FAILED_VALUE] * len(self.objectives)
        return self._minimised_metrics(proposal.metrics)

    def _minimised_metrics(self, metrics: dict) -> list[float]:
        return [o.minimised(metrics[o.metric]) for o in self.objectives]

    def _fail_stale(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a killed driver are recorded as failed (they never finished)."""
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if stale:
            self.console.print(f"marked {len(stale)} unfinished trial(s) of the previous run as failed")

    def _interrupt(self, in_flight: list[Proposal]) -> None:
        for proposal in in_flight:
            if proposal.trial is not None and proposal.metrics is None and proposal.error is None:
                proposal.trial.set_user_attr("error", "interrupted")
                self.study.tell(proposal.trial, state=TrialState.FAIL, skip_if_finished=True)

    def _write_outputs(self) -> RunSummary:
        front = pareto_front(self.records, self.objectives, self.dense)
        hv = hypervolume(front, self.objectives, self.baseline["metrics"])
        write_pareto(self.dir, self.records, self.baseline)
        write_report(self.dir, self.records, front, self.baseline, hv)
        return RunSummary(self.records, front, hv, self.baseline)

    def _impossible_budget_message(self) -> str:
        parts = []
        for metric, limit in self.budget.limits.items():
            values = [(self.budget.value(metric, r.metrics, self.baseline["metrics"]), r.trial) for r in self.records]
            if not values:
                continue
            best, trial = min(values)
            if best > limit:
                parts.append(f"{metric} <= {format_metric(metric, limit)} (best seen {format_metric(metric, best)}, "
                             f"trial {trial})")
        if not self.records:
            return "no trial finished, so no candidate meets the budget"
        return (f"no candidate in {len(self.records)} trials meets the budget: " + "; ".join(parts or ["jointly"])
                + ". Relax --budget or search longer")

    # ---- progress -----------------------------------------------------------------------------
    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("feasible {task.fields[feasible]} · front {task.fields[front]} · "
                                   "HV {task.fields[hv]} · best {task.fields[best]}"),
                        TimeElapsedColumn(), console=self.console, disable=not self.show_progress)

    def _fields(self) -> dict:
        records = getattr(self, "records", [])
        feasible = [r for r in records if r.feasible]
        front = pareto_front(records, self.objectives, getattr(self, "dense", None))
        first = self.objectives[0]
        best = "-"
        if feasible:
            pick = min(feasible, key=lambda r: first.minimised(r.metrics[first.metric]))
            best = f"{first.metric} {format_metric(first.metric, pick.metrics[first.metric])}"
        hv = hypervolume(front, self.objectives, self.baseline["metrics"]) if front else 0.0
        return {"feasible": len(feasible), "front": len(front), "hv": f"{hv:.3f}", "best": best}


def run_study(study_dir: StudyDir, console: Console, progress: bool = True) -> RunSummary:
    """Prepare the model, start the study's evaluator pool, run (or resume) the search, close the pool."""
    from hwnas.evaluators.pool import make_pool

    settings = study_dir.settings
    console.print(study_dir.space.describe(), markup=False, highlight=False)
    console.print(f"study {study_dir.path}: {settings.optimizer}, {settings.trials} trials, "
                  f"objectives {settings.objectives}, budget {study_dir.budget.describe()}", markup=False)
    _prepare(study_dir.space, progress)
    source = study_dir.space.source
    # a relative limit or objective holds on a drifting machine when each candidate is timed beside dense
    if LATENCY_VS_DENSE in [o.metric for o in study_dir.objectives] + list(study_dir.budget.limits):
        source = {**source, "measure": {**(source.get("measure") or {}), "versus_dense": True}}
    pool = make_pool(source, settings.workers, settings.device, settings.ray_address, settings.measures_energy(),
                     settings.fault_policy(), settings.hwprofile)
    try:
        return SearchRun(study_dir, pool, console, progress=progress).run()
    finally:
        pool.close()


def _prepare(space, progress: bool) -> None:
    """Train (or find) the model and build its pruned-weight databases here, with progress bars,
    so that the workers find both in the cache instead of each building them silently."""
    from hwnas.evaluators.data import load_eval_data
    from hwnas.models.registry import load_model
    from hwnas.pruning.apply import block_sizes
    from hwnas.pruning.block_pruner import BlockPruner

    model = load_model(space.model, progress=progress)
    sizes = block_sizes(space)
    if sizes:
        pruner = BlockPruner(model, load_eval_data(space.data, space.model, model).calib_x, progress=progress)
        for size in sizes:
            pruner.database(size)
