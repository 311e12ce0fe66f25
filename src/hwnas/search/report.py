"""What a study leaves for people: ``pareto.json``, the front as a table, ``report.md`` with ``pareto.png``."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

from rich.table import Table

from hwnas.search.objectives import LATENCY_VS_DENSE, format_metric
from hwnas.search.pareto import Record, dense_record, hypervolume, pareto_front

TABLE_METRICS = ("accuracy", "fidelity_kl", "latency_ms", "latency_ms_vs_dense", "latency_ms_predicted", "energy_mj",
                 "energy_mj_above_idle", "energy_mj_predicted", "flops", "params")
#: ``pareto.png`` adds a row zoomed on the front when the trials spread this many times wider than it
ZOOM_SPREAD = 3.0
#: under a front with both latencies, why they can disagree
BOTH_LATENCIES = ("latency_ms: timed when its trial ran; latency_ms_vs_dense: timed beside the dense model in the "
                  "same rounds, so the machine's drift between trials does not move it")


def pareto_document(study_dir, records: list[Record], baseline: dict) -> dict:
    """The ``pareto.json`` mapping of DESIGN.md (plus the hypervolume and the trial counts)."""
    objectives = study_dir.objectives
    front = pareto_front(records, objectives, dense_record(baseline, study_dir.budget))
    return {
        "objectives": {o.metric: o.direction for o in objectives},
        "budget": study_dir.budget.limits,
        "device": baseline.get("device"),
        "measurement": {k: baseline.get(k) for k in ("batch_size", "dtype", "threads")},
        "space": study_dir.space.name,
        "optimizer": study_dir.settings.optimizer,
        "baseline": {"config": baseline["config"], "metrics": baseline["metrics"]},
        "trials": {"complete": len(records), "feasible": sum(r.feasible for r in records)},
        "hypervolume": hypervolume(front, objectives, baseline["metrics"]),
        "predicted": prediction_errors(records, study_dir.path),
        "points": [{"trial": r.trial, "config": r.config, "metrics": r.metrics} for r in front],
    }


def prediction_errors(records: list[Record], study_path: Path | None = None) -> dict:
    """Per predicted metric, its relative error against the measured one over the trials holding both,
    with the cost model's error on its held-out calibration measurements (``cost_model.json``)."""
    from hwnas.hwprofiles.cost_model import PREDICTED, error_summary

    file = Path(study_path or "") / "cost_model.json"
    held_out = json.loads(file.read_text()).get("fit_error", {}) if study_path and file.is_file() else {}
    errors = {}
    for measured, predicted in PREDICTED.items():
        pairs = [(r.metrics[predicted], r.metrics[measured]) for r in records
                 if predicted in r.metrics and measured in r.metrics]
        if pairs:
            errors[predicted] = {**error_summary(*zip(*pairs)), "measured": measured,
                                 "held_out_at_fit": held_out.get(predicted)}
    return errors


def prediction_lines(errors: dict) -> list[str]:
    """One line per predicted metric: its median and max relative error against the measured metric."""
    lines = []
    for metric, e in errors.items():
        line = (f"{metric}: median error {100 * e['median_rel_error']:.1f}% (max {100 * e['max_rel_error']:.1f}%) "
                f"against the measured {e['measured']} of {e['n']} trials")
        fit = e.get("held_out_at_fit")
        if fit:
            line += (f"; {100 * fit['median_rel_error']:.1f}% (max {100 * fit['max_rel_error']:.1f}%) on "
                     f"{fit['n']} held-out calibration measurements")
        lines.append(line)
    return lines


