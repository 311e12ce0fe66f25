"""``search bench tokens``: token methods at matched FLOPs — accuracy on the digits DeiT, latency on timm DeiTs.

Every method cuts the same token counts at the same blocks, so FLOPs match (counted on the
token counts alone; the scoring and merging ops add < 1 %).

* **Accuracy** (``digits-deit``, no fine-tuning, on its 720 held-out images: the test and
  calibration splits, neither seen in training — token methods need no calibration): for each
  target FLOPs reduction (0.35, 0.5), every schedule of a fixed family (cuts at blocks
  ``CUT_SETS``, the same keep ratio ρ at each cut) whose reduction is within ±0.02 of the target,
  run with each method (``hwnas`` = UCC, ``tome``, ``evit``, ``random``) and with the UCC
  ablations (``hwnas-spatial``: β = 0, attention only; ``hwnas-spectral``: β = 1;
  ``hwnas-every-block``: the attention of every block before the last cut accumulated, not only
  of the blocks before the cuts; ``hwnas-last``: the attention of the block before the cut
  alone). The summary gives
  each method its best schedule of the family (a method is judged by the best it can do at that
  cost); the JSON holds every schedule.
* **Latency** (``deit_small_patch16_224``, ``deit_base_patch16_224``, random weights, fp32 at
  batch 1 and 8, and on CUDA also fp16 at batch 8 and 64; on CUDA each model is captured in a CUDA
  graph and its replay timed): dense, ``hwnas``, ``hwnas-every-block`` and ``tome`` with cuts at
  blocks 3, 6, 9 and ρ bisected to −50 % FLOPs, side by side: interleaved rounds, one call of
  each per round in shuffled order (``ROUNDS`` per batch size: batch 1 calls are short and their
  spread wide, so they get more).
  Speed-ups are paired: per round, the ratio of the two calls' times (so the machine's drift
  cancels), reported as the median and quartiles over the rounds — ``speedup_vs_dense`` for
  every method, and ``speedup_vs_tome`` for the two UCC rows (above 1: UCC is faster than ToMe).
"""

from __future__ import annotations

import copy
import functools

import timm
import torch
from rich.table import Table
from torch import nn

from hwnas.bench.record import result_row
from hwnas.evaluators.metrics import accuracy, count_flops, fidelity_kl, predict_logits
from hwnas.hwprofiles.latency import Ratio, cuda_graph_replay, measure_side_by_side, paired_ratio
from hwnas.models.digits import create_digits_model, load_digits_splits
from hwnas.pruning.token_methods import TokenMethod, UccMethod, token_method
from hwnas.pruning.tokens import apply_token_keep, keep_counts

DIGITS_MODEL = "digits-deit"
DIGITS_CHECKPOINTS = (DIGITS_MODEL,)  # recorded with the results (``checkpoint_fingerprint``)
TIMING_MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
TARGETS = (0.35, 0.5)
TOLERANCE = 0.02
CUT_SETS = ((1,), (1, 3, 5), (2, 4), (1, 2, 3), (2, 3, 4, 5), (1, 2, 3, 4, 5))
RHOS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.3 ... 0.9
TIMING_CUTS = (3, 6, 9)
#: (batch, dtype) of the latency cases: the issue's CPU points, and on CUDA also its H100 point (fp16 batch 64)
#: and fp16 batch 8, where the h100 profile predicts the cuts' launches to cost more than they save
TIMING_POINTS = {"cpu": ((1, torch.float32), (8, torch.float32)),
                 "cuda": ((1, torch.float32), (8, torch.float32), (8, torch.float16), (64, torch.float16))}
ROUNDS = {1: 60, 8: 25, 64: 25}
METHODS = {"hwnas": "ucc", "tome": "tome", "evit": "evit", "random": "random"}
ABLATIONS = {"hwnas-spatial": dict(spectral_weight=0.0), "hwnas-spectral": dict(spectral_weight=1.0),
             "hwnas-every-block": dict(history="blocks"), "hwnas-last": dict(history="last")}
