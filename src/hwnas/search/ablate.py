"""``search ablate``: does searching the techniques together pay? The space whole against each technique alone.

Each technique of SPACE (``TECHNIQUES``: block sparsity, token keep, window ratios) gets a study of
the space restricted to its dimensions, under ``OUT/<technique>``, and the whole space one under
``OUT/joint``: same optimizer, seed and objectives (accuracy and latency on this machine, as its ratio
to the dense model's where the space measures ``versus_dense``). Each
technique's study runs the given trials and the joint one their sum, what the union of the single
fronts cost, so joint and union are compared at one budget. An existing study there is reused and
resumed. The front points of all of them, and the dense model (which every space reaches), are then
built once and timed side by side: ``rounds`` rounds of one call each, in a new shuffled order per
round, so a drifting machine favours no study; every front is recomputed on those measurements;
``union`` is the front of the single-technique points together. A joint point is *beyond the union*
when no union point is at least as accurate and as fast. Written to ``ablation.json`` (the
measurements, in the benchmark row format), ``ablation.md`` and ``ablation.png`` (each front, their
union and the joint front).
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hwnas.bench.record import bench_record, result_row, write_record
from hwnas.errors import HwnasError
from hwnas.hwprofiles.latency import Timing, device_name, measure_side_by_side
from hwnas.progress import transient_progress
from hwnas.pruning.apply import TECHNIQUES, apply_config
from hwnas.search.objectives import latency_objective, parse_objectives
from hwnas.search.pareto import Record, hypervolume, pareto_front
from hwnas.search.runner import run_study
from hwnas.search.study import RunSettings, StudyDir, read_pareto
from hwnas.spaces import Space, config_hash, load_space

OBJECTIVES = parse_objectives("accuracy,latency")  # of the fronts re-measured side by side
JOINT, UNION, DENSE = "joint", "union", "dense"
#: the plot's second panel shows accuracies this many points below dense (where a deployable point lies)
ZOOM_POINTS = 3.0


@dataclass
class AblationPoint:
    """A front point of one study (or the dense model) re-measured beside all the others."""

    space: str                  # the technique, ``joint`` or ``dense``
    trial: int | str
    config: dict                # in the whole space (variables the study lacked are unpruned)
    accuracy: float
    flops: float
    latencies_ms: list[float]   # one per round
    on_front: bool = False      # on its own space's re-measured front
    on_union: bool = False      # single-technique points: on the union's front
    beyond_union: bool = False  # joint points: no union point is as accurate and as fast

    @property
    def latency_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    def record(self, index: int) -> Record:
        metrics = {"accuracy": self.accuracy, "latency_ms": self.latency_ms}
        return Record(index, self.config, metrics, True, config_hash(self.config))


@dataclass
class Ablation:
    """The re-measured points of every study and the hypervolume of each front (``union`` too)."""

    points: list[AblationPoint]
    hypervolume: dict[str, float]

    @property
    def dense(self) -> AblationPoint:
        return next(p for p in self.points if p.space == DENSE)

    @property
    def techniques(self) -> list[str]:
        return list(dict.fromkeys(p.space for p in self.points if p.space not in (DENSE, JOINT)))

    def front(self, space: str) -> list[AblationPoint]:
        """The points on ``space``'s re-measured front, fastest first (``union``: the techniques' together)."""
        chosen = [p for p in self.points if (p.on_union if space == UNION else p.space == space and p.on_front)]
        return sorted(chosen, key=lambda p: p.latency_ms)

    def rows(self) -> list[dict]:
        """One benchmark row per point (``impl`` the space); the hypervolumes ride on every row of their space."""
        rows = []
        for p in self.points:
            timing = Timing(p.latency_ms, min(p.latencies_ms), max(p.latencies_ms), len(p.latencies_ms))
            metrics = {"accuracy": p.accuracy, "flops": p.flops, "on_front": p.on_front,
                       "hypervolume": self.hypervolume.get(p.space, 0.0), "latencies_ms": p.latencies_ms}
            if p.space not in (DENSE, JOINT):
                metrics.update(on_union=p.on_union, union_hypervolume=self.hypervolume[UNION])
            if p.space == JOINT:
                metrics["beyond_union"] = p.beyond_union
            rows.append(result_row({"space": p.space, "trial": p.trial, "config": p.config}, p.space, timing, metrics))
        return rows

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Ablation":
        points, volumes = [], {}
        for row in rows:
            m = row["metrics"]
            points.append(AblationPoint(row["impl"], row["case"]["trial"], row["case"]["config"], m["accuracy"],
                                        m["flops"], m["latencies_ms"], m["on_front"], m.get("on_union", False),
                                        m.get("beyond_union", False)))
            volumes[row["impl"]] = m["hypervolume"]
            if "union_hypervolume" in m:
                volumes[UNION] = m["union_hypervolume"]
        return cls(points, volumes)


def technique_sources(space: Space) -> dict[str, dict]:
    """The space restricted to each technique it holds, then the whole space (``joint``)."""
    held = {name: transforms for name, transforms in TECHNIQUES.items() if set(transforms) & set(space.transforms())}
    if len(held) < 2:
        raise HwnasError(f"ablate compares techniques searched alone and together; space '{space.name}' holds "
                         f"{' and '.join(held) or 'no technique'} only")
    sources = {name: {**space.source, "name": f"{space.name}-{name}",
                      "dimensions": [d for d in space.source["dimensions"] if d["transform"] in transforms]}
               for name, transforms in held.items()}
    return {**sources, JOINT: space.source}


def ablate(space: Space, out: str | Path, settings: RunSettings, rounds: int = 15, console: Console | None = None,
           progress: bool = True) -> Ablation:
    """Run (or resume) one study per technique, of ``settings.trials`` trials, and one of the whole space,
    of their sum, under ``out`` (objectives accuracy and latency), then re-measure their fronts side by side."""
    console = console or Console(stderr=True)
    fronts: dict[str, list[dict]] = {}
    sources = technique_sources(space)
    for name, source in sources.items():
        trials = settings.trials * (len(sources) - 1) if name == JOINT else settings.trials
        study_settings = replace(settings, objectives=f"accuracy,{latency_objective(space.measure)}", trials=trials)
        study_dir = StudyDir.reuse_or_create(Path(out) / name, load_space(source), study_settings)
        console.print(f"[bold]{name}[/]: {', '.join(study_dir.space.transforms())}")
        run_study(study_dir, console, progress)
        fronts[name] = read_pareto(study_dir.path)["points"]
    return remeasure_fronts(space, fronts, settings.device, rounds, console if progress else None)


def remeasure_fronts(space: Space, fronts: dict[str, list[dict]], device: str = "cpu", rounds: int = 15,
                     console: Console | None = None) -> Ablation:
    """Build every front point and the dense model once, time them side by side in ``rounds`` shuffled
    rounds (one call of each per round), and mark the fronts."""
    from hwnas.evaluators.evaluator import Evaluator

    identity = space.identity()
    points = [AblationPoint(DENSE, DENSE, identity, 0.0, 0.0, [])] + [
        AblationPoint(name, p["trial"], {**identity, **p["config"]}, 0.0, 0.0, [])
        for name, front in fronts.items() for p in front]
    evaluator = Evaluator(space, device=device)
    calls = {}
    with transient_progress(console=console, enabled=console is not None) as progress:
        for i, point in enumerate(progress.track(points, description="building the front models")):
            model = apply_config(evaluator.model, space, point.config, evaluator.pruner)
            quality = evaluator.quality(model)
            point.accuracy, point.flops = quality["accuracy"], quality["flops"]
            calls[str(i)] = evaluator.timed_call(model)
        timing = progress.add_task(f"timing {len(points)} models side by side", total=rounds)
        timings = measure_side_by_side(calls, evaluator.device, int(evaluator.settings["warmup"]), rounds,
                                       on_round=lambda: progress.advance(timing))
    for i, point in enumerate(points):
        point.latencies_ms = list(timings[str(i)].samples_ms)
    return _mark_fronts(points, list(fronts))


def _mark_fronts(points: list[AblationPoint], spaces: list[str]) -> Ablation:
    dense = points[0]
    records = [p.record(i) for i, p in enumerate(points)]
    members = {name: [0] + [i for i, p in enumerate(points) if p.space == name] for name in spaces}
    members[UNION] = sorted({i for name in spaces if name != JOINT for i in members[name]})
    fronts = {name: {r.trial for r in pareto_front([records[i] for i in ids], OBJECTIVES)}
              for name, ids in members.items()}
    baseline = {"accuracy": dense.accuracy, "latency_ms": dense.latency_ms}
    volumes = {name: hypervolume([records[i] for i in ids], OBJECTIVES, baseline) for name, ids in fronts.items()}
    union = [points[i] for i in fronts[UNION]]
    for i, p in enumerate(points):
        p.on_front = i in fronts.get(p.space, {i})
        p.on_union = p.space not in (DENSE, JOINT) and i in fronts[UNION]
        p.beyond_union = p.space == JOINT and p.on_front and not any(_at_least_as_good(u, p) for u in union)
    return Ablation(points, volumes)


def _at_least_as_good(a: AblationPoint, b: AblationPoint) -> bool:
    return a.accuracy >= b.accuracy and a.latency_ms <= b.latency_ms


def ablation_table(ablation: Ablation) -> Table:
    """Per space: front points, hypervolume, joint points beyond the union, and the speed-up of its fastest
    point within 1 point of dense accuracy (1.00x: none is faster than the dense model)."""
    table = Table(title="each technique alone, their union, and the joint search (fronts re-measured side by side)",
                  title_justify="left")
    for column in ("space", "front points", "hypervolume", "joint points beyond the union",
                   "fastest within 1 pt of dense"):
        table.add_column(column, justify="right")
    dense = ablation.dense
    for space in (*ablation.techniques, UNION, JOINT):
        front = ablation.front(space)
        close = [p.latency_ms for p in front if p.accuracy >= dense.accuracy - 0.01 - 1e-12]
        table.add_row(space, str(len(front)), f"{ablation.hypervolume[space]:.4f}",
                      str(sum(p.beyond_union for p in front)) if space == JOINT else "-",
                      f"{dense.latency_ms / min(close + [dense.latency_ms]):.2f}x")
    return table


def beyond_union_table(ablation: Ablation) -> Table:
    """The joint points no single technique reaches, with the union point closest in latency."""
    table = Table(title="joint points beyond the union", title_justify="left")
    for column in ("trial", "accuracy", "latency ms (min-max)", "vs dense", "config"):
        table.add_column(column, justify="right" if column != "config" else "left", overflow="fold")
    dense = ablation.dense
    for p in ablation.front(JOINT):
        if p.beyond_union:
            table.add_row(str(p.trial), f"{p.accuracy:.2%}",
                          f"{p.latency_ms:.1f} ({min(p.latencies_ms):.1f}-{max(p.latencies_ms):.1f})",
                          f"{dense.latency_ms / p.latency_ms:.2f}x", _changed(p.config, dense.config))
    if not table.row_count:
        table.caption = "none: every joint point is matched by block or token points alone"
    return table


def _changed(config: dict, identity: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if identity.get(k) != v) or "(unpruned)"


def write_ablation(out: str | Path, ablation: Ablation, device: str = "cpu") -> Path:
    """``ablation.json`` (the benchmark file format), ``ablation.md`` (the tables) and ``ablation.png`` in ``out``."""
    out = Path(out)
    write_record(bench_record("ablate", device, ablation.rows()), out / "ablation.json")
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(ablation_table(ablation))
    console.print(beyond_union_table(ablation))
    rounds = len(ablation.dense.latencies_ms)
    (out / "ablation.md").write_text(
        f"# Techniques alone and together\n\nDevice: {device_name(device)}; every front point built once "
        f"and timed side by side: {rounds} rounds of one call each, in shuffled order.\n\n```\n"
        + console.export_text() + "```\n\n![fronts](ablation.png)\n")
    plot_ablation(ablation, out / "ablation.png")
    return out


def plot_ablation(ablation: Ablation, path: Path) -> Path:
    """Each technique's front, their union and the joint front, accuracy against latency; where a front
    reaches far below dense accuracy, a second panel zooms on the ``ZOOM_POINTS`` below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = 100 * ablation.dense.accuracy
    accuracies = [100 * p.accuracy for space in (*ablation.techniques, JOINT) for p in ablation.front(space)]
    zoom = bool(accuracies) and min(accuracies) < dense - ZOOM_POINTS
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12, 4.4) if zoom else (6.8, 4.4), squeeze=False)
    for ax in axes[0]:
        _draw_fronts(ax, ablation)
    axes[0][0].legend(fontsize=8)
    if zoom:
        axes[0][1].set_ylim(dense - ZOOM_POINTS, max(accuracies + [dense]) + 0.3)
        axes[0][1].set_title(f"within {ZOOM_POINTS:g} points of dense accuracy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _draw_fronts(ax, ablation: Ablation) -> None:
    markers = iter("s^vD")
    for space in ablation.techniques:
        _step(ax, ablation.front(space), label=f"{space} front", marker=next(markers))
    _step(ax, ablation.front(UNION), label="union of the techniques alone", ls="--", c="black", alpha=0.6)
    _step(ax, ablation.front(JOINT), label="joint front", marker="o", c="tab:red")
    beyond = [p for p in ablation.front(JOINT) if p.beyond_union]
    if beyond:
        ax.scatter([p.latency_ms for p in beyond], [100 * p.accuracy for p in beyond], s=160, facecolors="none",
                   edgecolors="tab:red", label="joint, beyond the union", zorder=4)
    dense = ablation.dense
    ax.scatter([dense.latency_ms], [100 * dense.accuracy], marker="*", s=200, c="black", label="dense", zorder=5)
    ax.set_xlabel("latency (ms, re-measured side by side)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)


def _step(ax, points: list[AblationPoint], **style) -> None:
    ax.step([p.latency_ms for p in points], [100 * p.accuracy for p in points], where="post", **style)
