"""Objectives and budgets: which metrics to optimise, and the hard limits a solution must meet.

``--objectives accuracy,latency`` names metrics to maximise or minimise; ``--budget
latency=5ms,energy=20mJ,accuracy_drop=1%`` becomes constraints ``value - limit <= 0`` (Optuna's
and pymoo's convention), so a candidate over any limit is infeasible. Latency and energy limits
may also be relative to the dense model measured in the same study: ``latency=80%`` limits
``latency_ms_vs_dense`` (latency / dense latency) to 0.8 — the ratio the evaluator measured side
by side with the dense model where it did (a study with a relative latency budget asks for that),
else the ratio to the study's baseline. The objective ``latency_vs_dense`` minimises that
side-by-side ratio itself: on a machine whose speed drifts between trials, it orders the front by
what each candidate saves, not by when it ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hwnas.errors import HwnasError

RELATIVE = "_vs_dense"  # suffix of a limit on a metric's ratio to the dense model's
LATENCY_VS_DENSE = "latency_ms" + RELATIVE  # also measured directly, side by side with the dense model

#: objective name -> (metric, direction)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "max"),
    "fidelity": ("fidelity_kl", "min"),
    "latency": ("latency_ms", "min"),
    "latency_vs_dense": (LATENCY_VS_DENSE, "min"),  # timed side by side with the dense model: immune to drift
    "energy": ("energy_mj", "min"),
    "latency_predicted": ("latency_ms_predicted", "min"),  # the fitted cost model's (hwprofiles/cost_model.py)
    "energy_predicted": ("energy_mj_predicted", "min"),
    "flops": ("flops", "min"),
    "params": ("params", "min"),
}

#: budget key -> (metric it limits, unit multipliers into the metric's unit)
_TIME = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}
_ENERGY = {"mj": 1.0, "j": 1e3, "uj": 1e-3}
_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_FRACTION = {"%": 1e-2, "": 1.0}
BUDGET_KEYS: dict[str, tuple[str, dict[str, float]]] = {
    "latency": ("latency_ms", _TIME),
    "energy": ("energy_mj", _ENERGY),
    "latency_predicted": ("latency_ms_predicted", _TIME),
    "energy_predicted": ("energy_mj_predicted", _ENERGY),
    "flops": ("flops", _COUNT),
    "params": ("params", _COUNT),
    "accuracy_drop": ("accuracy_drop", _FRACTION),
    "fidelity": ("fidelity_kl", {"": 1.0}),
}
UNITS = {"latency_ms": "ms", "energy_mj": "mJ", "energy_mj_above_idle": "mJ", "flops": "", "params": "", "accuracy_drop": "", "fidelity_kl": ""}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "min" | "max"

    @property
    def optuna_direction(self) -> str:
        return "maximize" if self.direction == "max" else "minimize"

    def minimised(self, value: float) -> float:
        """The value in minimisation form (pymoo, hypervolume)."""
        return -value if self.direction == "max" else value


def latency_objective(measure: dict) -> str:
    """The latency objective a space's measurement serves best: ``latency_vs_dense`` where it times each
    candidate beside the dense model (``measure: {versus_dense: true}``, as the default space does), else
    ``latency``."""
    return "latency_vs_dense" if measure.get("versus_dense") else "latency"


def parse_objectives(text: str) -> list[Objective]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 1:
        raise HwnasError("--objectives needs at least one name")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise HwnasError(f"unknown objective '{unknown[0]}' (known: {', '.join(OBJECTIVES)})")
    if len(set(names)) != len(names):
        raise HwnasError("--objectives names an objective twice")
    return [Objective(*OBJECTIVES[n]) for n in names]


@dataclass(frozen=True)
class Budget:
    """Hard limits: metric -> maximum allowed value (``accuracy_drop`` is relative to the baseline)."""

    limits: dict[str, float]

    def constraints(self, metrics: dict[str, float], baseline: dict[str, float]) -> list[float]:
        """``value - limit`` per limit, in a fixed order; all <= 0 means feasible."""
        return [self.value(metric, metrics, baseline) - limit for metric, limit in self.limits.items()]

    def feasible(self, metrics: dict[str, float], baseline: dict[str, float]) -> bool:
        return all(c <= 0 for c in self.constraints(metrics, baseline))

    @staticmethod
    def value(metric: str, metrics: dict[str, float], baseline: dict[str, float]) -> float:
        if metric == "accuracy_drop":
            return baseline["accuracy"] - metrics["accuracy"]
        if metric.endswith(RELATIVE) and metric not in metrics:
            base = metric.removesuffix(RELATIVE)
            return metrics[base] / baseline[base]
        return metrics[metric]

    def describe(self) -> str:
        return ", ".join(f"{m} <= {format_metric(m, v)}" for m, v in self.limits.items()) or "none"


def parse_budget(text: str | None) -> Budget:
    """``latency=5ms,energy=20mJ,accuracy_drop=1%`` -> Budget; one clear error for anything malformed."""
    limits: dict[str, float] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise HwnasError(f"malformed budget '{item}': expected KEY=VALUE, e.g. latency=5ms")
        if key not in BUDGET_KEYS:
            raise HwnasError(f"unknown budget '{key}' (known: {', '.join(BUDGET_KEYS)})")
        metric, units = BUDGET_KEYS[key]
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zA-Zµ%]*)\s*", raw)
        unit = match.group(2).lower() if match else None
        if unit == "%" and metric.startswith(("latency_ms", "energy_mj")):  # relative to the dense model
            metric, units = metric + RELATIVE, _FRACTION
        if match is None or unit not in units:
            allowed = ", ".join(u for u in units if u) or "none"
            allowed += ", or % of dense" if metric.startswith(("latency_ms", "energy_mj")) else ""
            raise HwnasError(f"malformed budget '{item}': expected a number with a unit ({allowed})")
        if metric in limits:
            raise HwnasError(f"budget '{key}' given twice")
        number = float(match.group(1))
        limit = number / 100 if unit == "%" else number * units[unit]  # 95 / 100 is exact, 95 * 0.01 not
        if limit == 0 and metric not in ("accuracy_drop", "fidelity_kl"):
            raise HwnasError(f"budget '{item}' can never be met: give a limit above 0")
        if metric == "accuracy_drop" and limit > 1:
            raise HwnasError(f"budget '{item}' allows a drop of more than the whole accuracy: give at most 100%")
        limits[metric] = limit
    return Budget(limits)


def as_predicted(text: str) -> str:
    """Objectives or a budget with latency and energy replaced by their predicted forms
    (``accuracy,latency`` -> ``accuracy,latency_predicted``; ``latency=5ms`` -> ``latency_predicted=5ms``).
    ``latency_vs_dense``, which only a side-by-side measurement gives, becomes ``latency_predicted``: the
    same ordering, as the predicted dense latency is one constant."""
    items = []
    for item in (text or "").split(","):
        key, sep, rest = item.strip().partition("=")
        key = key.removesuffix(RELATIVE)
        items.append((f"{key}_predicted" if key in ("latency", "energy") else key) + sep + rest)
    return ",".join(i for i in items if i)


def format_metric(metric: str, value: float) -> str:
    if metric in ("accuracy", "accuracy_drop"):
        return f"{100 * value:.2f}%"
    if metric.endswith(RELATIVE):
        return f"{100 * value:.1f}% of dense"
    if metric in ("flops", "params"):
        for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{suffix}"
        return f"{value:.0f}"
    unit = UNITS.get(metric.removesuffix("_predicted"), "")
    return f"{value:.4g}{' ' + unit if unit else ''}"