#: what the latency cases time beside dense: UCC, its every-block history (what that history costs) and ToMe
TIMED = {"hwnas": "ucc", "hwnas-every-block": "ucc-blocks", "tome": "tome"}


def schedule(depth: int, cuts, keep: float) -> dict[int, float]:
    """Absolute keep ratio per block for 'keep ``keep`` of the tokens at each block of ``cuts``'."""
    ratios, ratio = {}, 1.0
    for block in range(1, depth):
        if block in cuts:
            ratio *= keep
        ratios[block] = round(ratio, 6)
    return ratios


def flops_reduction(model: nn.Module, keep: dict[int, float], input_shape: tuple[int, ...], dense_flops: int) -> float:
    """1 − FLOPs of the schedule's token counts / dense FLOPs (counted without any scoring ops)."""
    return 1.0 - count_flops(apply_token_keep(copy.deepcopy(model), keep, "random"), input_shape) / dense_flops


def schedule_for_flops(model: nn.Module, cuts, target: float, input_shape: tuple[int, ...]) -> tuple[dict, float]:
    """The schedule of ``cuts`` whose FLOPs reduction is nearest ``target`` (bisection on ρ): (keep, reduction)."""
    dense = count_flops(model, input_shape)
    low, high = 0.05, 1.0
    for _ in range(14):
        middle = (low + high) / 2
        if flops_reduction(model, schedule(len(model.blocks), cuts, middle), input_shape, dense) > target:
            low = middle
        else:
            high = middle
    keep = schedule(len(model.blocks), cuts, round((low + high) / 2, 4))
    return keep, flops_reduction(model, keep, input_shape, dense)


def schedule_family(model: nn.Module, input_shape: tuple[int, ...], targets=TARGETS, cut_sets=CUT_SETS):
    """Every schedule of the family within ``TOLERANCE`` of a target reduction: (target, cuts, ρ, keep, reduction).

    Two values of ρ that round to the same token counts are one schedule: only the first is given.
    """
    dense_flops = count_flops(model, input_shape)
    for target in targets:
        seen = set()
        for cuts in cut_sets:
            for rho in RHOS:
                keep = schedule(len(model.blocks), cuts, rho)
                counts = tuple(keep_counts(model, keep))
                reduction = flops_reduction(model, keep, input_shape, dense_flops)
                if abs(reduction - target) <= TOLERANCE and counts not in seen:
                    seen.add(counts)
                    yield target, cuts, rho, keep, reduction


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    return accuracy_rows(device, quick) + latency_rows(device, quick)


def accuracy_rows(device: str = "cpu", quick: bool = False) -> list[dict]:
    model = create_digits_model(DIGITS_MODEL)  # on the CPU, where FLOPs are counted; evaluated on ``device``
    data = load_digits_splits()
    images, labels = torch.cat([data.test_x, data.calib_x]), torch.cat([data.test_y, data.calib_y])
    input_shape = tuple(images.shape[1:])
    dense_logits = predict_logits(copy.deepcopy(model).to(device), images)
    dense = {"accuracy": accuracy(dense_logits, labels), "fidelity_kl": 0.0}
    methods: dict[str, TokenMethod] = {impl: token_method(name) for impl, name in METHODS.items()}
    methods.update({impl: UccMethod(**options) for impl, options in ABLATIONS.items()})
    rows = []
    family = schedule_family(model, input_shape, TARGETS[:1] if quick else TARGETS,
                             CUT_SETS[-2:] if quick else CUT_SETS)
    for target, cuts, rho, keep, reduction in family:
        case = {"model": DIGITS_MODEL, "flops_reduction": target, "measured_flops_reduction": round(reduction, 4),
                "schedule": f"keep {rho} at {list(cuts)}", "images": len(images)}
        rows.append(result_row(case, "dense", None, dense))
        for impl, method in methods.items():
            logits = predict_logits(apply_token_keep(copy.deepcopy(model), keep, method).to(device), images)
            rows.append(result_row(case, impl, None, {"accuracy": accuracy(logits, labels),
                                                      "fidelity_kl": fidelity_kl(dense_logits, logits)}))
    return rows


