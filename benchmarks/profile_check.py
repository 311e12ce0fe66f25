"""How far a GPU profile's predictions are from what its device measured: the committed GPU records.

``search run --hwprofile h100`` on a machine without an H100 optimises predicted latency. This
script predicts, on the CPU, every latency that ``bench tokens`` and ``bench models`` measured on
a GPU (``--records h100``: ``tokens-h100.json`` and ``models-h100.json``, CUDA-graph replays) and
writes, per row, the measured and the predicted latency, and per model the speed-up over dense
both ways: whether the prediction ranks the candidates as the device does; and, where a row
measured energy (NVML), the predicted energy beside it. ``--profile`` is a shipped profile or a
YAML file, such as the one ``benchmarks/gpu.sh hwprofile`` measures on the GPU.

With ``--fit`` it also fits the profile's GEMM efficiency curve (``gemm_efficiency``,
``gemm_saturation_gflop``, ``gemm_saturation_exponent``: how much of peak a GEMM of a given size
reaches) to the records, by least squares of log(predicted / measured), keeping every other
figure of the profile; and, per model, the curve fitted to the other model's rows, scored on its
own (how well the fit carries to a model it has not seen). The shipped GPU profiles hold the fit.

    python benchmarks/profile_check.py [--records h100] [--profile h100|FILE.yaml] [--fit]
                                       [--json benchmarks/results/profile-check-h100.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import scipy.optimize
import timm
import torch

from hwnas.bench import tokens as bench_tokens
from hwnas.bench.models import block_sparse_copy
from hwnas.hwprofiles.predictor import Predictor, trace_ops
from hwnas.hwprofiles.profile import HardwareProfile, load_profile
from hwnas.pruning.tokens import apply_token_keep

RESULTS = Path(__file__).parent / "results"
#: the models are traced on the CPU in fp32; the predictor rescales bytes to the predicted dtype
TRACED_ITEMSIZE = 4
#: the token method each impl of a tokens record ran
TOKEN_IMPLS = {"hwnas": "ucc", "hwnas-every-block": "ucc-blocks", "tome": "tome"}
#: ... of a record made before ``hwnas-every-block`` was timed beside it, when UCC read every block's attention
EARLIER_TOKEN_IMPLS = {"hwnas": "ucc-blocks", "tome": "tome"}


@functools.cache
def dense_model(name: str) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False).eval()


@functools.cache
def token_model(name: str, method: str) -> torch.nn.Module:
    """``bench tokens``' model cut by token ``method`` at −50 % FLOPs (cuts at its timing blocks), or dense."""
    dense = dense_model(name)
    if method == "dense":
        return dense
    keep, _ = bench_tokens.schedule_for_flops(dense, bench_tokens.TIMING_CUTS, 0.5, (3, 224, 224))
    return apply_token_keep(copy.deepcopy(dense), keep, method)


@functools.cache
def block_sparse_model(name: str, impl: str, block: int, sparsity: float) -> torch.nn.Module:
    """``bench models``' model ``impl``: dense, or its seeded block-sparse copy."""
    dense = dense_model(name)
    return dense if impl == "dense" else block_sparse_copy(dense, block, sparsity)


def measured_rows(record: str) -> list[dict]:
    return [r for r in json.loads((RESULTS / record).read_text())["results"] if "median_ms" in r]


def traced_rows(device: str, one_launch_kernels: bool = True) -> list[dict]:
    """Every timed row of ``device``'s records (``tokens-DEVICE.json``, ``models-DEVICE.json``, where present),
    with the operators its model runs (traced once, on the CPU; ``one_launch_kernels`` for a GPU: ``trace_ops``)."""
    torch.manual_seed(0)
    rows = []
    records = [f"{bench}-{device}.json" for bench in ("tokens", "models") if (RESULTS / f"{bench}-{device}.json").is_file()]
    if not records:
        raise SystemExit(f"profile_check: no tokens-{device}.json or models-{device}.json under {RESULTS}")
    for record in records:
        timed = measured_rows(record)
        methods = TOKEN_IMPLS if any(r["impl"] == "hwnas-every-block" for r in timed) else EARLIER_TOKEN_IMPLS
        for row in timed:
            case = row["case"]
            if record.startswith("tokens"):
                method = "dense" if row["impl"] == "dense" else methods[row["impl"]]
                model, group = token_model(case["model"], method), case["model"]
            else:
                model = block_sparse_model(case["model"], row["impl"], case["block"], case["sparsity"])
                group = f"{case['model']} {case['sparsity']:.0%} b{case['block']}"
            x = torch.randn(case["batch"], 3, 224, 224)
            energy = (row.get("metrics") or {}).get("energy_mj")
            rows.append({"record": record, "group": group, "impl": row["impl"], "batch": case["batch"],
                         "dtype": case["dtype"], "measured_ms": row["median_ms"], "measured_energy_mj": energy,
                         "ops": trace_ops(model, x, one_launch_kernels=one_launch_kernels)})
    return rows


