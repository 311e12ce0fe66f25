"""A linear cost model of latency and energy, fitted on the device: LPViT's hardware-aware objective.

LPViT models latency and power as a function of the blocks each layer keeps, weighted by each
layer's measured cost on the target hardware, with no per-configuration look-up table. Here a
configuration's features are, per searchable variable, the dense work it keeps (a fraction of
the dense model's FLOPs), plus an intercept; the coefficients (ms, or mJ, per model's worth of
that work) are fitted with non-negative least squares to a handful of end-to-end measurements
on the device (relative residuals, so small models weigh as much as large ones). ``predict``
then costs microseconds and gives ``latency_ms_predicted`` (and ``energy_mj_predicted`` where
energy was measured) — always labelled predicted, never presented as measured.

One rule per transform (``FEATURE_RULES``): its *scope* (the layers or blocks a variable covers,
resolved once on the architecture) and its *feature* (the work a value keeps there):

* ``block_sparsity``: Σ over its layers of (1 − sparsity) × the layer's dense FLOPs × the fraction
  of tokens the layer's block processes;
* ``token_keep``: Σ over the blocks whose token count it sets (its block up to the next
  token_keep target) of that block's token fraction × the block's dense FLOPs (attention,
  norms and activations scale with tokens too); token counts follow ``pruning/tokens.py``;
* ``block_size``: the kept work of the pruned layers (sparsity > 0) × (smallest b / b)², which
  is proportional to the number of b×b blocks their kernels multiply (per-block overhead);
* ``window_ratio``: (1 − ratio) × the target block's dense FLOPs (target: the block's index in
  model order, or its module name);
* ``token_method``: none — it chooses which tokens are cut, not how many.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from hwnas.errors import HwnasError
from hwnas.spaces import Config, Dimension, Space, config_hash

if TYPE_CHECKING:  # torch is imported where FLOPs are counted, so reports can read errors without it
    from torch import nn

#: measured metric -> the predicted metric fitted to it
PREDICTED = {"latency_ms": "latency_ms_predicted", "energy_mj": "energy_mj_predicted"}
_FORMAT = "hwnas.cost_model"
_VERSION = 1
_BLOCK = re.compile(r"(?:^|\.)blocks\.\d+$")


@dataclass
class ModelProfile:
    """What the features need from an architecture: dense FLOPs per layer and per block, token counts."""

    flops: float  # the dense model, one image
    layers: dict[str, float]  # prunable linear layer -> dense FLOPs
    blocks: dict[str, float]  # transformer block (model order) -> dense FLOPs
    num_patches: int | None = None  # ViT patch tokens (token_keep), None for other models
    num_prefix_tokens: int = 0

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelProfile:
        """Count ``model``'s FLOPs on one image, per module (PyTorch's FlopCounterMode)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from hwnas.pruning.block_obs import find_linear_layers

        if input_shape is None:
            embed = getattr(model, "patch_embed", None)
            if embed is None or not hasattr(embed, "img_size"):
                raise HwnasError(f"cannot tell the input size of {type(model).__name__}; pass input_shape")
            input_shape = (embed.proj.in_channels, *embed.img_size)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros((1, *input_shape)))
        root = type(model).__name__
        per_module = {name.removeprefix(root).removeprefix("."): sum(ops.values())
                      for name, ops in counter.get_flop_counts().items()}
        linear = find_linear_layers(model)
        blocks = [name for name, _ in model.named_modules() if _BLOCK.search(name)]
        patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        return cls(float(counter.get_total_flops()), {n: float(per_module.get(n, 0)) for n in linear},
                   {b: float(per_module.get(b, 0)) for b in blocks},
                   int(patches) if patches and hasattr(model, "num_prefix_tokens") else None,
                   int(getattr(model, "num_prefix_tokens", 0)))

    def block_of(self, layer: str) -> str | None:
        """The block a layer belongs to (the longest block name prefixing it)."""
        owners = [b for b in self.blocks if layer.startswith(b + ".")]
        return max(owners, key=len) if owners else None


