"""LPViT's allocation: the knapsack solver, the optimizer on a synthetic cost model, and the CLI end to end."""

import itertools
import json

import numpy as np
import optuna
import pytest
import torch

from hwnas.cli import main
from hwnas.errors import HwnasError
from hwnas.hwprofiles.cost_model import CostModel, design_configs
from hwnas.models.registry import build_arch
from hwnas.pruning.block_obs import DEFAULT_LEVELS
from hwnas.search.allocation import LpvitAllocation, allocate, van_der_corput
from hwnas.search.objectives import parse_budget
from hwnas.search.study import RunSettings, StudyDir
from hwnas.spaces import config_hash, load_space


def convex_table(rng, rows=4, levels=10):
    """Per row: loss convex and rising with the level, cost falling linearly (like kept work)."""
    curvature = rng.uniform(0.2, 5.0, size=(rows, 1))
    weight = rng.uniform(0.5, 3.0, size=(rows, 1))
    x = np.linspace(0, 0.9, levels)[None, :]
    return curvature * x ** 2 * (1 + x), -weight * x


def best_by_brute_force(loss, cost, budget):
    best = np.inf
    for levels in itertools.product(range(loss.shape[1]), repeat=loss.shape[0]):
        rows = np.arange(len(levels))
        if cost[rows, levels].sum() <= budget:
            best = min(best, loss[rows, levels].sum())
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_meets_the_budget_and_beats_uniform(seed):
    rng = np.random.default_rng(seed)
    loss, cost = convex_table(rng, rows=4, levels=6)
    rows = np.arange(4)
    for uniform in range(1, 6):
        budget = cost[:, uniform].sum()  # what a uniform allocation at this level costs
        levels = allocate(loss, cost, budget)
        assert cost[rows, levels].sum() <= budget + 1e-12
        assert loss[rows, levels].sum() <= loss[:, uniform].sum() + 1e-12
        assert loss[rows, levels].sum() == pytest.approx(best_by_brute_force(loss, cost, budget), abs=1e-12)
    # rows of different sensitivity: a mid-range uniform allocation is strictly beaten
    budget = cost[:, 3].sum()
    assert loss[rows, allocate(loss, cost, budget)].sum() < loss[:, 3].sum()


def test_allocation_edge_cases():
    loss = np.array([[0.0, 1.0, np.inf], [0.0, 2.0, 5.0]])  # row 0 has one level fewer
    cost = np.array([[0.0, -1.0, 0.0], [0.0, -1.0, -2.0]])
    assert allocate(loss, cost, 0.0).tolist() == [0, 0]  # dense fits: nothing is pruned
    assert allocate(loss, cost, -1.0).tolist() == [1, 0]  # the cheaper loss pays for it
    assert allocate(loss, cost, -3.0).tolist() == [1, 2]  # the sparsest allocation
    assert allocate(loss, cost, -10.0).tolist() == [1, 2]  # impossible: the cheapest one


def test_van_der_corput_covers_the_range_evenly():
    points = [van_der_corput(i) for i in range(8)]
    assert points == [0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]


# ---- the optimizer on a synthetic cost model and synthetic losses ----------------------------
@pytest.fixture(scope="module")
def setup():
    """The default space, a cost model fitted to exact synthetic latencies, and per-layer losses
    whose sensitivity differs by layer kind (fc2 most, qkv least)."""
    space = load_space()
    model = CostModel.for_space(space, build_arch(space.model))
    coef = np.array([0.8, 0.4, 0.3, 0.5, 0.2, 0.6, 3.0, 1.0, 4.0, 2.5, 0.5])
    configs = design_configs(space)
    model.fit(configs, [{"latency_ms": float(model.features(c) @ coef)} for c in configs])
    sensitivity = {"qkv": 0.2, "proj": 1.0, "fc1": 0.5, "fc2": 3.0}
    levels = np.array(DEFAULT_LEVELS)
    losses = {block: {layer: (sensitivity[layer.rsplit(".", 1)[1]] * (1 + int(layer.split(".")[1]) / 6)
                              * levels ** 2 * (1.2 if block == 32 else 1.0)).tolist()
                      for layer in model.profile.layers}
              for block in (16, 32)}
    return space, model, losses


def summed_loss(space, model, losses, config):
    block = config["block"]
    total = 0.0
    for var in model.variables:
        if var.transform == "block_sparsity":
            index = int(np.argmin(np.abs(np.array(DEFAULT_LEVELS) - config[var.name])))
            total += sum(losses[block][layer][index] for layer in var.scope)
    return total


def test_allocation_under_a_budget_beats_uniform_at_equal_predicted_cost(setup):
    space, model, losses = setup
    identity = space.identity()
    uniform = {**identity, "sparsity.qkv": 0.5, "sparsity.proj": 0.5, "sparsity.fc1": 0.5, "sparsity.fc2": 0.5,
               "block": 16}
    budget = model.predict(uniform)["latency_ms_predicted"]
    optimizer = LpvitAllocation(space, model, losses, DEFAULT_LEVELS, parse_budget(f"latency={budget}ms"))
    config = optimizer.config_for(budget)
    assert model.predict(config)["latency_ms_predicted"] <= budget + 1e-9
    assert summed_loss(space, model, losses, config) < 0.9 * summed_loss(space, model, losses, uniform)
    assert all(config[f"keep.{i}"] == 1.0 for i in range(1, 6))  # LPViT leaves tokens alone


