"""The search loop with a formula evaluator: every optimizer, budgets, Pareto exactness, resume, interrupt."""

import json
import math

import numpy as np
import optuna
import pytest
import yaml
from rich.console import Console
from optuna.trial import TrialState

import hwnas
from hwnas.errors import BudgetError, HwnasError
from hwnas.evaluators.pool import Outcome
from hwnas.search.objectives import Objective
from hwnas.search.optimizers import PymooNSGA2
from hwnas.search.pareto import DENSE_TRIAL, Record, pareto_front
from hwnas.search.report import BOTH_LATENCIES, front_table, speedup, zoom_limits
from hwnas.search.runner import Interrupted, SearchRun
from hwnas.search.study import RunSettings, StudyDir
from hwnas.spaces import config_hash, space_from_dict

SPACE = {
    "name": "formula",
    "model": {"name": "digits-deit"},
    "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [1, 2, 3, 4],
                    "values": {"low": 0.2, "high": 1.0, "step": 0.1}, "order": "non_increasing"}],
}


class FormulaPool:
    """Stands in for the model: accuracy and latency are smooth functions of the mean keep ratio."""

    workers = 2

    def __init__(self, interrupt_after: int | None = None):
        self.evaluated: list[str] = []
        self.interrupt_after = interrupt_after

    def info(self):
        return {"device": "formula", "batch_size": 1, "dtype": "float32", "threads": 1}

    def evaluate(self, configs):
        for i, config in enumerate(configs):
            if self.interrupt_after is not None and len(self.evaluated) >= self.interrupt_after:
                raise KeyboardInterrupt
            self.evaluated.append(config_hash(config))
            keep = np.array(list(config.values()))
            mean = float(keep.mean())
            yield Outcome(i, metrics={"accuracy": 0.6 + 0.4 * mean ** 0.5 - 0.01 * float(keep.std()),
                                      "latency_ms": 1.0 + 9.0 * mean, "fidelity_kl": 1.0 - mean})


def make_study(tmp_path, optimizer="nsga2", trials=12, budget="", objectives="accuracy,latency"):
    settings = RunSettings(objectives=objectives, budget=budget, optimizer=optimizer, trials=trials, seed=1)
    return StudyDir.create(tmp_path / "study", space_from_dict(SPACE), settings)


def complete_trials(study_dir):
    return study_dir.load().get_trials(states=(TrialState.COMPLETE,))


@pytest.mark.parametrize("optimizer", ["nsga2", "optuna-nsga2", "optuna-tpe", "random"])
def test_every_optimizer_fills_the_study_and_respects_the_budget(tmp_path, optimizer):
    study_dir = make_study(tmp_path, optimizer, trials=14, budget="latency=7ms")
    summary = SearchRun(study_dir, FormulaPool(), progress=False).run()
    assert len(complete_trials(study_dir)) == 14
    document = json.loads((study_dir.path / "pareto.json").read_text())
    assert document["baseline"]["metrics"]["latency_ms"] == pytest.approx(10.0)
    assert document["budget"] == {"latency_ms": 7.0}
    assert document["points"] and all(p["metrics"]["latency_ms"] <= 7.0 for p in document["points"])
    assert all(study_dir.space.is_valid(p["config"]) for p in document["points"])
    assert (study_dir.path / "report.md").exists() and (study_dir.path / "pareto.png").exists()
    assert summary.hypervolume > 0


def test_front_is_exactly_the_non_dominated_feasible_set(tmp_path):
    study_dir = make_study(tmp_path, "random", trials=20, budget="latency=8ms")
    summary = SearchRun(study_dir, FormulaPool(), progress=False).run()
    feasible = [r for r in summary.records if r.feasible]

    def dominates(a, b):
        return (a.metrics["accuracy"] >= b.metrics["accuracy"] and a.metrics["latency_ms"] <= b.metrics["latency_ms"]
                and (a.metrics["accuracy"] > b.metrics["accuracy"] or a.metrics["latency_ms"] < b.metrics["latency_ms"]))

    expected = {r.config_hash for r in feasible if not any(dominates(o, r) for o in feasible)}
    assert {r.config_hash for r in summary.front} == expected


