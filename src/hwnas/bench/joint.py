"""``search bench joint``: block sparsity alone, token keep alone, and both searched jointly.

Three studies of the digits DeiT with the same optimizer (nsga2), trials, seed and objectives
(accuracy and latency on this device): the default space with its block-sparsity dimensions only
(``block``), with its token-keep dimensions only (``tokens``), and whole (``joint``). The front
points of all three (and the dense model, which every space reaches) are then re-measured side by
side, ``rounds`` times in shuffled order, so a drifting machine favours no study; every front is
recomputed on those measurements, with ``union`` the front of the block and token points together.
A joint point is *beyond the union* when no union point is at least as accurate and as fast.

Rows: ``impl`` is the space; ``case`` the space, trial and configuration; the timing is the
median over rounds of each round's median latency; ``metrics``: ``accuracy``, ``flops``,
``on_front`` (its own space's front), ``on_union`` (block/tokens rows), ``beyond_union`` (joint
rows) and ``hypervolume`` of its space's front (normalised by the dense model; ``union`` too).
The figure ``<json>.png`` draws the two fronts, their union and the joint front.
"""

from __future__ import annotations

import random
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hwnas.bench.record import result_row
from hwnas.evaluators.evaluator import Evaluator
from hwnas.evaluators.pool import LocalPool
from hwnas.hwprofiles.latency import Timing
from hwnas.search.objectives import parse_objectives
from hwnas.search.pareto import Record, hypervolume, pareto_front
from hwnas.search.runner import SearchRun
from hwnas.search.study import RunSettings, StudyDir, read_pareto
from hwnas.spaces import config_hash, load_space

#: space name -> the transforms of the default space it keeps (None: all)
SPACES = {"block": ("block_sparsity", "block_size"), "tokens": ("token_keep", "token_method"), "joint": None}
TRIALS = 24
ROUNDS = 3
OBJECTIVES = parse_objectives("accuracy,latency")


def space_source(name: str) -> dict:
    source = load_space(None).source
    keep = SPACES[name]
    if keep is None:
        return source
    return {**source, "name": f"default-{name}", "dimensions": [d for d in source["dimensions"] if d["transform"] in keep]}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    trials, rounds = (4, 1) if quick else (TRIALS, ROUNDS)
    joint = load_space(space_source("joint"))
    fronts: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="hwnas-bench-joint-") as scratch:
        for name in SPACES:
            settings = RunSettings(optimizer="nsga2", trials=trials, seed=0, workers=0, device=device)
            study_dir = StudyDir.create(Path(scratch) / name, load_space(space_source(name)), settings)
            pool = LocalPool(study_dir.space.source, device)
            SearchRun(study_dir, pool, Console(quiet=True), progress=False).run()
            fronts[name] = read_pareto(study_dir.path)["points"]
    # every front point as a configuration of the joint space (absent variables unpruned), plus dense
    candidates = [("dense", "dense", joint.identity())] + [
        (name, point["trial"], {**joint.identity(), **point["config"]}) for name, points in fronts.items()
        for point in points]
    evaluator = Evaluator(joint, device=device)
    latencies: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
    metrics: dict[int, dict] = {}
    order = list(range(len(candidates)))
    for round_ in range(rounds):
        random.Random(round_).shuffle(order)
        for i in order:
            metrics[i] = evaluator.evaluate(candidates[i][2])
            latencies[i].append(metrics[i]["latency_ms"])
    records = {i: Record(i, candidates[i][2], {"accuracy": metrics[i]["accuracy"],
                                               "latency_ms": statistics.median(latencies[i])}, True,
                         config_hash(candidates[i][2])) for i in range(len(candidates))}
    return _rows(candidates, records, latencies, metrics)