@pytest.mark.parametrize("budget", [None, "latency={}ms", "latency_predicted={}ms"])
def test_proposals_trace_a_front_within_the_budget(setup, budget):
    space, model, losses = setup
    dense = model.predict(space.identity())["latency_ms_predicted"]
    limit = 0.7 * dense
    parsed = parse_budget(budget.format(limit) if budget else None)
    optimizer = LpvitAllocation(space, model, losses, DEFAULT_LEVELS, parsed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optimizer.sampler)
    proposals = optimizer.ask(study, 6) + optimizer.ask(study, 6)
    assert len(proposals) == 12 and len({p.config_hash for p in proposals}) == 12
    assert config_hash(space.identity()) not in {p.config_hash for p in proposals}
    assert all(p.trial.params == p.config and space.is_valid(p.config) for p in proposals)
    costs = sorted(model.predict(p.config)["latency_ms_predicted"] for p in proposals)
    top = limit if budget else dense
    assert costs[-1] <= top + 1e-9
    assert costs[-1] - costs[0] > 0.4 * (top - optimizer.low)  # spread over the range, not piled up
    # on the front: no proposal has both a higher loss and a higher cost than another
    points = [(model.predict(p.config)["latency_ms_predicted"], summed_loss(space, model, losses, p.config))
              for p in proposals]
    assert not any(a[0] > b[0] + 1e-9 and a[1] > b[1] + 1e-9 for a in points for b in points)

    resumed = LpvitAllocation(space, model, losses, DEFAULT_LEVELS, parsed,
                              initial=[(p.config, None, None) for p in proposals])
    later = resumed.ask(study, 4)
    assert not {p.config_hash for p in later} & {p.config_hash for p in proposals}


def test_hardware_where_block_pruning_does_not_pay_is_one_clear_error(setup):
    """As measured on a busy 2-core CPU: kept linear work costs nothing extra, the block-sparse kernels do."""
    space, _, losses = setup
    model = CostModel.for_space(space, build_arch(space.model))
    coef = np.array([30.0, 90.0, 90.0, 90.0, 90.0, 90.0, 0.0, 0.0, 0.0, 0.0, 12.0])
    configs = design_configs(space)
    model.fit(configs, [{"latency_ms": float(model.features(c) @ coef)} for c in configs])
    with pytest.raises(HwnasError, match="predicts no block-sparsity allocation with a lower latency_ms_predicted"):
        LpvitAllocation(space, model, losses, DEFAULT_LEVELS)


def test_space_without_block_sparsity_is_refused(capsys, tmp_path):
    space = tmp_path / "tokens.yaml"
    space.write_text("name: tokens\nmodel: {name: digits-deit}\ndimensions:\n"
                     " - {name: keep, transform: token_keep, targets: [1, 2], values: [0.5, 1.0]}\n")
    code = main(["run", str(space), "--optimizer", "lpvit", "--out", str(tmp_path / "s"), "--workers", "0"])
    assert code == 2 and "lpvit allocates block_sparsity variables" in capsys.readouterr().err


@pytest.mark.slow
def test_lpvit_runs_end_to_end(tmp_path, capsys):
    """The default preset, in-process, from the CLI: allocations evaluated, predictions recorded, front reported.

    The study is created with a cost model already in it (fitted to synthetic latencies), so the
    test skips the ~27 calibration measurements; test_cost_model.py covers the fit inside a study.
    """
    out = tmp_path / "study"
    space = load_space()
    settings = RunSettings(objectives="accuracy,latency_predicted", optimizer="lpvit", trials=3, workers=0)
    StudyDir.create(out, space, settings).load()
    model = CostModel.for_space(space, build_arch(space.model))
    coef = np.array([10.0, 8.0, 8.0, 8.0, 8.0, 8.0, 30.0, 10.0, 40.0, 40.0, 5.0])
    configs = design_configs(space)
    model.fit(configs, [{"latency_ms": float(model.features(c) @ coef)} for c in configs]).save(out / "cost_model.json")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process evaluation: one thread keeps it quick when another job shares the cores
    try:
        code = main(["run", "--resume", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "pareto.json").read_text())
    assert document["optimizer"] == "lpvit" and document["trials"]["complete"] == 3
    assert document["predicted"]["latency_ms_predicted"]["n"] == 3
    for point in document["points"]:
        assert {"latency_ms", "latency_ms_predicted", "accuracy"} <= set(point["metrics"])
        assert all(point["config"][f"keep.{i}"] == 1.0 for i in range(1, 6))
    assert "latency_ms_predicted: median error" in (out / "report.md").read_text()
    assert main(["show", str(out)]) == 0
    assert "latency_ms_predicted: median error" in capsys.readouterr().out
