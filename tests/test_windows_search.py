"""SparseViT end to end on the digits Swin: adaptation keeps accuracy at >= 40 % window sparsity, and
`search run` on the window space works under a latency budget with every optimizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import hwnas
from hwnas.evaluators.evaluator import Evaluator
from hwnas.models.digits import create_digits_model, evaluate_accuracy, load_digits_splits
from hwnas.pruning.apply import apply_config
from hwnas.pruning.windows import apply_window_ratios, window_sparsity
from hwnas.spaces import load_space

pytestmark = pytest.mark.slow


def test_adapted_swin_keeps_accuracy_at_40_percent_window_sparsity():
    splits = load_digits_splits(32)
    dense = evaluate_accuracy(create_digits_model("digits-swin-windows"), splits.test_x, splits.test_y)
    model = create_digits_model("digits-swin-windows")
    # stage 1 (16 windows) skips half its windows, stage 2 (4 windows) a quarter; stage 3 has one window
    ratios = {0: 0.5, 1: 0.5, 2: 0.25, 3: 0.25}
    assert window_sparsity(model, ratios) >= 0.4
    sparse = evaluate_accuracy(apply_window_ratios(model, ratios), splits.test_x, splits.test_y)
    assert sparse >= dense - 0.02, f"{sparse:.2%} at {window_sparsity(model, ratios):.0%} windows skipped vs dense {dense:.2%}"


@pytest.fixture(scope="module")
def latency_budget_ms() -> float:
    space = load_space("swin-windows")
    dense_ms = Evaluator(space).evaluate(space.identity())["latency_ms"]
    return round(0.9 * dense_ms, 2)


@pytest.mark.parametrize("optimizer", ["nsga2", "optuna-tpe", "evolution"])
def test_window_search_under_a_latency_budget(optimizer, latency_budget_ms, tmp_path):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "-m", "hwnas", "run", "swin-windows", "--budget",
                             f"latency={latency_budget_ms}ms", "--optimizer", optimizer, "--trials", "8",
                             "--workers", "0", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode in (0, 3), result.stderr
    document = json.loads((out / "pareto.json").read_text())
    assert document["budget"] == {"latency_ms": latency_budget_ms}
    assert all(p["metrics"]["latency_ms"] <= latency_budget_ms for p in document["points"])
    if optimizer != "evolution":
        return
    assert result.returncode == 0, result.stderr
    export = tmp_path / "export"
    exported = subprocess.run([sys.executable, "-m", "hwnas", "export", str(out), "--pick", "accuracy",
                               "-o", str(export)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    point = max(document["points"], key=lambda p: p["metrics"]["accuracy"])
    space = load_space("swin-windows")
    reference = apply_config(create_digits_model("digits-swin-windows"), space, point["config"])
    loaded = hwnas.load(export)
    x = load_digits_splits(32).test_x[:64]
    with torch.inference_mode():
        assert (loaded(x) - reference(x)).abs().max() <= 1e-4