@dataclass
class Variable:
    """One searchable variable as the cost model sees it: its transform and the layers/blocks it covers."""

    name: str
    transform: str
    scope: list[str]
    values: list = field(default_factory=list)


class Kept:
    """What one configuration keeps, shared by the feature rules: sparsity per layer, token fraction per block."""

    def __init__(self, profile: ModelProfile, variables: list[Variable], config: Config):
        self.profile = profile
        self.sparsity: dict[str, float] = {}
        counts: dict[int, int] = {}
        for var in variables:
            value = config[var.name]
            if var.transform == "block_sparsity":
                self.sparsity.update(dict.fromkeys(var.scope, float(value)))  # later targets win, as in layer_levels
            elif var.transform == "token_keep" and float(value) < 1.0:
                # the patch tokens a block keeps, as tokens.keep_counts rounds them
                counts[_block_index(var.scope[0])] = max(1, round(float(value) * profile.num_patches))
        self.tokens: dict[str, float] = {}
        if profile.num_patches:
            full = profile.num_prefix_tokens + profile.num_patches
            current = profile.num_patches
            for index in range(len(profile.blocks)):
                current = min(current, counts.get(index, current))  # a block never gets back dropped tokens
                self.tokens[f"blocks.{index}"] = (profile.num_prefix_tokens + current) / full

    def token_fraction(self, block: str | None) -> float:
        return self.tokens.get(block, 1.0) if block else 1.0

    def layer_work(self, layer: str) -> float:
        """Dense FLOPs × kept fraction × token fraction of one linear layer."""
        return (1 - self.sparsity.get(layer, 0.0)) * self.profile.layers[layer] * self.token_fraction(
            self.profile.block_of(layer))


@dataclass(frozen=True)
class Rule:
    """How one transform enters the cost model: the names it covers, and the work a configuration keeps there."""

    scope: Callable[[nn.Module, ModelProfile, Space, Dimension], list[str]]
    feature: Callable[[Kept, Variable, object], float]  # in FLOPs; divided by the model's FLOPs


def _layers_of_target(model, profile, space, dim) -> list[str]:
    from hwnas.pruning.block_pruner import resolve_targets

    return resolve_targets(model, dim.target)


def _token_blocks(model, profile, space, dim) -> list[str]:
    if not profile.num_patches:
        raise HwnasError(f"{dim.name}: token_keep needs a ViT with patch tokens; {type(model).__name__} has none")
    targets = sorted(int(d.target) for d in space.dimensions if d.transform == "token_keep")
    later = [t for t in targets if t > int(dim.target)]
    stop = later[0] if later else len(profile.blocks)
    return [f"blocks.{i}" for i in range(int(dim.target), stop)]


def _pruned_layers(model, profile, space, dim) -> list[str]:
    layers = [_layers_of_target(model, profile, space, d) for d in space.dimensions if d.transform == "block_sparsity"]
    return list(dict.fromkeys(name for group in layers for name in group))


def _target_block(model, profile, space, dim) -> list[str]:
    blocks = list(profile.blocks)
    if isinstance(dim.target, int) and 0 <= dim.target < len(blocks):
        return [blocks[dim.target]]
    if dim.target in profile.blocks:
        return [dim.target]
    raise HwnasError(f"{dim.name}: target {dim.target!r} is not a block of {type(model).__name__} "
                     f"(an index 0..{len(blocks) - 1} or a name like {blocks[0] if blocks else '-'})")


def _kept_layers(kept: Kept, var: Variable, value) -> float:
    return sum(kept.layer_work(layer) for layer in var.scope)


def _kept_tokens(kept: Kept, var: Variable, value) -> float:
    return sum(kept.token_fraction(block) * kept.profile.blocks[block] for block in var.scope)


def _kept_blocks(kept: Kept, var: Variable, value) -> float:
    smallest = min(int(v) for v in var.values)
    pruned = [layer for layer in var.scope if kept.sparsity.get(layer, 0.0) > 0]
    return sum(kept.layer_work(layer) for layer in pruned) * (smallest / int(value)) ** 2