def write_pareto(study_dir, records: list[Record], baseline: dict) -> Path:
    """Rewrite ``pareto.json`` atomically (a reader never sees half a file)."""
    path = study_dir.path / "pareto.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(pareto_document(study_dir, records, baseline), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def front_table(document: dict, title: str | None = None) -> Table:
    """A rich table of the front in ``document`` (a parsed pareto.json), baseline first."""
    base = document["baseline"]["metrics"]
    metrics = [m for m in TABLE_METRICS if m in base]
    table = Table(title=title or f"Pareto front · {document.get('device')}", title_justify="left",
                  caption=_latencies_note(metrics), caption_justify="left")
    table.add_column("trial", justify="right")
    for metric in metrics:
        table.add_column(metric, justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("config", overflow="fold")
    table.add_row("dense", *[format_metric(m, base[m]) for m in metrics], "1.00x", "", style="dim")
    for point in document["points"]:
        m = point["metrics"]
        table.add_row(str(point["trial"]), *[format_metric(k, m[k]) for k in metrics], f"{speedup(m, base):.2f}x",
                      _short_config(point["config"], document["baseline"]["config"]))
    return table


def _latencies_note(metrics: list[str]) -> str | None:
    return BOTH_LATENCIES if {"latency_ms", LATENCY_VS_DENSE} <= set(metrics) else None


def speedup(metrics: dict, base: dict) -> float:
    """Dense latency over the candidate's: the side-by-side ratio where it was measured (drift-free), else
    the ratio to the baseline's latency (measured, or predicted on absent hardware); NaN without either."""
    if metrics.get(LATENCY_VS_DENSE):
        return 1.0 / metrics[LATENCY_VS_DENSE]
    latency = "latency_ms" if "latency_ms" in base else "latency_ms_predicted"
    return base[latency] / metrics[latency] if metrics.get(latency) and base.get(latency) else float("nan")


def _short_config(config: dict, identity: dict) -> str:
    """Variables grouped by dimension (``keep=0.9/0.8/0.7``); groups equal to the unpruned model are left out."""
    groups: dict[str, list[tuple[str, object]]] = {}
    for name, value in config.items():
        groups.setdefault(name.split(".", 1)[0], []).append((name, value))
    parts = []
    for prefix, items in groups.items():
        if all(identity.get(name) == value for name, value in items):
            continue
        parts.append(f"{prefix}=" + "/".join(f"{v:g}" if isinstance(v, float) else str(v) for _, v in items))
    return " ".join(parts) or "(unpruned)"


def write_report(study_dir, records: list[Record], front: list[Record], baseline: dict, hv: float) -> Path:
    """``report.md`` with the front as a table and ``pareto.png`` (each pair of objectives)."""
    objectives = study_dir.objectives
    plot = _plot(study_dir.path / "pareto.png", records, front, baseline, study_dir)
    base = baseline["metrics"]
    metrics = [m for m in TABLE_METRICS if m in base]
    lines = [
        f"# hwnas study: {study_dir.space.name}",
        "",
        f"- device: {baseline.get('device')} (batch {baseline.get('batch_size')}, {baseline.get('dtype')}, "
        f"{baseline.get('threads')} threads)",
        f"- optimizer: {study_dir.settings.optimizer}, trials: {len(records)} complete, "
        f"{sum(r.feasible for r in records)} feasible",
        f"- objectives: {', '.join(f'{o.direction} {o.metric}' for o in objectives)}",
        f"- budget: {study_dir.budget.describe()}",
        f"- hypervolume (normalised by the dense baseline): {hv:.4f}",
        *[f"- {line}" for line in prediction_lines(prediction_errors(records, study_dir.path))],
        "",
        "| trial | " + " | ".join(metrics) + " | config |",
        "|---|" + "---|" * len(metrics) + "---|",
        "| dense | " + " | ".join(format_metric(m, base[m]) for m in metrics) + " | |",
    ]
    for r in front:
        lines.append(f"| {r.trial} | " + " | ".join(format_metric(m, r.metrics[m]) for m in metrics)
                     + f" | {_short_config(r.config, baseline['config'])} |")
    if note := _latencies_note(metrics):
        lines += ["", f"{note}."]
    if plot:
        lines += ["", f"![Pareto front]({plot.name})"]
    lines += ["", f"Explore every trial: `optuna-dashboard sqlite:///{(study_dir.path / 'study.db').resolve()}`", ""]
    path = study_dir.path / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(path: Path, records: list[Record], front: list[Record], baseline: dict, study_dir) -> Path | None:
    """One panel per pair of objectives; where the trials spread far beyond the front (a few collapsed
    candidates, say), a second row zooms on the front and the dense baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(study_dir.objectives, 2))
    if not pairs or not records:
        return None
    zooms = [zoom_limits(records, front, baseline["metrics"], a.metric, b.metric) for a, b in pairs]
    rows = 2 if any(zooms) else 1
    fig, axes = plt.subplots(rows, len(pairs), figsize=(6 * len(pairs), 4.5 * rows), squeeze=False)
    for column, ((a, b), zoom) in enumerate(zip(pairs, zooms)):
        limit = study_dir.budget.limits.get(b.metric)
        _draw_pair(axes[0][column], records, front, baseline, a, b, limit)
        if rows == 1:
            continue
        ax = axes[1][column]
        if zoom is None:  # another pair needed the zoom; this one shows whole above
            ax.set_visible(False)
            continue
        _draw_pair(ax, records, front, baseline, a, b, limit)
        x_limits, y_limits = zoom
        if x_limits:
            ax.set_xlim(*x_limits)
        if y_limits:
            ax.set_ylim(*y_limits)
        ax.set_title("near the front", fontsize=9)
    fig.suptitle(f"{study_dir.space.name} on {baseline.get('device')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def zoom_limits(records: list[Record], front: list[Record], base: dict, y: str, x: str
                ) -> tuple[tuple[float, float] | None, tuple[float, float] | None] | None:
    """Axis limits ``(x_limits, y_limits)`` around the front and the dense baseline, padded by half their span on
    each side, for each axis along which the trials spread ``ZOOM_SPREAD`` times as wide (None for the other);
    None where neither does."""
    limits = []
    for metric in (x, y):
        near = _finite([r.metrics.get(metric) for r in front] + [base.get(metric)])
        every = near + _finite([r.metrics.get(metric) for r in records])
        if not near:
            return None
        low, high = min(near), max(near)
        pad = 0.5 * (high - low) or 0.05 * abs(high) or 0.05
        spread = (max(every) - min(every)) / (high - low + 2 * pad)
        limits.append((low - pad, high + pad) if spread >= ZOOM_SPREAD else None)
    return None if limits == [None, None] else (limits[0], limits[1])


def _finite(values: list) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _draw_pair(ax, records: list[Record], front: list[Record], baseline: dict, a, b, limit: float | None) -> None:
    """Objective ``a`` against ``b``: the trials (over budget greyed), the front as steps, dense as a star."""
    infeasible = [r for r in records if not r.feasible]
    feasible = [r for r in records if r.feasible]
    for group, style in ((infeasible, dict(c="lightgrey", marker="x", label="over budget")),
                         (feasible, dict(c="tab:blue", marker="o", alpha=0.6, label="feasible"))):
        if group:
            ax.scatter([r.metrics[b.metric] for r in group], [r.metrics[a.metric] for r in group], **style)
    if front:
        ordered = sorted(front, key=lambda r: r.metrics[b.metric])
        ax.plot([r.metrics[b.metric] for r in ordered], [r.metrics[a.metric] for r in ordered], "o-",
                c="tab:red", drawstyle="steps-post", label="Pareto front")
    ax.scatter([baseline["metrics"][b.metric]], [baseline["metrics"][a.metric]], marker="*", s=200,
               c="black", label="dense", zorder=5)
    if limit is not None:
        ax.axvline(limit, ls="--", c="tab:orange", label=f"budget {format_metric(b.metric, limit)}")
    ax.set_xlabel(f"{b.metric} ({b.direction})")
    ax.set_ylabel(f"{a.metric} ({a.direction})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