def _rows(candidates, records: dict[int, Record], latencies, metrics) -> list[dict]:
    dense = records[0]
    members = {name: [0] + [i for i, c in enumerate(candidates) if c[0] == name] for name in SPACES}
    members["union"] = sorted(set(members["block"]) | set(members["tokens"]))
    front = {name: {r.trial for r in pareto_front([records[i] for i in ids], OBJECTIVES)}
             for name, ids in members.items()}
    volume = {name: hypervolume([records[i] for i in ids], OBJECTIVES, dense.metrics) for name, ids in front.items()}
    union_points = [records[i] for i in front["union"]]
    rows = []
    for i, (space, trial, config) in enumerate(candidates):
        r = records[i]
        timing = Timing(r.metrics["latency_ms"], min(latencies[i]), max(latencies[i]), len(latencies[i]))
        extra = {"accuracy": r.metrics["accuracy"], "flops": metrics[i]["flops"], "on_front": i in front.get(space, {i}),
                 "hypervolume": volume.get(space, 0.0)}
        if space in ("block", "tokens"):
            extra["on_union"] = i in front["union"]
            extra["union_hypervolume"] = volume["union"]
        if space == "joint":
            extra["beyond_union"] = not any(_at_least_as_good(u, r) for u in union_points)
        rows.append(result_row({"space": space, "trial": trial, "config": config}, space, timing, extra))
    return rows


def _at_least_as_good(a: Record, b: Record) -> bool:
    return a.metrics["accuracy"] >= b.metrics["accuracy"] and a.metrics["latency_ms"] <= b.metrics["latency_ms"]


def summary(rows: list[dict]) -> Table:
    table = Table(title="block alone, tokens alone, joint (digits DeiT; fronts re-measured side by side)",
                  title_justify="left")
    for column in ("space", "front points", "hypervolume", "joint points beyond the union",
                   "fastest within 1 pt of dense"):
        table.add_column(column, justify="right")
    dense = next(r for r in rows if r["impl"] == "dense")
    floor = dense["metrics"]["accuracy"] - 0.01
    for space in ("block", "tokens", "union", "joint"):
        front = front_rows(rows, space)
        owners = ("block", "tokens") if space == "union" else (space,)
        key = "union_hypervolume" if space == "union" else "hypervolume"
        volume = next(r["metrics"][key] for r in rows if r["impl"] in owners)
        beyond = str(sum(r["metrics"]["beyond_union"] for r in front)) if space == "joint" else "-"
        close = [r["median_ms"] for r in front if r["metrics"]["accuracy"] >= floor - 1e-12]
        fastest = f"{dense['median_ms'] / min(close):.2f}x" if close else "-"
        table.add_row(space, str(len(front)), f"{volume:.4f}", beyond, fastest)
    return table


def front_rows(rows: list[dict], space: str) -> list[dict]:
    """The rows on ``space``'s re-measured front (``union``: of the block and token points together)."""
    if space == "union":
        return [r for r in rows if r["metrics"].get("on_union")]
    return [r for r in rows if r["impl"] == space and r["metrics"]["on_front"]]


def plot(rows: list[dict], path: Path) -> Path:
    """Both single-technique fronts, their union and the joint front, accuracy against latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    styles = {"block": dict(c="tab:orange", marker="s"), "tokens": dict(c="tab:green", marker="^"),
              "joint": dict(c="tab:red", marker="o")}
    for space, style in styles.items():
        points = sorted(front_rows(rows, space), key=lambda r: r["median_ms"])
        ax.step([r["median_ms"] for r in points], [100 * r["metrics"]["accuracy"] for r in points], where="post",
                label=f"{space} front", **style)
    union = sorted(front_rows(rows, "union"), key=lambda r: r["median_ms"])
    ax.step([r["median_ms"] for r in union], [100 * r["metrics"]["accuracy"] for r in union], where="post",
            ls="--", c="black", alpha=0.6, label="union of block and tokens")
    dense = next(r for r in rows if r["impl"] == "dense")
    ax.scatter([dense["median_ms"]], [100 * dense["metrics"]["accuracy"]], marker="*", s=200, c="black", label="dense")
    ax.set_xlabel("latency (ms, re-measured side by side)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