def test_constraints_are_visible_to_optuna(tmp_path):
    study_dir = make_study(tmp_path, "optuna-nsga2", trials=6, budget="latency=5ms")
    SearchRun(study_dir, FormulaPool(), progress=False).run()
    for trial in complete_trials(study_dir):
        violation = trial.constraints["latency_ms"]
        assert violation == pytest.approx(trial.values[1] - 5.0)
        assert trial.user_attrs["feasible"] == (violation <= 0)
    assert study_dir.load().metric_names == ["accuracy", "latency_ms"]


def test_the_dense_model_competes_on_the_front_without_being_listed():
    objectives = [Objective("accuracy", "max"), Objective("latency_ms", "min")]

    def record(trial, accuracy, latency, feasible=True):
        return Record(trial, {"t": trial}, {"accuracy": accuracy, "latency_ms": latency}, feasible, str(trial))

    faster, slower, as_accurate_slower = record(1, 0.9, 5.0), record(2, 0.95, 12.0), record(3, 1.0, 11.0)
    dense = record(DENSE_TRIAL, 1.0, 10.0)
    records = [faster, slower, as_accurate_slower]
    assert pareto_front(records, objectives) == [as_accurate_slower, faster]  # best accuracy first
    assert pareto_front(records, objectives, dense) == [faster]  # the others do no better than dense
    tie = record(4, 1.0, 10.0)  # as good as dense, not worse: kept
    assert pareto_front(records + [tie], objectives, dense) == [tie, faster]
    ruled_out = record(DENSE_TRIAL, 1.0, 10.0, feasible=False)  # a budget dense misses: it does not compete
    assert pareto_front(records, objectives, ruled_out) == [as_accurate_slower, faster]
    unmeasured = Record(DENSE_TRIAL, {}, {"accuracy": 1.0}, True, "dense")  # no latency to compare on
    assert pareto_front(records, objectives, unmeasured) == [as_accurate_slower, faster]


class SlowerWhenPrunedPool(FormulaPool):
    """Every pruned configuration is less accurate and slower than the dense model (overheads win)."""

    def evaluate(self, configs):
        for outcome in super().evaluate(configs):
            outcome.metrics["latency_ms"] = 21.0 - outcome.metrics["latency_ms"]  # mean keep 1 → 11 ms, less → more
            yield outcome


def test_a_front_that_dense_dominates_is_empty_not_an_impossible_budget(tmp_path, capsys):
    from hwnas.export.exporter import choose_trial

    study_dir = make_study(tmp_path, "random", trials=6)
    summary = SearchRun(study_dir, SlowerWhenPrunedPool(), Console(stderr=True), progress=False).run()
    assert summary.front == [] and len(summary.records) == 6 and all(r.feasible for r in summary.records)
    assert "no feasible candidate of 6 trials improves on the dense model" in capsys.readouterr().err
    document = json.loads((study_dir.path / "pareto.json").read_text())
    assert document["points"] == [] and document["trials"]["feasible"] == 6
    with pytest.raises(HwnasError, match="no feasible candidate improves on the dense model.*--trial ID"):
        choose_trial(study_dir, None, None)


def test_impossible_budget_names_the_best_value(tmp_path):
    study_dir = make_study(tmp_path, "random", trials=5, budget="latency=0.5ms")
    with pytest.raises(BudgetError, match=r"latency_ms <= 0.5 ms \(best seen [0-9.]+ ms, trial \d+\)") as info:
        SearchRun(study_dir, FormulaPool(), progress=False).run()
    assert info.value.exit_code == 3
    assert json.loads((study_dir.path / "pareto.json").read_text())["points"] == []


def test_existing_study_is_never_overwritten(tmp_path):
    make_study(tmp_path).load()
    with pytest.raises(HwnasError, match="--resume"):
        make_study(tmp_path)


@pytest.mark.parametrize("optimizer", ["nsga2", "optuna-tpe"])
def test_interrupt_then_resume_loses_and_repeats_nothing(tmp_path, optimizer):
    study_dir = make_study(tmp_path, optimizer, trials=16)
    first = FormulaPool(interrupt_after=7)  # the baseline is evaluation 1
    with pytest.raises(Interrupted, match="--resume"):
        SearchRun(study_dir, first, progress=False).run()
    done_before = {t.number: t.values for t in complete_trials(study_dir)}
    assert len(done_before) == 6

    resumed_dir = StudyDir.open(study_dir.path)
    second = FormulaPool()
    SearchRun(resumed_dir, second, progress=False).run()
    trials = complete_trials(resumed_dir)
    assert len(trials) == 16
    assert {t.number: t.values for t in trials if t.number in done_before} == done_before  # none lost
    # nothing evaluated twice: neither the baseline nor any configuration finished before
    assert not set(second.evaluated) & set(first.evaluated)
    assert len(second.evaluated) == len(set(second.evaluated))


