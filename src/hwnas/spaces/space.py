"""A search space as data: dimensions, ordering constraints, and the codecs the optimizers need.

A configuration is a plain ``dict`` from variable name to value (``{"keep.3": 0.7, ...}``).
pymoo sees it as an integer vector (one index into each dimension's values), Optuna as one
distribution per variable. Ordering constraints are *repaired* on decode, so every optimizer
only ever evaluates valid configurations.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import optuna

from hwnas.errors import HwnasError

Config = dict[str, Any]

ORDERS = ("non_increasing", "non_decreasing")


@dataclass(frozen=True)
class Dimension:
    """One searchable variable: the transform it drives, what it targets, and its ordered values."""

    name: str
    transform: str
    target: int | str | None
    values: tuple
    identity: Any = None  # the value that leaves the model unchanged, if there is one

    def index_of(self, value: Any) -> int:
        """Index of the allowed value nearest to ``value`` (floats from samplers may be off by an ulp)."""
        if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in self.values):
            return int(np.argmin([abs(v - value) for v in self.values]))
        try:
            return self.values.index(value)
        except ValueError:
            raise HwnasError(f"{self.name}={value!r} is not one of {list(self.values)}") from None

    def snap(self, value: Any) -> Any:
        """The allowed value nearest to ``value``; the identity stays itself even off the grid (the baseline)."""
        if self.identity is not None and value == self.identity:
            return self.identity
        return self.values[self.index_of(value)]

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """Ordered numeric values on a grid become Int/Float distributions with a step, others categorical."""
        values = self.values
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and len(values) > 1 and list(values) == sorted(values):
            steps = np.diff(np.asarray(values, dtype=float))
            if np.allclose(steps, steps[0]) and steps[0] > 0:
                if all(isinstance(v, int) for v in values):
                    return optuna.distributions.IntDistribution(values[0], values[-1], step=int(steps[0]))
                return optuna.distributions.FloatDistribution(
                    float(values[0]), float(values[-1]), step=float(_round(steps[0]))
                )
        return optuna.distributions.CategoricalDistribution(values)


@dataclass(frozen=True)
class Monotone:
    """Values of ``variables`` (in this order) must be non-increasing or non-decreasing."""

    variables: tuple[str, ...]
    order: str

    def repair(self, config: Config) -> Config:
        """A valid configuration holding the same values, sorted into the required order.

        Sorting keeps the multiset of values, so random samples stay spread over the whole range
        (a running min would pile them up at the aggressive end).
        """
        values = sorted((config[name] for name in self.variables), reverse=self.order == "non_increasing")
        return {**config, **dict(zip(self.variables, values))}

    def holds(self, config: Config) -> bool:
        seq = [config[name] for name in self.variables]
        pairs = zip(seq, seq[1:])
        if self.order == "non_increasing":
            return all(a >= b for a, b in pairs)
        return all(a <= b for a, b in pairs)


@dataclass
class Space:
    """A named search space bound to a model, with its dimensions, constraints and measurement settings."""

    name: str
    model: dict
    dimensions: list[Dimension]
    constraints: list[Monotone] = field(default_factory=list)
    data: dict = field(default_factory=lambda: {"name": "default"})
    measure: dict = field(default_factory=dict)
    description: str = ""
    source: dict = field(default_factory=dict)  # the YAML mapping it was built from

    def __post_init__(self) -> None:
        self._by_name = {d.name: d for d in self.dimensions}

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def dimension(self, name: str) -> Dimension:
        try:
            return self._by_name[name]
        except KeyError:
            raise HwnasError(f"unknown dimension '{name}'; this space has: {', '.join(self.names)}") from None

    def transforms(self) -> list[str]:
        return list(dict.fromkeys(d.transform for d in self.dimensions))

    def size(self) -> int:
        """Number of raw grid points (before ordering constraints)."""
        return math.prod(len(d.values) for d in self.dimensions)

    # ---- configurations -----------------------------------------------------------------------
    def identity(self) -> Config:
        """The unpruned configuration (first value where a dimension has no identity)."""
        return {d.name: d.identity if d.identity is not None else d.values[0] for d in self.dimensions}

    def validate(self, config: Config) -> Config:
        """Check names and values; snap values onto the grid; repair ordering. Returns a new dict."""
        unknown = set(config) - set(self.names)
        if unknown:
            raise HwnasError(f"unknown dimension(s) {sorted(unknown)}; this space has: {', '.join(self.names)}")
        missing = [n for n in self.names if n not in config]
        if missing:
            raise HwnasError(f"configuration is missing dimension(s): {', '.join(missing)}")
        return self.repair({d.name: d.snap(config[d.name]) for d in self.dimensions})

    def repair(self, config: Config) -> Config:
        for constraint in self.constraints:
            config = constraint.repair(config)
        return config

    def is_valid(self, config: Config) -> bool:
        return all(c.holds(config) for c in self.constraints)

    # ---- pymoo: integer vectors ---------------------------------------------------------------
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the integer encoding (inclusive)."""
        return np.zeros(len(self.dimensions), dtype=int), np.array([len(d.values) - 1 for d in self.dimensions])

    def decode(self, vector: Sequence[int]) -> Config:
        """Integer vector -> repaired configuration."""
        config = {d.name: d.values[int(round(i))] for d, i in zip(self.dimensions, vector)}
        return self.repair(config)

    def encode(self, config: Config) -> np.ndarray:
        return np.array([d.index_of(config[d.name]) for d in self.dimensions], dtype=int)

    # ---- Optuna: distributions ----------------------------------------------------------------
    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {d.name: d.distribution() for d in self.dimensions}

    def suggest(self, trial: optuna.Trial) -> Config:
        """Ask the trial for every variable, snap to the grid, repair ordering."""
        raw = {}
        for dim in self.dimensions:
            dist = dim.distribution()
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                raw[dim.name] = trial.suggest_categorical(dim.name, dist.choices)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                raw[dim.name] = trial.suggest_int(dim.name, dist.low, dist.high, step=dist.step)
            else:
                raw[dim.name] = trial.suggest_float(dim.name, dist.low, dist.high, step=dist.step)
        return self.repair({d.name: d.snap(raw[d.name]) for d in self.dimensions})

    # ---- printing ----------------------------------------------------------------------------
    def describe(self) -> str:
        lines = [f"space {self.name!r}: model {self.model.get('name')}, {len(self.dimensions)} variables, "
                 f"{self.size():,} grid points"]
        for dim in self.dimensions:
            lines.append(f"  {dim.name:<16} {dim.transform:<15} {_describe_values(dim)}")
        for c in self.constraints:
            lines.append(f"  constraint: {c.order.replace('_', '-')} over {', '.join(c.variables)}")
        return "\n".join(lines)


def _describe_values(dim: Dimension) -> str:
    """A grid as ``low..high step s (n values)`` when it is one, else the list."""
    dist = dim.distribution()
    step = getattr(dist, "step", None)
    if step is not None and len(dim.values) > 4:
        return f"{dim.values[0]:g}..{dim.values[-1]:g} step {step:g} ({len(dim.values)} values)"
    return str(list(dim.values))


def config_hash(config: Config) -> str:
    """Stable short hash of a configuration (key order and float noise do not matter)."""
    canonical = {k: _round(v) if isinstance(v, float) else v for k, v in sorted(config.items())}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def _round(value: float) -> float:
    return float(round(value, 9))
