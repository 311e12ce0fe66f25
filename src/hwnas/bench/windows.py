"""``search bench windows``: SparseViT window pruning on Swin-T side by side with the dense model,
and the optimizers compared on the digits Swin window space.

Speed: timm ``swin_tiny_patch4_window7_224`` (random weights: time does not depend on values) at
224 and 672 pixels, batch 1 and 8 (float16 on CUDA, float32 on the CPU): dense, every block at
window ratio 0.5, and the configuration an evolution search (``--optimizer evolution``) found
with the uniform configuration's latency as its budget — fidelity to the dense model on a few
real photographs (random ones when the sample folder is absent) as its objective. Case key
``sparsity`` is the mean window ratio; ``metrics.window_sparsity`` the fraction of window
computations actually skipped.

Optimizers: the ``swin-windows`` preset (digits Swin) searched by nsga2, optuna-tpe and
evolution for the same number of trials under the same latency budget (0.8 x dense); each
row's ``metrics.hypervolume`` is the study's accuracy x latency hypervolume.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from rich.console import Console, Group
from rich.table import Table

from hwnas.bench.record import result_row
from hwnas.errors import BudgetError
from hwnas.evaluators.evaluator import Evaluator
from hwnas.evaluators.pool import LocalPool
from hwnas.hwprofiles.latency import measure
from hwnas.pruning.windows import apply_window_ratios, stage_targets, swin_blocks, window_sparsity
from hwnas.search.runner import RunSummary, SearchRun
from hwnas.search.study import RunSettings, StudyDir
from hwnas.spaces import load_space

MODEL = "swin_tiny_patch4_window7_224"
DIGITS_CHECKPOINTS = ("digits-swin-windows",)  # the swin-windows preset's model, recorded with the results
RESOLUTIONS = (224, 672)
BATCHES = (1, 8)
UNIFORM = 0.5
SEARCH_TRIALS = 12
OPTIMIZERS = ("nsga2", "optuna-tpe", "evolution")
OPTIMIZER_TRIALS = 24
SAMPLE_IMAGES = Path(os.environ.get("HWNAS_SAMPLE_IMAGES", "../shared/data/imagenet-sample"))


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hwnas-bench-windows-") as scratch:
        for resolution in (224,) if quick else RESOLUTIONS:
            rows += _speed_rows(resolution, device, Path(scratch), quick)
        rows += _optimizer_rows(device, Path(scratch), quick)
    return rows


# ---- speed ------------------------------------------------------------------------------------
def _speed_rows(resolution: int, device: torch.device, scratch: Path, quick: bool) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    dense = timm.create_model(MODEL, pretrained=False, img_size=resolution).eval()
    targets = range(len(swin_blocks(dense)))
    uniform = {t: UNIFORM for t in targets}
    warmup, repeats = (10, 50) if cuda else (1, 3) if quick or resolution > 224 else (2, 10)

    searched, budget_ms = _search(resolution, UNIFORM, stage_targets(dense), device, scratch, quick)

    configs = {"dense": {}, "uniform": uniform, "searched": searched}
    models = {name: apply_window_ratios(copy.deepcopy(dense), ratios).to(device, dtype)
              for name, ratios in configs.items()}
    rows = []
    for batch in (1,) if quick else BATCHES:
        x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
        for name, ratios in configs.items():
            model = models[name]
            timing = measure(lambda: model(x), device, warmup, repeats, cuda_graph=cuda)
            case = {"model": MODEL, "resolution": resolution, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                    "sparsity": round(statistics.fmean(ratios.values()), 4) if ratios else 0.0, "config": name}
            metrics = {"window_sparsity": round(window_sparsity(dense, ratios), 4), "ratios": list(
                ratios.get(t, 0.0) for t in targets)}
            if name == "searched":
                metrics["search_budget_ms"] = budget_ms
            rows.append(result_row(case, "dense" if name == "dense" else "hwnas", timing, metrics))
    return rows


def _search(resolution: int, uniform: float, stages: list[list[int]], device: torch.device, scratch: Path,
            quick: bool) -> tuple[dict[int, float], float]:
    """Evolution over per-block window ratios at batch 1 with the latency of ``uniform`` ratios as the
    budget (measured as the study measures its trials): the most faithful feasible point, and the budget."""
    space = {
        "name": f"swin-tiny-{resolution}-windows",
        "model": {"name": MODEL, "kwargs": {"img_size": resolution}},
        "data": {"imagefolder": str(_images(scratch)), "max_images": 8},
        "measure": {"batch_size": 1, "warmup": 2, "repeats": 5},
        "dimensions": [{"name": "ratio", "transform": "window_ratio", "targets": [t for s in stages for t in s],
                        "values": {"low": 0.0, "high": 0.8, "step": 0.1}, "order": "non_decreasing",
                        "stages": stages}],
    }
    loaded = load_space(space)
    budget_ms = Evaluator(loaded, device=str(device)).evaluate(
        {name: uniform for name in loaded.names})["latency_ms"]
    settings = RunSettings(objectives="fidelity,latency", budget=f"latency={budget_ms:.3f}ms", optimizer="evolution",
                           trials=4 if quick else SEARCH_TRIALS, population=4, device=str(device), workers=0)
    summary = _study(space, settings, scratch / f"search-{resolution}")
    feasible = [r for r in summary.records if r.feasible] or summary.records
    best = min(feasible, key=lambda r: r.metrics["fidelity_kl"])
    return {int(name.split(".")[1]): float(value) for name, value in best.config.items()}, budget_ms


def _images(scratch: Path) -> Path:
    """The sample photographs, or a folder of random images when they are absent."""
    if SAMPLE_IMAGES.is_dir():
        return SAMPLE_IMAGES
    from PIL import Image

    folder = scratch / "random-images" / "noise"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = torch.randint(0, 256, (256, 256, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder.parent


# ---- optimizers -------------------------------------------------------------------------------
def _optimizer_rows(device: torch.device, scratch: Path, quick: bool) -> list[dict]:
    space = load_space("swin-windows")
    dense_ms = Evaluator(space, device=str(device)).evaluate(space.identity())["latency_ms"]
    budget_ms = 0.8 * dense_ms
    trials = 6 if quick else OPTIMIZER_TRIALS
    rows = []
    for optimizer in OPTIMIZERS:
        settings = RunSettings(objectives="accuracy,latency", budget=f"latency={budget_ms:.3f}ms", optimizer=optimizer,
                               trials=trials, population=6, device=str(device), workers=0)
        summary = _study(space.source, settings, scratch / f"optimizer-{optimizer}")
        feasible = [r for r in summary.records if r.feasible]
        case = {"space": space.name, "trials": trials, "budget_ms": round(budget_ms, 3), "objectives": "accuracy,latency"}
        rows.append(result_row(case, optimizer, None, {
            "hypervolume": summary.hypervolume, "front": len(summary.front), "feasible": len(feasible),
            "best_accuracy": max((r.metrics["accuracy"] for r in feasible), default=None),
            "dense_latency_ms": dense_ms}))
    return rows


def _study(space_source: dict, settings: RunSettings, out: Path) -> RunSummary:
    """One search run in this process (``--workers 0``), as ``search run`` would do it.

    A search that finds nothing within the budget is a result here (an empty front), not an error.
    """
    study_dir = StudyDir.create(out, load_space(space_source), settings)
    pool = LocalPool(space_source, settings.device)
    search = SearchRun(study_dir, pool, Console(stderr=True), progress=True)
    try:
        return search.run()
    except BudgetError:
        return RunSummary(search.records, [], 0.0, search.baseline)
    finally:
        pool.close()


# ---- summary ----------------------------------------------------------------------------------
def summary(rows: list[dict]) -> Group:
    speed = Table(title=f"{MODEL}: window sparsity vs dense (median ms)", title_justify="left",
                  caption="speed-up: dense ÷ configuration, same run")
    for column in ("resolution", "batch", "config", "mean ratio", "windows skipped", "median ms", "speed-up"):
        speed.add_column(column, justify="right")
    dense_ms = {(r["case"]["resolution"], r["case"]["batch"]): r["median_ms"]
                for r in rows if r["impl"] == "dense" and "resolution" in r["case"]}
    for row in rows:
        case = row["case"]
        if "resolution" not in case:
            continue
        speed.add_row(str(case["resolution"]), str(case["batch"]), case["config"], f"{case['sparsity']:.2f}",
                      f"{row['metrics']['window_sparsity']:.0%}", f"{row['median_ms']:.1f}",
                      f"{dense_ms[(case['resolution'], case['batch'])] / row['median_ms']:.2f}x")
    optimizers = Table(title="optimizers on the digits Swin window space (same trials, same latency budget)",
                       title_justify="left")
    for column in ("optimizer", "trials", "budget", "feasible", "front", "best accuracy", "hypervolume"):
        optimizers.add_column(column, justify="right")
    for row in rows:
        if "resolution" in row["case"]:
            continue
        m = row["metrics"]
        best = "-" if m["best_accuracy"] is None else f"{m['best_accuracy']:.2%}"
        optimizers.add_row(row["impl"], str(row["case"]["trials"]), f"{row['case']['budget_ms']:.2f} ms",
                           str(m["feasible"]), str(m["front"]), best, f"{m['hypervolume']:.4f}")
    return Group(speed, optimizers)