def test_stale_running_trials_are_failed_on_resume(tmp_path):
    study_dir = make_study(tmp_path, "random", trials=4)
    SearchRun(study_dir, FormulaPool(), progress=False).run()
    study = study_dir.load()
    study.ask()  # a trial a killed driver left running
    resumed = StudyDir.open(study_dir.path)
    resumed.settings.trials = 6
    SearchRun(resumed, FormulaPool(), progress=False).run()
    states = [t.state for t in optuna.load_study(study_name="hwnas", storage=resumed.storage_url).trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 6


def test_failed_evaluations_are_recorded_not_fatal(tmp_path):
    class Flaky(FormulaPool):
        def evaluate(self, configs):
            for outcome in super().evaluate(configs):
                if len(self.evaluated) % 3 == 0:
                    yield Outcome(outcome.index, error="FloatingPointError: non-finite metric(s): accuracy")
                else:
                    yield outcome

    study_dir = make_study(tmp_path, "optuna-tpe", trials=6)
    SearchRun(study_dir, Flaky(), progress=False).run()
    trials = study_dir.load().trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all("non-finite" in t.user_attrs["error"] for t in failed)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 6


def test_nsga2_starts_from_the_unpruned_model_without_measuring_it_twice(tmp_path):
    study_dir = make_study(tmp_path, "nsga2", trials=8)
    space = study_dir.space
    first_generation = PymooNSGA2(space, 2, 0, population=6, seed=0).ask(study_dir.load(), 6)
    assert first_generation[0].config == space.identity()
    assert len({p.config_hash for p in first_generation}) > 1
    pool = FormulaPool()
    SearchRun(study_dir, pool, progress=False).run()
    assert pool.evaluated.count(config_hash(space.identity())) == 1  # measured once, as the baseline
    assert len(complete_trials(study_dir)) == 8


def test_a_study_is_reused_only_for_the_same_space_and_profile(tmp_path):
    path = tmp_path / "study"
    StudyDir.reuse_or_create(path, space_from_dict(SPACE), RunSettings(trials=4)).load()
    again = StudyDir.reuse_or_create(path, space_from_dict(SPACE), RunSettings(trials=9))
    assert again.settings.trials == 9 and StudyDir.open(path).settings.trials == 9  # grown, and saved
    other_space = {**SPACE, "dimensions": [{**SPACE["dimensions"][0], "targets": [1, 2]}]}
    with pytest.raises(HwnasError, match="another space or hardware profile"):
        StudyDir.reuse_or_create(path, space_from_dict(other_space), RunSettings(trials=9))
    with pytest.raises(HwnasError, match="another space or hardware profile"):
        StudyDir.reuse_or_create(path, space_from_dict(SPACE), RunSettings(trials=9, hwprofile={"name": "h100"}))


def test_the_front_speedup_prefers_the_ratio_measured_side_by_side():
    dense = {"latency_ms": 80.0}
    assert speedup({"latency_ms": 94.0, "latency_ms_vs_dense": 0.8}, dense) == 1.25  # the machine slowed meanwhile
    assert speedup({"latency_ms": 40.0}, dense) == 2.0
    assert speedup({"latency_ms_predicted": 5.0}, {"latency_ms_predicted": 10.0}) == 2.0
    assert math.isnan(speedup({"accuracy": 0.9}, dense))


@pytest.mark.parametrize("optimizer", ["nsga2", "optuna-nsga2", "optuna-tpe", "random"])
def test_a_space_smaller_than_the_trial_count_ends_once_exhausted(tmp_path, optimizer):
    """Two grid points, one of them the baseline: one trial measures the rest; none is measured twice."""
    space = {**SPACE, "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [1], "values": [0.5, 1.0]}]}
    settings = RunSettings(optimizer=optimizer, trials=6, seed=1)
    study_dir = StudyDir.create(tmp_path / "study", space_from_dict(space), settings)
    pool = FormulaPool()
    summary = SearchRun(study_dir, pool, progress=False).run()
    assert sorted(pool.evaluated) == sorted({config_hash({"keep.1": 1.0}), config_hash({"keep.1": 0.5})})
    assert {"keep.1": 0.5} in [r.config for r in summary.front]


class PredictedPool(FormulaPool):
    """A study on absent hardware: latency is predicted from a profile, never measured."""

    def evaluate(self, configs):
        for outcome in super().evaluate(configs):
            outcome.metrics["latency_ms_predicted"] = outcome.metrics.pop("latency_ms")
            yield outcome


def test_export_picks_by_predicted_latency_on_absent_hardware(tmp_path):
    from hwnas.export.exporter import choose_trial

    settings = RunSettings(objectives="accuracy,latency_predicted", trials=8, seed=1, hwprofile={"name": "absent"})
    study_dir = StudyDir.create(tmp_path / "study", space_from_dict(SPACE), settings)
    summary = SearchRun(study_dir, PredictedPool(), progress=False).run()
    chosen = choose_trial(study_dir, None, None)  # --pick latency, the default
    fastest = min(summary.front, key=lambda r: r.metrics["latency_ms_predicted"])
    assert chosen["config"] == fastest.config
    with pytest.raises(HwnasError, match="--pick energy: the study has no energy_mj"):
        choose_trial(study_dir, None, "energy")


@pytest.mark.parametrize("space, reopens", [
    (SPACE, False),  # token_keep with the default method, ucc: scored with another spectral weight then
    ({**SPACE, "dimensions": [*SPACE["dimensions"], {"name": "m", "transform": "token_method", "values": ["tome"]}]},
     True),
    ({**SPACE, "dimensions": [*SPACE["dimensions"], {"name": "b", "transform": "spectral_weight", "values": [0.3]}]},
     True),
], ids=["ucc", "tome", "explicit-weight"])
def test_a_study_of_an_earlier_ucc_is_not_continued_with_another_score(tmp_path, space, reopens):
    study_dir = StudyDir.create(tmp_path / "study", space_from_dict(space), RunSettings(trials=4))
    study_dir.load()
    saved = yaml.safe_load((study_dir.path / "config.yaml").read_text())
    assert saved["hwnas_version"] == hwnas.__version__
    StudyDir.open(study_dir.path)  # the same version always reopens
    del saved["hwnas_version"]  # as hwnas 0.2.0 wrote it
    (study_dir.path / "config.yaml").write_text(yaml.safe_dump(saved))
    if reopens:
        StudyDir.open(study_dir.path)
    else:
        with pytest.raises(HwnasError, match="scored with spectral weight 0.3 .now 0.8."):
            StudyDir.open(study_dir.path)


def _record(trial: int, accuracy: float, latency: float) -> Record:
    return Record(trial, {}, {"accuracy": accuracy, "latency_ms": latency}, True, str(trial))


def test_the_plot_zooms_on_the_front_along_the_axis_that_collapsed_candidates_stretch():
    front = [_record(1, 0.973, 61.0), _record(2, 0.976, 65.0), _record(3, 0.978, 81.0)]
    near = [_record(4, 0.974, 70.0), _record(5, 0.972, 90.0)]
    dense = {"accuracy": 0.973, "latency_ms": 91.0}
    assert zoom_limits(front + near, front, dense, "accuracy", "latency_ms") is None
    collapsed = _record(6, 0.37, 80.0)  # a candidate that lost its accuracy: 120x the front's accuracy span below
    x_limits, y_limits = zoom_limits(front + near + [collapsed], front, dense, "accuracy", "latency_ms")
    assert x_limits is None  # latency is not stretched: its axis stays whole
    assert y_limits == pytest.approx((0.973 - 0.0025, 0.978 + 0.0025))  # the front and dense, padded by half their span


def test_a_front_with_both_latencies_says_why_they_can_disagree():
    dense = {"accuracy": 0.98, "latency_ms": 40.0}
    point = {"trial": 3, "config": {"keep.1": 0.5}, "metrics": {"accuracy": 0.97, "latency_ms": 61.0}}
    document = {"device": "cpu", "baseline": {"config": {"keep.1": 1.0}, "metrics": dense}, "points": [point]}
    assert front_table(document).caption is None  # milliseconds alone: nothing to reconcile
    document["baseline"]["metrics"] = {**dense, "latency_ms_vs_dense": 1.0}
    point["metrics"]["latency_ms_vs_dense"] = 0.85  # the machine slowed meanwhile
    assert front_table(document).caption == BOTH_LATENCIES
