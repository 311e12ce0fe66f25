"""The exact Pareto front over feasible records, and its hypervolume (pymoo's sort and indicator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from hwnas.search.objectives import Objective


@dataclass(frozen=True)
class Record:
    """One finished evaluation as the reports see it."""

    trial: int
    config: dict
    metrics: dict[str, float]
    feasible: bool
    config_hash: str


def pareto_front(records: list[Record], objectives: list[Objective]) -> list[Record]:
    """Non-dominated feasible records (one per configuration), sorted by the first objective, best first."""
    unique: dict[str, Record] = {}
    for record in records:
        if record.feasible:
            unique.setdefault(record.config_hash, record)
    candidates = list(unique.values())
    if not candidates:
        return []
    front = NonDominatedSorting().do(_minimised(candidates, objectives), only_non_dominated_front=True)
    chosen = [candidates[i] for i in front]
    return sorted(chosen, key=lambda r: objectives[0].minimised(r.metrics[objectives[0].metric]))


def hypervolume(front: list[Record], objectives: list[Objective], baseline: dict[str, float]) -> float:
    """Hypervolume of the front with every objective normalised by the dense baseline.

    In minimisation form each objective is divided by the baseline's value and the reference
    point is the baseline itself (1.0 for minimised metrics, 0.0 for maximised ones), so the
    value measures how far the front improves on the dense model and is comparable across runs
    of the same space. Points worse than the reference contribute nothing.
    """
    if not front:
        return 0.0
    scale = np.array([abs(baseline[o.metric]) or 1.0 for o in objectives])
    points = _minimised(front, objectives) / scale
    reference = np.array([0.0 if o.direction == "max" else 1.0 for o in objectives])
    return float(HV(ref_point=reference)(points))


def _minimised(records: list[Record], objectives: list[Objective]) -> np.ndarray:
    return np.array([[o.minimised(r.metrics[o.metric]) for o in objectives] for r in records], dtype=float)
