"""SparseViT's evolutionary search: rejection sampling under the budget, selection, valid children."""

import numpy as np
import optuna

from hwnas.search.evolution import Evolution
from hwnas.search.optimizers import make_optimizer
from hwnas.spaces import load_space


def _space():
    return load_space("swin-windows")


def _mean_ratio(config) -> float:
    return float(np.mean(list(config.values())))


def _study():
    return optuna.create_study(directions=["minimize"])


def test_first_population_meets_the_predicted_budget_and_the_order():
    space = _space()
    evolution = Evolution(space, population=12, seed=0, within_budget=lambda c: _mean_ratio(c) >= 0.5)
    proposals = evolution.ask(_study(), 12)
    assert len(proposals) == 12
    assert all(_mean_ratio(p.config) >= 0.5 for p in proposals)  # the identity is over this budget
    assert all(space.is_valid(p.config) for p in proposals)
    assert len({tuple(p.config.values()) for p in proposals}) > 8  # random, not one point
    # without a budget the identity (the measured baseline) is the free first parent
    assert Evolution(space, population=4, seed=0).ask(_study(), 4)[0].config == space.identity()


def _tell(evolution, proposals, objective, violation=lambda c: 0.0):
    for p in proposals:
        p.constraints = [violation(p.config)]
    evolution.tell(proposals, np.array([[objective(p.config)] for p in proposals]))


def test_children_descend_from_the_best_feasible_parents():
    space = _space()
    evolution = Evolution(space, population=16, seed=1, top_k=4, mutation_prob=0.1)
    first = evolution.ask(_study(), 16)
    # minimise the first objective: smaller mean ratio is better, but mean ratio < 0.2 breaks the budget
    _tell(evolution, first, objective=_mean_ratio, violation=lambda c: max(0.0, 0.2 - _mean_ratio(c)))
    parents = evolution._parents()
    assert len(parents) == 4
    feasible = sorted(_mean_ratio(p.config) for p in first if _mean_ratio(p.config) >= 0.2)
    assert sorted(_mean_ratio(c) for c in parents) == feasible[:4]
    children = evolution.ask(_study(), 16)
    assert all(space.is_valid(c.config) for c in children)
    # children stay near their parents: their mean ratios are close to the parents' (mutation 10 %)
    assert np.median([_mean_ratio(c.config) for c in children]) <= np.median(
        [_mean_ratio(p.config) for p in first]) + 0.05


def test_resume_seeds_the_parents_from_earlier_evaluations():
    space = _space()
    configs = [space.decode(np.full(4, i)) for i in range(5)]
    initial = [(c, np.array([_mean_ratio(c)]), np.array([0.0])) for c in configs]
    evolution = make_optimizer("evolution", space, 1, 1, population=6, seed=0, initial=initial)
    assert isinstance(evolution, Evolution)
    assert [_mean_ratio(c) for c in evolution._parents()] == [0.0, 0.1, 0.2]
    assert evolution.ask(_study(), 6)[0].config != space.identity()  # breeds, does not restart


def test_predicted_budget_scales_the_baseline_by_kept_flops():
    from hwnas.hwprofiles.cost_model import CostModel
    from hwnas.models.digits import build_digits_arch
    from hwnas.search.evolution import PredictedBudget
    from hwnas.search.objectives import parse_budget

    space = _space()
    cost_model = CostModel.for_space(space, build_digits_arch("digits-swin"))
    baseline = {"latency_ms": 10.0, "flops": 1e8}
    within = PredictedBudget(space, parse_budget("latency=8ms"), baseline, cost_model)
    assert not within(space.identity())  # dense: 10 ms predicted
    assert within({"ratio.0": 0.8, "ratio.1": 0.8, "ratio.2": 0.8, "ratio.3": 0.8})
    mild = {"ratio.0": 0.0, "ratio.1": 0.0, "ratio.2": 0.0, "ratio.3": 0.1}  # skips 1 of 4 windows of one small block
    assert not within(mild)
