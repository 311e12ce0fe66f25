"""``search bench scaling``: trials per second of one fixed study on 1 and 2 Ray workers.

The study is the embedded default space (digits DeiT, token keep × block sparsity) searched by
the ``random`` optimizer with a fixed seed, so every worker count evaluates the same
configurations. Each evaluation is pinned to one thread (``measure.threads: 1``), so two
workers on two cores should approach 2x. Each pool is started and warmed (one short study),
then times ``repeats`` studies; the worker counts run one after the other.
A row's timing is wall time per trial of the whole study (optimizer, evaluations, storage);
``metrics.trials_per_s`` is trials over the median study time.
"""

from __future__ import annotations

import statistics
import tempfile

from rich.console import Console
from rich.table import Table

from hwnas.bench.record import result_row
from hwnas.evaluators.pool import RayPool
from hwnas.hwprofiles.latency import Timing
from hwnas.search.runner import SearchRun
from hwnas.search.study import RunSettings, StudyDir
from hwnas.spaces import load_space

WORKERS = (1, 2)
TRIALS = 12
REPEATS = 3
MEASURE = {"threads": 1, "batch_size": 64, "warmup": 2, "repeats": 8}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device != "cpu":
        raise ValueError("bench scaling measures CPU workers (one thread each); use --device cpu")
    source = {**load_space(None).source, "measure": MEASURE}
    trials, repeats = (4, 1) if quick else (TRIALS, REPEATS)
    seconds: dict[int, list[float]] = {w: [] for w in WORKERS}
    with tempfile.TemporaryDirectory(prefix="hwnas-scaling-") as root:
        for workers in WORKERS:
            pool = RayPool(source, workers=workers)
            try:
                _timed_study(f"{root}/w{workers}-warmup", source, pool, 2)
                for repeat in range(repeats):
                    seconds[workers].append(_timed_study(f"{root}/w{workers}-r{repeat}", source, pool, trials))
            finally:
                pool.close()
    rows = []
    for workers, times in seconds.items():
        per_trial = [s / trials * 1e3 for s in times]
        timing = Timing(statistics.median(per_trial), min(per_trial), max(per_trial), len(per_trial))
        case = {"workers": workers, "trials": trials, "optimizer": "random", "threads_per_worker": 1,
                "space": "default"}
        rows.append(result_row(case, "hwnas", timing, {"trials_per_s": trials / statistics.median(times)}))
    return rows


def _timed_study(out: str, source: dict, pool: RayPool, trials: int) -> float:
    """Seconds the search loop of a fresh ``trials``-trial study takes on ``pool`` (baseline excluded)."""
    settings = RunSettings(optimizer="random", trials=trials, seed=0, workers=pool.workers)
    study_dir = StudyDir.create(out, load_space(source), settings)
    search = SearchRun(study_dir, pool, Console(quiet=True), progress=False)
    search.run()
    trials_run = study_dir.load().trials
    start = min(t.datetime_start for t in trials_run)
    end = max(t.datetime_complete for t in trials_run)
    return (end - start).total_seconds()


def summary(rows: list[dict]) -> Table:
    table = Table(title="study throughput (random optimizer, one thread per evaluation)", title_justify="left")
    for column in ("workers", "trials", "s per trial, median (min–max)", "trials/s", "speed-up"):
        table.add_column(column, justify="right")
    base = next(r["metrics"]["trials_per_s"] for r in rows if r["case"]["workers"] == 1)
    for row in rows:
        rate = row["metrics"]["trials_per_s"]
        table.add_row(str(row["case"]["workers"]), str(row["case"]["trials"]),
                      f"{row['median_ms'] / 1e3:.2f} ({row['min_ms'] / 1e3:.2f}–{row['max_ms'] / 1e3:.2f})",
                      f"{rate:.2f}", f"{rate / base:.2f}x")
    return table
