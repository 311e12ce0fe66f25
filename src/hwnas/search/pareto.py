"""The exact Pareto front over feasible records, and its hypervolume (pymoo's sort and indicator).

The unpruned model competes on the front without being listed on it: a candidate it dominates (no
better on any objective, worse on one) is no solution, since deploying the dense model does as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from hwnas.search.objectives import Budget, Objective
from hwnas.spaces import config_hash

DENSE_TRIAL = -1  # the record of the unpruned configuration, measured before any trial


@dataclass(frozen=True)
class Record:
    """One finished evaluation as the reports see it."""

    trial: int
    config: dict
    metrics: dict[str, float]
    feasible: bool
    config_hash: str


def dense_record(baseline: dict, budget: Budget) -> Record:
    """The unpruned model's record, from a study's baseline (``{"config", "metrics"}``), feasible or not under ``budget``."""
    metrics = baseline["metrics"]
    return Record(DENSE_TRIAL, baseline["config"], metrics, budget.feasible(metrics, metrics),
                  config_hash(baseline["config"]))


def pareto_front(records: list[Record], objectives: list[Objective], dense: Record | None = None) -> list[Record]:
    """Non-dominated feasible records (one per configuration), sorted by the first objective, best first.

    ``dense`` (``dense_record``) competes without being listed, where it is feasible and measured on
    every objective: the records it dominates are left out.
    """
    unique: dict[str, Record] = {}
    for record in records:
        if record.feasible:
            unique.setdefault(record.config_hash, record)
    candidates = list(unique.values())
    if not candidates:
        return []
    competes = dense is not None and dense.feasible and all(o.metric in dense.metrics for o in objectives)
    competitors = candidates + [dense] if competes else candidates
    front = NonDominatedSorting().do(_minimised(competitors, objectives), only_non_dominated_front=True)
    chosen = [candidates[i] for i in front if i < len(candidates)]
    return sorted(chosen, key=lambda r: objectives[0].minimised(r.metrics[objectives[0].metric]))


def hypervolume(front: list[Record], objectives: list[Objective], baseline: dict[str, float]) -> float:
    """Hypervolume of the front with every objective normalised by the dense baseline.

    In minimisation form each objective is divided by the baseline's value and the reference
    point is the baseline itself (1.0 for minimised metrics, 0.0 for maximised ones), so the
    value measures how far the front improves on the dense model and is comparable across runs
    of the same space. Points worse than the reference contribute nothing. A metric on which the
    baseline scores 0 (``fidelity_kl``, the dense model's divergence from itself) stays in its own
    units with the reference 1: a KL of 1 nat.
    """
    if not front:
        return 0.0
    scale = np.array([abs(baseline[o.metric]) or 1.0 for o in objectives])
    points = _minimised(front, objectives) / scale
    reference = np.array([0.0 if o.direction == "max" else 1.0 for o in objectives])
    return float(HV(ref_point=reference)(points))


def _minimised(records: list[Record], objectives: list[Objective]) -> np.ndarray:
    return np.array([[o.minimised(r.metrics[o.metric]) for o in objectives] for r in records], dtype=float)
