"""Budgets and objectives: unit parsing, constraint values, clear errors."""

import pytest

from hwnas.errors import HwnasError
from hwnas.search.objectives import as_predicted, parse_budget, parse_objectives
from hwnas.search.study import RunSettings


def test_budget_units():
    budget = parse_budget("latency=5ms,energy=2J,accuracy_drop=1%,flops=2G,params=300k")
    assert budget.limits == {"latency_ms": 5.0, "energy_mj": 2000.0, "accuracy_drop": pytest.approx(0.01),
                             "flops": 2e9, "params": 3e5}
    assert parse_budget("latency=250us").limits["latency_ms"] == pytest.approx(0.25)
    assert parse_budget("latency=0.5s").limits["latency_ms"] == 500.0
    assert parse_budget(None).limits == {}


def test_constraints_and_accuracy_drop_relative_to_baseline():
    budget = parse_budget("latency=5ms,accuracy_drop=1%")
    baseline = {"accuracy": 0.98, "latency_ms": 8.0}
    assert budget.feasible({"accuracy": 0.975, "latency_ms": 4.0}, baseline)
    assert not budget.feasible({"accuracy": 0.96, "latency_ms": 4.0}, baseline)
    assert not budget.feasible({"accuracy": 0.98, "latency_ms": 5.5}, baseline)
    assert budget.constraints({"accuracy": 0.98, "latency_ms": 6.0}, baseline) == pytest.approx([1.0, -0.01])


@pytest.mark.parametrize("text, message", [
    ("latency=fast", "malformed budget 'latency=fast'"),
    ("latency", "expected KEY=VALUE"),
    ("speed=5ms", "unknown budget 'speed'"),
    ("latency=5mJ", "malformed budget"),
    ("latency=0ms", "'latency=0ms' can never be met"),
    ("flops=0G", "'flops=0G' can never be met"),
    ("accuracy_drop=200%", "more than the whole accuracy"),
    ("latency=5ms,latency=4ms", "given twice"),
])
def test_malformed_budgets(text, message):
    with pytest.raises(HwnasError, match=message):
        parse_budget(text)


def test_objectives():
    objectives = parse_objectives("accuracy,latency")
    assert [(o.metric, o.direction) for o in objectives] == [("accuracy", "max"), ("latency_ms", "min")]
    assert objectives[0].minimised(0.9) == -0.9
    assert [o.metric for o in parse_objectives("accuracy,latency_vs_dense")] == ["accuracy", "latency_ms_vs_dense"]
    with pytest.raises(HwnasError, match="unknown objective 'speed'"):
        parse_objectives("accuracy,speed")


def test_latency_and_energy_become_predicted_on_absent_hardware():
    assert as_predicted("accuracy,latency,energy") == "accuracy,latency_predicted,energy_predicted"
    assert as_predicted("latency=5ms, accuracy_drop=1%") == "latency_predicted=5ms,accuracy_drop=1%"
    assert as_predicted("") == ""
    assert as_predicted("accuracy,latency_vs_dense") == "accuracy,latency_predicted"  # no side-by-side there
    assert parse_budget(as_predicted("latency=5ms")).limits == {"latency_ms_predicted": 5.0}


def test_a_relative_latency_budget_compares_with_the_dense_model():
    budget = parse_budget("latency=80%")
    assert budget.limits == {"latency_ms_vs_dense": 0.8}
    dense = {"latency_ms": 50.0}
    assert budget.feasible({"latency_ms": 40.0}, dense) and not budget.feasible({"latency_ms": 41.0}, dense)
    # a ratio measured side by side with the dense model wins over the ratio to the once-measured baseline
    assert not budget.feasible({"latency_ms": 30.0, "latency_ms_vs_dense": 0.85}, dense)
    assert budget.feasible({"latency_ms": 45.0, "latency_ms_vs_dense": 0.75}, dense)
    assert "80.0% of dense" in budget.describe()
    assert parse_budget("energy_predicted=50%").limits == {"energy_mj_predicted_vs_dense": 0.5}
    with pytest.raises(HwnasError, match="or % of dense"):
        parse_budget("latency=2x")


def test_what_a_study_reads_and_whether_it_measures_energy():
    settings = RunSettings(objectives="accuracy,latency_vs_dense", budget="accuracy_drop=1%,energy=50%")
    assert settings.metrics_read() == ["accuracy", "latency_ms", "accuracy", "energy_mj"]
    assert settings.measures_energy()  # a relative energy limit reads the measured energy
    assert not RunSettings(objectives="accuracy,latency").measures_energy()
    # the cost model's predicted energy is fitted on measurements; a hardware profile prices it without any
    assert RunSettings(objectives="accuracy,energy_predicted").measures_energy()
    assert not RunSettings(objectives="accuracy,energy_predicted", hwprofile={"name": "h100"}).measures_energy()
    assert RunSettings(objectives="accuracy,energy", hwprofile={"name": "cpu-here"}).measures_energy()
