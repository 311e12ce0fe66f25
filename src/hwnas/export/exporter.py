"""Export a study's chosen point as a deployable model, and load it back.

``OUT/model.safetensors`` holds the pruned model's state dict — block-sparse layers compactly,
as their kept b×b blocks plus BSR indices; ``OUT/hwnas.json`` says how to rebuild its structure
(base model, space, configuration, block-sparse layers and their path per device) and what the study
measured, on which hardware. ``load(OUT)`` builds the architecture, applies the same structural
transforms, puts block-sparse kernel layers where the export has them and loads the weights
(strictly), so the result computes what the evaluated candidate computed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import safetensors.torch
from optuna.trial import TrialState
from torch import Tensor, nn

import hwnas
from hwnas.errors import HwnasError
from hwnas.evaluators.evaluator import Evaluator
from hwnas.kernels.block_sparse import BlockSparseLinear, BsrWeight
from hwnas.models.registry import build_arch
from hwnas.pruning.apply import apply_config, apply_structure, uses_default_spectral_weight
from hwnas.pruning.block_layers import calibrate_block_sparse
from hwnas.pruning.token_methods import DEFAULT_TOKEN_METHOD, EARLIER_SPECTRAL_WEIGHT
from hwnas.search.objectives import LATENCY_VS_DENSE
from hwnas.search.study import StudyDir, read_pareto
from hwnas.spaces import space_from_dict

FORMAT = "hwnas-export/1"
#: per hwnas version, the token methods its exports name that now have another name: until 0.1.0, ``ucc`` ranked
#: by every block's class attention, what ``ucc-blocks`` does now
RENAMED_TOKEN_METHODS = {"0.1.0": {"ucc": "ucc-blocks"}}
PICKS = {"latency": "latency_ms", "accuracy": "accuracy", "energy": "energy_mj", "fidelity": "fidelity_kl"}


def choose_trial(study_dir: StudyDir, trial: int | None, pick: str | None) -> dict:
    """The finished trial named by ``--trial``, or the front's best point by ``--pick``."""
    study = study_dir.load()
    if trial is not None:
        found = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
        if not found:
            raise HwnasError(f"{study_dir.path} has no trial {trial}")
        if found[0].state != TrialState.COMPLETE:
            raise HwnasError(f"trial {trial} did not complete ({found[0].state.name.lower()}); pick another")
        attrs = found[0].user_attrs
        return {"trial": trial, "config": attrs["config"], "metrics": attrs["metrics"], "feasible": attrs["feasible"]}
    document = read_pareto(study_dir.path)
    points = document["points"]
    if not points:
        if document.get("trials", {}).get("feasible"):
            raise HwnasError(f"{study_dir.path}: no feasible candidate improves on the dense model, so its front is "
                             "empty; search longer, or export a trial with --trial ID")
        raise HwnasError(f"{study_dir.path} has no feasible point to export")
    pick = pick or "latency"
    if pick not in PICKS:
        raise HwnasError(f"unknown --pick '{pick}' (use one of {', '.join(PICKS)})")
    # on absent hardware a study has the predicted latency and energy only
    metric = next((m for m in (PICKS[pick], f"{PICKS[pick]}_predicted") if m in points[0]["metrics"]), None)
    if metric is None:
        raise HwnasError(f"--pick {pick}: the study has no {PICKS[pick]} (measured or predicted)")
    if metric == "latency_ms" and all(LATENCY_VS_DENSE in p["metrics"] for p in points):
        metric = LATENCY_VS_DENSE  # timed side by side with the dense model: what drift between trials leaves alone
    best = max if metric == "accuracy" else min
    point = best(points, key=lambda p: p["metrics"][metric])
    return {**point, "feasible": True}


