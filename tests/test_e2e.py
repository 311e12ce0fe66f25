"""The CLI end to end on the embedded default (digits DeiT, Ray evaluator): budget, interrupt/resume, export."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import hwnas
from hwnas.evaluators.evaluator import Evaluator
from hwnas.kernels import BlockSparseLinear
from hwnas.pruning.apply import apply_config
from hwnas.search.report import BOTH_LATENCIES
from hwnas.spaces import load_space

pytestmark = pytest.mark.slow
SEARCH = [sys.executable, "-m", "hwnas"]


def search(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*SEARCH, *args, "--no-progress"] if args[0] == "run" else [*SEARCH, *args],
                          capture_output=True, text=True, timeout=timeout)


def complete_trials(study: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{study / 'study.db'}"
    return optuna.load_study(study_name=None, storage=storage).get_trials(states=(TrialState.COMPLETE,))


def finished_so_far(study: Path) -> int:
    """Complete trials of a study that another process may still be creating.

    Read-only through sqlite3: opening it with optuna would write its schema version, racing the
    process that is creating it (both insert it; one fails).
    """
    database = study / "study.db"
    if not database.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # no trials table yet, or locked for a moment
        return 0


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> tuple[Path, float]:
    """24 trials of the default space under a latency budget of 95 % of the dense model's latency.

    Budget and latency objective are relative to the dense model, timed side by side with each
    candidate: on this shared 2-core machine the speed drifts between trials by more than the
    speed-ups at stake.
    """
    out = tmp_path_factory.mktemp("budget") / "study"
    result = search("run", "--budget", "latency=95%", "--objectives", "accuracy,latency_vs_dense", "--trials", "24",
                    "--workers", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, 0.95


def test_budget_run_front_meets_budget_and_beats_dense(budget_run):
    out, budget = budget_run
    document = json.loads((out / "pareto.json").read_text())
    assert document["budget"] == {"latency_ms_vs_dense": budget}
    points = document["points"]
    assert points, "no feasible point"
    dense = document["baseline"]["metrics"]
    # a relative budget makes every candidate timed side by side with the dense model
    assert all(p["metrics"]["latency_ms_vs_dense"] <= budget for p in points)
    # a search-quality check with a margin: in one CI run, 24 trials on a drifting 2-core machine found
    # no point within budget closer than 1.3 points to dense (98.67 %); the quality bar is `search bench joint`'s
    good = [p for p in points if p["metrics"]["latency_ms_vs_dense"] < 1.0
            and p["metrics"]["accuracy"] >= dense["accuracy"] - 0.02]
    assert good, f"no point faster than dense within 2 points of {dense['accuracy']:.2%}"
    assert len(complete_trials(out)) == 24
    assert (out / "pareto.png").is_file() and "Pareto" in (out / "report.md").read_text()


def test_show_prints_the_front(budget_run):
    out, _ = budget_run
    result = search("show", str(out))
    assert result.returncode == 0, result.stderr
    assert "dense" in result.stdout and "latency_ms" in result.stdout


def test_export_loads_and_matches_the_evaluated_candidate(budget_run, tmp_path):
    out, _ = budget_run
    export = tmp_path / "export"
    result = search("export", str(out), "--pick", "latency", "-o", str(export))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((export / "hwnas.json").read_text())
    loaded = hwnas.load(export)
    pruned_kinds = [k for k, v in manifest["config"].items() if k.startswith("sparsity.") and v > 0]
    kernel_layers = [n for n, m in loaded.named_modules() if isinstance(m, BlockSparseLinear)]
    assert len(kernel_layers) == len(manifest["block_layers"]) == 6 * len(pruned_kinds)  # 6 blocks per kind
    assert all(loaded.get_submodule(n).impl == manifest["block_layers"][n] for n in kernel_layers)
    legacy = tmp_path / "legacy"  # exports before CUDA was calibrated recorded the CPU's path alone
    shutil.copytree(export, legacy)
    old_layers = {n: impl["cpu"] for n, impl in manifest["block_layers"].items()}
    (legacy / "hwnas.json").write_text(json.dumps({**manifest, "block_layers": old_layers}))
    assert {n: m.impl["cpu"] for n, m in hwnas.load(legacy).named_modules() if n in old_layers} == old_layers

    space = load_space()
    evaluator = Evaluator(space)
    candidate = apply_config(evaluator.model, space, manifest["config"], evaluator.pruner)
    x = evaluator.data.test_x[:128]
    with torch.inference_mode():
        assert (loaded(x) - candidate(x)).abs().max().item() <= 1e-4
    measured = evaluator.measure_model(loaded)
    assert measured["accuracy"] == pytest.approx(manifest["metrics"]["accuracy"], abs=1e-9)
    assert measured["flops"] == manifest["metrics"]["flops"]
    assert measured["latency_ms"] > 0  # its value is a timing, compared in benchmarks, not here

    manifest["hardware"]["threads"] = 1  # as a worker of --workers 2 measures: eval times the same way
    (export / "hwnas.json").write_text(json.dumps(manifest))
    result = search("eval", str(export))
    assert result.returncode == 0, result.stderr
    assert "latency_ms" in result.stdout and "recorded by the study" in result.stdout
    assert "1 thread)" in result.stdout
    ratio_row = next(line for line in result.stdout.splitlines() if "latency_ms_vs_dense" in line)
    assert "% of dense" in ratio_row.split("│")[-2]  # measured now, beside the dense model

    tuned = tmp_path / "tuned"
    result = search("finetune", str(export), "-o", str(tuned), "--epochs", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "distilled" in result.stdout
    after = json.loads((tuned / "hwnas.json").read_text())["finetune"]["accuracy_after"]
    # float32 vs float64 means of the same 450 hits; one image is 1/450
    assert evaluator.measure_model(hwnas.load(tuned))["accuracy"] == pytest.approx(after, abs=1e-6)


def _default_sigint() -> None:
    """Ctrl-C as in a terminal, even where the tests run in the background (which ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_stopped_driver_then_resume_finishes_without_rerunning(tmp_path, stop):
    """Ctrl-C, or a scheduler's SIGTERM (which Ray's driver would answer with an abort), ends cleanly (exit 130, how
    to resume); kill -9 leaves the study as it was. Resume loses nothing."""
    out = tmp_path / "study"
    process = subprocess.Popen([*SEARCH, "run", "--trials", "16", "--population", "4", "--workers", "1",
                                "--out", str(out), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if finished_so_far(out) >= 5:
            break
        time.sleep(1)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=300)
    if stop in (signal.SIGINT, signal.SIGTERM):
        assert process.returncode == 130, stderr
        assert "--resume" in stderr and "Traceback" not in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    before = {t.number: t.values for t in complete_trials(out)}
    assert 5 <= len(before) < 16

    result = search("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr
    after = complete_trials(out)
    assert len(after) == 16
    assert {t.number: t.values for t in after if t.number in before} == before  # none lost or changed
    measured = [t.user_attrs["config_hash"] for t in after if "cached_from" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no configuration measured twice


def test_impossible_budget_exits_3_naming_the_best_value(tmp_path):
    result = search("run", "--budget", "latency=0.001ms", "--trials", "4", "--population", "4", "--workers", "0",
                    "--out", str(tmp_path / "study"))
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "latency" in last and "best" in last and "ms" in last


def test_demo_run_prints_a_front_of_at_least_3_points(tmp_path):
    """What `make demo` runs: no arguments but the output directory."""
    result = search("run", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "Pareto front" in result.stdout
    front = json.loads((tmp_path / "demo" / "pareto.json").read_text())
    assert front["objectives"] == {"accuracy": "max", "latency_ms_vs_dense": "min"}  # immune to the machine's drift
    assert len(front["points"]) >= 3
    assert BOTH_LATENCIES in (tmp_path / "demo" / "report.md").read_text()  # why latency_ms can disagree
