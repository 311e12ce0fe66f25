"""Load a search space from YAML (a file or a preset name), with errors that name the file and key.

Schema (see ``src/hwnas/presets/*.yaml`` for complete examples)::

    name: digits-deit-tokens
    model: {name: digits-deit}               # built-in, or a timm name + checkpoint + kwargs
    data: {name: default}                    # or {imagefolder: DIR, labels: none|folder|imagenet}
    measure: {batch_size: 64, warmup: 3, repeats: 15}
    dimensions:
      - name: keep                           # variables keep.1 ... keep.5
        transform: token_keep
        targets: [1, 2, 3, 4, 5]
        values: {low: 0.3, high: 1.0, step: 0.1}   # or an explicit list
        order: non_increasing                # optional, over the targets in order
        stages: [[1, 2], [3, 4, 5]]          # optional: the order holds inside each stage only
      - name: sparsity                       # variables sparsity.qkv ... sparsity.fc2
        transform: block_sparsity
        targets: {qkv: "*.attn.qkv", proj: "*.attn.proj", fc1: "*.mlp.fc1", fc2: "*.mlp.fc2"}
        values: {low: 0.0, high: 0.9, step: 0.1}  # fraction of b x b blocks removed
      - name: block
        transform: block_size                # one space-level variable
        values: [16, 32]
      - name: tokens
        transform: token_method              # optional: ucc (default), ucc-blocks, tome, evit, random
        values: [ucc]
      - name: beta
        transform: spectral_weight           # optional: UCC's spectral share of the score (default 0.8)
        values: [0.5, 0.8]

    Targets are a list (variable NAME.TARGET each) or a mapping {label: target} (NAME.LABEL).
    ``block_sparsity`` targets are block indices (all linear layers of that block) or globs
    over linear-layer names. The paths ``model.checkpoint`` and ``data.imagefolder`` are relative to
    the working directory (``~`` expands); the space stores them absolute, so a study resumes, and
    its exports re-measure and fine-tune, from any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hwnas.errors import HwnasError
from hwnas.spaces.space import ORDERS, Dimension, Monotone, Space

#: Transforms a dimension may drive, with the value that leaves the model unchanged.
TRANSFORMS: dict[str, Any] = {
    "token_keep": 1.0,       # fraction of patch tokens a block processes
    "block_sparsity": 0.0,   # fraction of b x b weight blocks removed from a linear layer
    "block_size": None,      # b, a space-level choice
    "token_method": None,    # how token_keep cuts tokens: ucc (default), ucc-blocks, tome, evit, random
    "spectral_weight": None, # β of the ucc/ucc-blocks score: the spectral part's weight in [0, 1]
    "window_ratio": 0.0,     # fraction of Swin windows a block skips
}

_TOP_KEYS = {"name", "description", "model", "data", "measure", "dimensions"}
_DIM_KEYS = {"name", "transform", "targets", "values", "order", "stages"}
_MODEL_KEYS = {"name", "checkpoint", "kwargs"}
_DATA_KEYS = {"name", "imagefolder", "labels", "calib_fraction", "max_images"}
_MEASURE_KEYS = {"batch_size", "warmup", "repeats", "threads", "dtype", "versus_dense", "cuda_graph"}
_MEASURE_DTYPES = ("float32", "float16", "bfloat16")


def _check_measure(measure: dict, fail) -> None:
    """Each measurement setting has a usable value (a bad one would surface as an internal error mid-study)."""
    for key, least in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        value = measure.get(key)
        if value is None and key == "threads":
            continue  # threads: null keeps torch's default
        if key in measure and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise fail(f"measure.{key}", f"expected an integer >= {least}, got {value!r}")
    if "dtype" in measure and measure["dtype"] not in _MEASURE_DTYPES:
        raise fail("measure.dtype", f"expected one of {', '.join(_MEASURE_DTYPES)}, got {measure['dtype']!r}")
    for key in ("versus_dense", "cuda_graph"):
        if key in measure and not isinstance(measure[key], bool):
            raise fail(f"measure.{key}", f"expected true or false, got {measure[key]!r}")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("hwnas.presets").iterdir() if p.name.endswith(".yaml"))


def load_space(spec: str | Path | dict | None = None) -> Space:
    """A Space from a YAML file path, a preset name, an already-parsed mapping, or the default preset."""
    if isinstance(spec, dict):
        return space_from_dict(spec, origin="<mapping>")
    if spec is None:
        spec = "default"
    spec = str(spec)
    if spec in preset_names():
        text = resources.files("hwnas.presets").joinpath(f"{spec}.yaml").read_text()
        return space_from_dict(_parse(text, f"preset {spec}"), origin=f"preset {spec}")
    path = Path(spec)
    if not path.exists():
        raise HwnasError(f"space '{spec}' is neither a YAML file nor a preset ({', '.join(preset_names())})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise HwnasError(f"{path}: cannot read: {exc}") from None
    return space_from_dict(_parse(text, str(path)), origin=str(path))


def _parse(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise HwnasError(f"{origin}: not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise HwnasError(f"{origin}: expected a mapping with keys name, model, dimensions")
    return data


def space_from_dict(data: dict, origin: str = "<mapping>") -> Space:
    """Validate a parsed YAML mapping and build the Space."""

    def fail(key: str, message: str) -> HwnasError:
        return HwnasError(f"{origin}: {key}: {message}")

    _check_keys(data, _TOP_KEYS, ("name", "model", "dimensions"), fail)
    model = data["model"]
    if isinstance(model, str):
        model = {"name": model}
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise fail("model", "expected {name: MODEL[, checkpoint: FILE, kwargs: {...}]}")
    _check_keys(model, _MODEL_KEYS, (), lambda key, message: fail(f"model.{key}", message))
    data_spec = data.get("data", {"name": "default"})
    if isinstance(data_spec, str):
        data_spec = {"name": data_spec}
    if not isinstance(data_spec, dict):
        raise fail("data", "expected {name: default} or {imagefolder: DIR}")
    _check_keys(data_spec, _DATA_KEYS, (), lambda key, message: fail(f"data.{key}", message))
    # a path is relative to where the space is loaded; stored absolute, the study and its exports work from anywhere
    model, data_spec = _absolute_path(model, "checkpoint"), _absolute_path(data_spec, "imagefolder")
    measure = data.get("measure") or {}
    if not isinstance(measure, dict) or set(measure) - _MEASURE_KEYS:
        raise fail("measure", f"expected a mapping with keys among {', '.join(sorted(_MEASURE_KEYS))}")
    _check_measure(measure, fail)
    raw_dims = data["dimensions"]
    if not isinstance(raw_dims, list) or not raw_dims:
        raise fail("dimensions", "expected a non-empty list, one item per dimension (- name: ..., transform: ..., values: ...)")

    dimensions: list[Dimension] = []
    constraints: list[Monotone] = []
    for i, raw in enumerate(raw_dims):
        dims, cons = _dimension(raw, lambda k, m, i=i: fail(f"dimensions[{i}]{'.' + k if k else ''}", m))
        dimensions += dims
        constraints += cons
    names = [d.name for d in dimensions]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise fail("dimensions", f"variable '{duplicate}' is defined twice")
    return Space(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        model=model,
        data=data_spec,
        measure=measure,
        dimensions=dimensions,
        constraints=constraints,
        source={**data, "model": model, **({"data": data_spec} if "data" in data else {})},
    )


def _absolute_path(spec: dict, key: str) -> dict:
    """``spec`` with its path ``spec[key]`` (if any) made absolute: ``~`` expanded, relative to the working directory."""
    path = spec.get(key)
    if not isinstance(path, str) or not path:
        return spec
    return {**spec, key: str(Path(path).expanduser().absolute())}


def _check_keys(mapping: dict, allowed: set[str], required: tuple[str, ...], fail) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in mapping:
            raise fail(key, "missing")


def _dimension(raw: Any, fail) -> tuple[list[Dimension], list[Monotone]]:
    if not isinstance(raw, dict):
        raise fail("", "expected a mapping with name, transform, values")
    _check_keys(raw, _DIM_KEYS, ("name", "transform", "values"), fail)
    transform = raw["transform"]
    if transform not in TRANSFORMS:
        raise fail("transform", f"unknown transform '{transform}' (known: {', '.join(TRANSFORMS)})")
    values = _values(raw["values"], fail)
    identity = TRANSFORMS[transform]
    targets = raw.get("targets")
    if targets is None:
        dims = [Dimension(str(raw["name"]), transform, None, values, identity)]
        labels: dict = {}
    else:
        if isinstance(targets, list) and targets:
            labels = {t: t for t in targets}
        elif isinstance(targets, dict) and targets:
            labels = targets
        else:
            raise fail("targets", "expected a non-empty list, or a mapping {label: target}")
        dims = [Dimension(f"{raw['name']}.{label}", transform, t, values, identity) for label, t in labels.items()]

    constraints = []
    order = raw.get("order")
    if order is not None:
        if order not in ORDERS:
            raise fail("order", f"expected one of {', '.join(ORDERS)}")
        if targets is None:
            raise fail("order", "needs targets to order")
        stages = raw.get("stages") or [list(labels)]
        for stage in stages:
            if not isinstance(stage, list) or any(t not in labels for t in stage):
                raise fail("stages", "each stage must be a list of this dimension's targets (or labels)")
            if len(stage) > 1:
                constraints.append(Monotone(tuple(f"{raw['name']}.{t}" for t in stage), order))
    elif "stages" in raw:
        raise fail("stages", "only meaningful together with order")
    return dims, constraints


def _values(raw: Any, fail) -> tuple:
    if isinstance(raw, dict):
        if set(raw) != {"low", "high", "step"}:
            raise fail("values", "a range needs exactly low, high and step")
        low, high, step = raw["low"], raw["high"], raw["step"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high, step)):
            raise fail("values", "low, high and step must be numbers")
        if step <= 0 or high < low:
            raise fail("values", "needs step > 0 and high >= low")
        count = int(round((high - low) / step)) + 1
        if all(isinstance(v, int) for v in (low, high, step)):
            return tuple(range(low, high + 1, step))
        return tuple(float(round(v, 9)) for v in np.linspace(low, high, count))
    if isinstance(raw, list) and raw:
        if len(set(map(repr, raw))) != len(raw):
            raise fail("values", "values repeat")
        return tuple(raw)
    raise fail("values", "expected a non-empty list or {low, high, step}")