def export_model(study_path: str | Path, out: str | Path, trial: int | None = None, pick: str | None = None) -> Path:
    """Write ``OUT/model.safetensors`` and ``OUT/hwnas.json`` for the chosen trial."""
    check_export_target(out)
    study_dir = StudyDir.open(study_path)
    chosen = choose_trial(study_dir, trial, pick)
    space = study_dir.space
    evaluator = Evaluator(space)  # the study's model, data and pruned-weight databases
    model = apply_config(evaluator.model, space, chosen["config"], evaluator.pruner)
    calibrate_block_sparse(model, evaluator.latency_input)
    block_layers = {name: m.impl for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
    baseline = study_dir.load().user_attrs.get("baseline", {})
    manifest = {
        "format": FORMAT,
        "hwnas_version": hwnas.__version__,
        "model": space.model,
        "space": space.source,
        "config": chosen["config"],
        "block_layers": block_layers,
        "study": str(study_dir.path.resolve()),
        "trial": chosen["trial"],
        "feasible": chosen["feasible"],
        "metrics": chosen["metrics"],
        "baseline_metrics": baseline.get("metrics"),
        "hardware": {k: baseline.get(k) for k in ("device", "batch_size", "dtype", "threads")},
    }
    (out / "hwnas.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def check_export_target(out: str | Path) -> None:
    """Raise unless ``out`` can take an export: a new or empty directory, or an earlier export (replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HwnasError(f"{out} is a file: an export is a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "hwnas.json").is_file():
        raise HwnasError(f"{out} exists and is not an hwnas export: choose a new or empty directory")


def read_manifest(path: str | Path) -> dict:
    manifest_file = Path(path) / "hwnas.json"
    if not manifest_file.is_file():
        raise HwnasError(f"{path} is not an hwnas export (no hwnas.json)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HwnasError(f"{manifest_file} is damaged: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HwnasError(f"{manifest_file} is not an {FORMAT} manifest")
    missing = [k for k in ("model", "space", "config") if k not in manifest]
    if missing:
        raise HwnasError(f"{manifest_file} is damaged: missing {', '.join(missing)}")
    return manifest


def load(path: str | Path) -> nn.Module:
    """Rebuild an exported model: architecture + structural transforms + weights (no pickle)."""
    manifest = read_manifest(path)
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise HwnasError(f"{path} is damaged: model.safetensors is missing")
    origin = str(Path(path) / "hwnas.json")
    space_source, config = _as_it_ran(manifest, origin)
    space = space_from_dict(space_source, origin=origin)
    model = apply_structure(build_arch(manifest["model"]), space, config)
    try:
        state = safetensors.torch.load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise HwnasError(f"{weights} is damaged: {exc}") from None
    for name, impl in manifest.get("block_layers", {}).items():
        model.set_submodule(name, _block_sparse_layer(state, name, impl, weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise HwnasError(f"{weights} does not match the model described by hwnas.json: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def _as_it_ran(manifest: dict, origin: str) -> tuple[dict, dict]:
    """The export's space and configuration in this hwnas's terms: each token method named as this hwnas names
    what ran, and UCC's spectral weight set to the one its version used where the space did not choose one."""
    space, config = copy.deepcopy(manifest["space"]), dict(manifest["config"])
    version = manifest.get("hwnas_version")
    dimensions = space.get("dimensions") if isinstance(space, dict) else None
    earlier = version in RENAMED_TOKEN_METHODS or version in EARLIER_SPECTRAL_WEIGHT
    if not earlier or not isinstance(dimensions, list) or not any(
            isinstance(d, dict) and d.get("transform") == "token_keep" for d in dimensions):
        return space, config
    methods = [d for d in dimensions if isinstance(d, dict) and d.get("transform") == "token_method"]
    if not methods:  # the export ran the default method: name it
        methods = [{"name": "token_method", "transform": "token_method", "values": [DEFAULT_TOKEN_METHOD]}]
        dimensions.append(methods[0])
        config["token_method"] = DEFAULT_TOKEN_METHOD
    renamed = RENAMED_TOKEN_METHODS.get(version, {})
    for dimension in methods:
        dimension["values"] = [renamed.get(v, v) for v in dimension.get("values", [])]
        if dimension.get("name") in config:
            config[dimension["name"]] = renamed.get(config[dimension["name"]], config[dimension["name"]])
    if version in EARLIER_SPECTRAL_WEIGHT and uses_default_spectral_weight(space_from_dict(space, origin=origin)):
        weight = EARLIER_SPECTRAL_WEIGHT[version]
        dimensions.append({"name": "spectral_weight", "transform": "spectral_weight", "values": [weight]})
        config["spectral_weight"] = weight
    return space, config


def _block_sparse_layer(state: dict[str, Tensor], name: str, impl: dict[str, str] | str, weights: Path
                        ) -> BlockSparseLinear:
    """The kernel layer ``name`` rebuilt from its BSR tensors in the exported state dict.

    ``impl``: {device type: implementation}; earlier exports recorded the CPU's alone, as a string.
    """
    impl = {"cpu": impl} if isinstance(impl, str) else impl
    prefix = f"{name}."
    layer_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        return BlockSparseLinear(BsrWeight.from_state(layer_state), layer_state.get("bias"), impl=impl)
    except (KeyError, ValueError, RuntimeError, AttributeError) as exc:
        raise HwnasError(f"{weights} is damaged: block-sparse layer '{name}': {exc}") from None
