"""``search bench joint``: block sparsity alone, token keep alone, and both searched jointly.

``search ablate`` on the default space (the digits DeiT): nsga2, ``TRIALS`` trials per technique
and their sum for the joint study, seed 0, accuracy and latency on this device (each study minimises its
ratio to the dense model's, timed beside it, as the default space measures), every front point
built once and timed side by side in ``ROUNDS`` shuffled rounds of one call each. Rows
(``hwnas.search.ablate.Ablation.rows``): ``impl`` is the space (``block``, ``tokens``, ``joint``,
``dense``); ``case`` the space, trial and configuration; the timing is the median over rounds;
``metrics``: ``accuracy``, ``flops``, ``latencies_ms``, ``on_front`` (its own space's front),
``on_union`` (block/tokens rows), ``beyond_union`` (joint rows) and ``hypervolume`` of its space's
front (normalised by the dense model; ``union`` too).
The figure ``<json>.png`` draws the two fronts, their union and the joint front.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hwnas.search.ablate import Ablation, ablate, ablation_table, plot_ablation
from hwnas.search.study import RunSettings
from hwnas.spaces import load_space

TRIALS = 24
DIGITS_CHECKPOINTS = ("digits-deit",)  # the default space's model, recorded with the results
ROUNDS = 15


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    trials, rounds = (4, 1) if quick else (TRIALS, ROUNDS)
    with tempfile.TemporaryDirectory(prefix="hwnas-bench-joint-") as scratch:
        settings = RunSettings(optimizer="nsga2", trials=trials, seed=0, workers=0, device=device)
        ablation = ablate(load_space(None), scratch, settings, rounds, Console(quiet=True), progress=False)
    return ablation.rows()


def summary(rows: list[dict]) -> Table:
    return ablation_table(Ablation.from_rows(rows))


def plot(rows: list[dict], path: Path) -> Path:
    return plot_ablation(Ablation.from_rows(rows), path)