def check(profile: HardwareProfile, rows: list[dict]) -> dict:
    """Each row's predicted latency (and energy, where it measured some) on ``profile`` beside the measured one,
    and the speed-ups over dense both ways."""
    priced = []
    for row in rows:
        metrics = Predictor(profile, row["dtype"]).metrics(row["ops"], TRACED_ITEMSIZE, row["batch"])
        predicted = metrics["latency_ms_predicted"]
        priced.append({**{k: v for k, v in row.items() if k != "ops"}, "predicted_ms": predicted,
                       "predicted_over_measured": predicted / row["measured_ms"]})
        if row["measured_energy_mj"] and "energy_mj_predicted" in metrics:
            priced[-1]["predicted_energy_mj"] = metrics["energy_mj_predicted"]
            priced[-1]["energy_predicted_over_measured"] = metrics["energy_mj_predicted"] / row["measured_energy_mj"]
    for row in priced:
        dense = next(r for r in priced if r["record"] == row["record"] and r["group"] == row["group"]
                     and r["batch"] == row["batch"] and r["impl"] == "dense")
        row["speedup_measured"] = dense["measured_ms"] / row["measured_ms"]
        row["speedup_predicted"] = dense["predicted_ms"] / row["predicted_ms"]
    pruned = [r for r in priced if r["impl"] != "dense"]
    same_side = [r for r in pruned if (r["speedup_measured"] > 1) == (r["speedup_predicted"] > 1)]
    speedup_error = [r["speedup_predicted"] / r["speedup_measured"] for r in pruned]
    energy_error = [r["energy_predicted_over_measured"] for r in priced if "energy_predicted_over_measured" in r]
    return {"profile": profile.name, "device": profile.device, "source": profile.source,
            "rows": priced,
            "summary": {"median_predicted_over_measured": statistics.median(r["predicted_over_measured"] for r in priced),
                        "range_predicted_over_measured": [min(r["predicted_over_measured"] for r in priced),
                                                          max(r["predicted_over_measured"] for r in priced)],
                        "range_speedup_predicted_over_measured": [min(speedup_error), max(speedup_error)],
                        "pruned_rows": len(pruned),
                        "pruned_rows_speedup_on_the_measured_side_of_1": len(same_side),
                        "range_energy_predicted_over_measured": [min(energy_error), max(energy_error)] if energy_error
                        else None}}


def fitted(profile: HardwareProfile, rows: list[dict]) -> HardwareProfile:
    """``profile`` with the GEMM efficiency curve (efficiency, saturation size, exponent) that best predicts
    ``rows``: least squares of log(predicted / measured), the launch overhead and the rest kept."""
    def with_curve(params) -> HardwareProfile:
        efficiency, log_saturation, exponent = params
        return replace(profile, gemm_efficiency=float(efficiency), gemm_saturation_gflop=float(10 ** log_saturation),
                       gemm_saturation_exponent=float(exponent))

    def loss(params) -> float:
        return sum(math.log(r["predicted_over_measured"]) ** 2 for r in check(with_curve(params), rows)["rows"])

    start = (profile.gemm_efficiency, 0.0, 0.5)
    best = scipy.optimize.minimize(loss, start, bounds=[(0.05, 1.0), (-3.0, 3.0), (0.0, 1.0)], method="L-BFGS-B")
    return with_curve(best.x)


def fit_report(profile: HardwareProfile, rows: list[dict]) -> dict:
    """The curve fitted to every row, and, per model, the curve fitted to the other model's rows scored on its own."""
    curve = ("gemm_efficiency", "gemm_saturation_gflop", "gemm_saturation_exponent")
    models = sorted({r["group"].split()[0] for r in rows})
    report = {"all": {k: getattr(fitted(profile, rows), k) for k in curve}, "held_out": {}}
    for model in models:
        trained = fitted(profile, [r for r in rows if not r["group"].startswith(model)])
        scored = check(trained, [r for r in rows if r["group"].startswith(model)])["summary"]
        report["held_out"][model] = {**{k: getattr(trained, k) for k in curve}, "scored_on_it": scored}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="h100", help="whose records: tokens-RECORDS.json, models-RECORDS.json")
    parser.add_argument("--profile", default="h100", help="a shipped profile's name or a profile YAML")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fit", action="store_true",
                        help="also fit the profile's GEMM efficiency curve to the records, and score it on each model held out")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    if args.fit and profile.tables:
        raise SystemExit(f"profile_check: {args.profile} prices by its measured tables; --fit fits a spec profile's curve")
    rows = traced_rows(args.records, one_launch_kernels=profile.kind == "cuda")
    result = check(profile, rows)
    if args.fit:
        result["fit"] = fit_report(profile, rows)
    for r in result["rows"]:
        print(f"{r['group']:36s} {r['impl']:17s} b{r['batch']:<3d} {r['dtype']:8s} measured {r['measured_ms']:6.3f} ms "
              f"predicted {r['predicted_ms']:6.3f} ms ({r['predicted_over_measured']:.2f}x)  speed-up over dense "
              f"measured {r['speedup_measured']:.2f}x predicted {r['speedup_predicted']:.2f}x")
    print(json.dumps(result["summary"]))
    if args.fit:
        print(json.dumps(result["fit"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