def latency_cases(device: torch.device, quick: bool = False):
    """The latency cases on ``device``: per model and (batch, dtype) point, (dense model, keep schedule at −50 %
    FLOPs, input, case). The dense model is one object per model: callers copy it."""
    for name in TIMING_MODELS[:1] if quick else TIMING_MODELS:
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False).eval()
        keep, reduction = schedule_for_flops(dense, TIMING_CUTS, 0.5, (3, 224, 224))
        for batch, dtype in TIMING_POINTS[device.type]:
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            case = {"model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "flops_reduction": 0.5,
                    "measured_flops_reduction": round(reduction, 4),
                    "schedule": f"keep {keep[TIMING_CUTS[0]]} at {list(TIMING_CUTS)}"}
            yield dense, keep, x, case


def latency_rows(device: str = "cpu", quick: bool = False) -> list[dict]:
    rows = []
    for dense, keep, x, case in latency_cases(torch.device(device), quick):
        pruned = {impl: apply_token_keep(copy.deepcopy(dense), keep, method) for impl, method in TIMED.items()}
        models = {impl: model.to(x.device, x.dtype) for impl, model in {"dense": copy.deepcopy(dense), **pruned}.items()}
        calls = {impl: functools.partial(model, x) for impl, model in models.items()}
        if x.is_cuda:  # the GPU's time, not Python's launch overhead
            calls = {impl: cuda_graph_replay(call, x.device) for impl, call in calls.items()}
        timings = measure_side_by_side(calls, x.device, warmup=3, rounds=5 if quick else ROUNDS[case["batch"]])
        samples = {impl: timing.samples_ms for impl, timing in timings.items()}
        for impl, timing in timings.items():
            rows.append(result_row(case, impl, timing, speedups(samples, impl)))
    return rows


def speedups(samples: dict[str, tuple[float, ...]], impl: str) -> dict[str, dict[str, float]]:
    """``impl``'s paired speed-ups over dense (and, for UCC's, over ToMe) from side-by-side samples."""
    baselines = ("dense", "tome") if impl.startswith("hwnas") else ("dense",)
    return {f"speedup_vs_{baseline}": vars(paired_ratio(samples[baseline], samples[impl]))
            for baseline in baselines if impl != baseline}


def summary(rows: list[dict]) -> Table:
    table = Table(title="token methods at matched FLOPs", title_justify="left")
    for column in ("model", "FLOPs", "batch, dtype", "impl", "accuracy (best schedule)", "median ms (min-max)",
                   "speed-up, paired: median (quartiles)"):
        table.add_column(column, justify="right")
    best: dict[tuple, dict] = {}
    for row in rows:
        if "accuracy" in row.get("metrics", {}):
            key = (row["case"]["model"], row["case"]["flops_reduction"], row["impl"])
            if key not in best or row["metrics"]["accuracy"] > best[key]["metrics"]["accuracy"]:
                best[key] = row
    for (model, target, impl), row in best.items():
        schedule_text = "" if impl == "dense" else f" ({row['case']['schedule']})"
        table.add_row(model, f"−{target:.0%}", "", impl, f"{row['metrics']['accuracy']:.2%}{schedule_text}", "", "")
    for row in rows:
        if "median_ms" in row:
            case, metrics = row["case"], row.get("metrics", {})
            speedup = str(Ratio(**metrics["speedup_vs_dense"])) if "speedup_vs_dense" in metrics else ""
            if "speedup_vs_tome" in metrics:
                speedup += f"; vs tome {Ratio(**metrics['speedup_vs_tome'])}"
            table.add_row(case["model"], f"−{case['measured_flops_reduction']:.0%}",
                          f"{case['batch']}, {case['dtype']}", row["impl"], "",
                          f"{row['median_ms']:.1f} ({row['min_ms']:.1f}-{row['max_ms']:.1f})", speedup)
    return table
