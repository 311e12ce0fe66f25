"""The study's cost model: fitted on the device once, before the search, when anything needs a prediction.

An objective or a budget on ``latency_predicted``/``energy_predicted``, or the ``lpvit``
optimizer, needs one. The fit measures ``design_configs`` (2 × variables + 2; the baseline is one
of them, already measured) and a few held-out random configurations end to end on the evaluator
pool — these are calibration measurements, not trials — fits, states its error on the held-out
ones, and saves ``cost_model.json`` in the study directory; ``--resume`` reuses that file.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from hwnas.errors import HwnasError
from hwnas.hwprofiles.cost_model import CostModel, design_configs, random_configs
from hwnas.progress import transient_progress
from hwnas.spaces import Config, config_hash

COST_MODEL_FILE = "cost_model.json"


def needs_cost_model(study_dir) -> bool:
    """Whether the study's objectives, budget or optimizer use predicted metrics that no hardware profile gives."""
    if study_dir.settings.optimizer == "lpvit":
        return True
    if study_dir.settings.hwprofile:  # the evaluator predicts from the hardware profile
        return False
    return any(m.endswith("_predicted") for m in study_dir.settings.metrics_read())


def study_cost_model(study_dir, pool, baseline: dict, console: Console, progress: bool = True) -> CostModel | None:
    """The study's fitted cost model (loaded, or measured and fitted now), or None when nothing needs it."""
    if not needs_cost_model(study_dir):
        return None
    path = study_dir.path / COST_MODEL_FILE
    model = CostModel.load(path) if path.is_file() else _fit(study_dir, pool, baseline, console, progress)
    missing = [m for m in study_dir.settings.metrics_read() if m.endswith("_predicted") and m not in model.metrics]
    if missing:
        raise HwnasError(f"the cost model predicts {', '.join(model.metrics)} only: {missing[0]} needs "
                         f"{missing[0].removesuffix('_predicted')} measurements to fit on (an energy counter)")
    return model


def _fit(study_dir, pool, baseline: dict, console: Console, progress: bool) -> CostModel:
    from hwnas.models.registry import build_arch

    space, seed = study_dir.space, study_dir.settings.seed
    model = CostModel.for_space(space, build_arch(space.model))
    fit = design_configs(space, seed)
    held_out = random_configs(space, max(4, len(space.dimensions) // 2), seed + 1, exclude=fit)
    known = {config_hash(baseline["config"]): baseline["metrics"]}
    todo = [c for c in fit + held_out if config_hash(c) not in known]
    known.update(_measure(pool, todo, console, progress))
    fit = [c for c in fit if config_hash(c) in known]
    held_out = [c for c in held_out if config_hash(c) in known]
    if len(fit) < 2:
        raise HwnasError("the cost model could not be fitted: too few calibration measurements succeeded")
    model.fit(fit, [known[config_hash(c)] for c in fit])
    model.fit_error = model.error(held_out, [known[config_hash(c)] for c in held_out])
    model.device = baseline.get("device")
    path = model.save(study_dir.path / COST_MODEL_FILE)
    for metric, error in model.fit_error.items():
        console.print(f"cost model: {metric} within {100 * error['median_rel_error']:.1f}% (median; max "
                      f"{100 * error['max_rel_error']:.1f}%) of {error['n']} held-out measurements, fitted on "
                      f"{len(fit)} · {path}", markup=False)
    return model


def _measure(pool, configs: list[Config], console: Console, progress: bool) -> dict[str, dict]:
    """Metrics of each configuration that evaluates (by hash); failures are left out, with a note."""
    measured = {}
    columns = (TextColumn("[bold]fitting the cost model"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with transient_progress(*columns, console=console, enabled=progress) as bar:
        task = bar.add_task("fit", total=len(configs))
        for outcome in pool.evaluate(configs):
            if outcome.error:
                console.print(f"[yellow]cost model: a calibration configuration failed: {outcome.error}")
            else:
                measured[config_hash(configs[outcome.index])] = outcome.metrics
            bar.advance(task)
    return measured