def _no_scope(model, profile, space, dim) -> list[str]:
    return []


def _no_work(kept: Kept, var: Variable, value) -> float:
    return 0.0


def _kept_windows(kept: Kept, var: Variable, value) -> float:
    return sum((1 - float(value)) * kept.profile.blocks[block] for block in var.scope)


FEATURE_RULES: dict[str, Rule] = {
    "block_sparsity": Rule(_layers_of_target, _kept_layers),
    "token_keep": Rule(_token_blocks, _kept_tokens),
    "block_size": Rule(_pruned_layers, _kept_blocks),
    "window_ratio": Rule(_target_block, _kept_windows),
    "token_method": Rule(_no_scope, _no_work),  # which tokens are cut, not how many
    "spectral_weight": Rule(_no_scope, _no_work),
}


class CostModel:
    """Latency (and energy) of a configuration of one space = intercept + Σ coefficient × kept work."""

    def __init__(self, space_name: str, profile: ModelProfile, variables: list[Variable]):
        self.space_name = space_name
        self.profile = profile
        self.variables = variables
        self.coefficients: dict[str, list[float]] = {}  # measured metric -> [intercept, one per variable]
        self.fit_error: dict[str, dict] = {}  # predicted metric -> held-out error summary
        self.points: list[dict] = []  # the measurements it was fitted to
        self.device: str | None = None

    @classmethod
    def for_space(cls, space: Space, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> CostModel:
        """An unfitted model of ``space`` on ``model``'s architecture (weights do not matter)."""
        profile = ModelProfile.of(model, input_shape)
        variables = []
        for dim in space.dimensions:
            rule = FEATURE_RULES.get(dim.transform)
            if rule is None:
                raise HwnasError(f"the cost model has no feature rule for transform '{dim.transform}' "
                                 f"(known: {', '.join(FEATURE_RULES)})")
            scope = rule.scope(model, profile, space, dim)
            variables.append(Variable(dim.name, dim.transform, scope, list(dim.values)))
        return cls(space.name, profile, variables)

    @property
    def metrics(self) -> list[str]:
        """The predicted metrics this model gives (once fitted)."""
        return [PREDICTED[m] for m in self.coefficients]

    def features(self, config: Config) -> np.ndarray:
        """[1, kept work of each variable / dense model FLOPs]."""
        kept = Kept(self.profile, self.variables, config)
        work = [FEATURE_RULES[v.transform].feature(kept, v, config[v.name]) for v in self.variables]
        return np.array([1.0, *work]) / np.array([1.0, *[self.profile.flops] * len(work)])

    def fit(self, configs: list[Config], measurements: list[dict[str, float]]) -> CostModel:
        """Non-negative least squares on relative residuals, for every metric of PREDICTED all measurements hold."""
        from scipy.optimize import nnls

        if len(configs) != len(measurements) or not configs:
            raise HwnasError("the cost model needs one measurement per configuration, and at least one")
        features = np.array([self.features(c) for c in configs])
        self.coefficients = {}
        for metric in PREDICTED:
            if not all(metric in m for m in measurements):
                continue
            y = np.array([m[metric] for m in measurements], dtype=float)
            if np.any(y <= 0):
                raise HwnasError(f"cannot fit the cost model: a measured {metric} is not positive")
            coef, _ = nnls(features / y[:, None], np.ones(len(y)))
            self.coefficients[metric] = [float(c) for c in coef]
        if not self.coefficients:
            raise HwnasError(f"cannot fit the cost model: the measurements hold none of {', '.join(PREDICTED)}")
        self.points = [{"config": c, **{k: m[k] for k in PREDICTED if k in m}} for c, m in zip(configs, measurements)]
        return self

    def predict(self, config: Config) -> dict[str, float]:
        """``{"latency_ms_predicted": x[, "energy_mj_predicted": y]}``."""
        if not self.coefficients:
            raise HwnasError("the cost model is not fitted")
        x = self.features(config)
        return {PREDICTED[m]: float(x @ np.array(c)) for m, c in self.coefficients.items()}

    def error(self, configs: list[Config], measurements: list[dict[str, float]]) -> dict[str, dict]:
        """Per predicted metric, the relative error against end-to-end measurements (median, max, n)."""
        report = {}
        for metric, predicted in PREDICTED.items():
            pairs = [(self.predict(c)[predicted], m[metric]) for c, m in zip(configs, measurements)
                     if metric in m and metric in self.coefficients]
            if pairs:
                report[predicted] = error_summary(*zip(*pairs))
        return report

    # ---- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "space": self.space_name, "device": self.device,
                "profile": asdict(self.profile), "variables": [asdict(v) for v in self.variables],
                "features": ["intercept", *[v.name for v in self.variables]], "coefficients": self.coefficients,
                "fit_error": self.fit_error, "points": self.points}

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (no pickle)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != _FORMAT or data.get("version") != _VERSION:
                raise HwnasError(f"{path} is not a {_FORMAT} v{_VERSION} file")
            model = cls(data["space"], ModelProfile(**data["profile"]), [Variable(**v) for v in data["variables"]])
            model.coefficients = {k: [float(x) for x in v] for k, v in data["coefficients"].items()}
            model.fit_error, model.points, model.device = data["fit_error"], data["points"], data["device"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HwnasError(f"cannot read cost model {path}: {exc}") from None
        return model


def error_summary(predicted, measured) -> dict:
    """Median and max of |predicted − measured| / measured, and how many pairs."""
    predicted, measured = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    errors = np.abs(predicted - measured) / measured
    return {"median_rel_error": float(np.median(errors)), "max_rel_error": float(errors.max()), "n": int(len(errors))}


def design_configs(space: Space, seed: int = 0, n: int | None = None) -> list[Config]:
    """Distinct valid configurations to fit on (default 2 × variables + 2): the unpruned one, each
    variable that has an unpruned value alone at its most aggressive value (with the variables
    after it in an ordering constraint, so the repair keeps it where it is), uniform levels of
    all variables, then random ones."""
    n = n or 2 * len(space.dimensions) + 2
    identity = space.identity()
    aggressive = {d.name: d.values[0] if d.values[-1] == identity[d.name] else d.values[-1] for d in space.dimensions}
    candidates = [identity]
    for dim in space.dimensions:
        if dim.identity is None:  # e.g. block_size: alone, it changes nothing
            continue
        name = dim.name
        config = {**identity, name: aggressive[name]}
        for constraint in space.constraints:
            if name in constraint.variables and not constraint.holds(config):
                later = constraint.variables[constraint.variables.index(name):]
                config.update({v: aggressive[v] for v in later})
        candidates.append(space.repair(config))
    for fraction in (0.25, 0.5, 0.75):
        candidates.append(space.repair({d.name: d.values[round(fraction * (len(d.values) - 1))]
                                        if aggressive[d.name] == d.values[-1]
                                        else d.values[round((1 - fraction) * (len(d.values) - 1))]
                                        for d in space.dimensions}))
    chosen = _distinct(candidates)[:n]
    return chosen + random_configs(space, n - len(chosen), seed, exclude=chosen)


def random_configs(space: Space, n: int, seed: int = 0, exclude: list[Config] = ()) -> list[Config]:
    """``n`` distinct random valid configurations not in ``exclude`` (fewer if the space is smaller)."""
    rng = np.random.default_rng(seed)
    low, high = space.bounds()
    seen = {config_hash(c) for c in exclude}
    out = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        config = space.decode(rng.integers(low, high + 1))
        if config_hash(config) not in seen:
            seen.add(config_hash(config))
            out.append(config)
    return out


def _distinct(configs: list[Config]) -> list[Config]:
    """``configs`` without repeats, first occurrences in order."""
    seen: dict[str, Config] = {}
    for config in configs:
        seen.setdefault(config_hash(config), config)
    return list(seen.values())


def _block_index(block: str) -> int:
    return int(block.rsplit(".", 1)[1])
