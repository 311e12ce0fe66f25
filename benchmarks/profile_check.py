"""How far a GPU profile's predictions are from what its device measured: the committed H100 records.

``search run --hwprofile h100`` on a machine without an H100 optimises predicted latency. This
script predicts, on the CPU, every latency that ``bench tokens`` and ``bench models`` measured on
an H100 (``tokens-h100.json``, ``models-h100.json``: CUDA-graph replays) and writes, per row, the
measured and the predicted latency, and per model the speed-up over dense both ways: whether the
prediction ranks the candidates as the device does.

    python benchmarks/profile_check.py [--profile h100] [--json benchmarks/results/profile-check-h100.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
from pathlib import Path

import timm
import torch

from hwnas.bench import tokens as bench_tokens
from hwnas.bench.models import block_sparse_copy
from hwnas.hwprofiles.predictor import Predictor
from hwnas.hwprofiles.profile import load_profile
from hwnas.pruning.tokens import apply_token_keep

RESULTS = Path(__file__).parent / "results"
#: the token method each impl of tokens-h100.json ran: it was recorded when UCC read every block's attention
TOKEN_IMPLS = {"hwnas": "ucc-blocks", "tome": "tome"}


@functools.cache
def dense_model(name: str) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False).eval()


@functools.cache
def token_model(name: str, impl: str) -> torch.nn.Module:
    """``bench tokens``' model ``impl`` at −50 % FLOPs (cuts at its timing blocks)."""
    dense = dense_model(name)
    if impl == "dense":
        return dense
    keep, _ = bench_tokens.schedule_for_flops(dense, bench_tokens.TIMING_CUTS, 0.5, (3, 224, 224))
    return apply_token_keep(copy.deepcopy(dense), keep, TOKEN_IMPLS[impl])


@functools.cache
def block_sparse_model(name: str, impl: str, block: int, sparsity: float) -> torch.nn.Module:
    """``bench models``' model ``impl``: dense, or its seeded block-sparse copy."""
    dense = dense_model(name)
    return dense if impl == "dense" else block_sparse_copy(dense, block, sparsity)


def measured_rows(record: str) -> list[dict]:
    return [r for r in json.loads((RESULTS / record).read_text())["results"] if "median_ms" in r]


def check(profile_name: str) -> dict:
    profile = load_profile(profile_name)
    torch.manual_seed(0)
    rows = []
    for record in ("tokens-h100.json", "models-h100.json"):
        for row in measured_rows(record):
            case = row["case"]
            if record.startswith("tokens"):
                model, group = token_model(case["model"], row["impl"]), case["model"]
            else:
                model = block_sparse_model(case["model"], row["impl"], case["block"], case["sparsity"])
                group = f"{case['model']} {case['sparsity']:.0%} b{case['block']}"
            x = torch.randn(case["batch"], 3, 224, 224)
            predicted = Predictor(profile, case["dtype"]).predict(model, x)["latency_ms_predicted"]
            rows.append({"record": record, "group": group, "impl": row["impl"], "batch": case["batch"],
                         "dtype": case["dtype"], "measured_ms": row["median_ms"], "predicted_ms": predicted,
                         "predicted_over_measured": predicted / row["median_ms"]})
    for row in rows:
        dense = next(r for r in rows if r["record"] == row["record"] and r["group"] == row["group"]
                     and r["batch"] == row["batch"] and r["impl"] == "dense")
        row["speedup_measured"] = dense["measured_ms"] / row["measured_ms"]
        row["speedup_predicted"] = dense["predicted_ms"] / row["predicted_ms"]
    pruned = [r for r in rows if r["impl"] != "dense"]
    same_side = [r for r in pruned if (r["speedup_measured"] > 1) == (r["speedup_predicted"] > 1)]
    return {"profile": profile.name, "device": profile.device, "source": profile.source,
            "rows": rows,
            "summary": {"median_predicted_over_measured": statistics.median(r["predicted_over_measured"] for r in rows),
                        "range_predicted_over_measured": [min(r["predicted_over_measured"] for r in rows),
                                                          max(r["predicted_over_measured"] for r in rows)],
                        "pruned_rows": len(pruned),
                        "pruned_rows_speedup_on_the_measured_side_of_1": len(same_side)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="h100")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = check(args.profile)
    for r in result["rows"]:
        print(f"{r['group']:36s} {r['impl']:6s} b{r['batch']:<3d} {r['dtype']:8s} measured {r['measured_ms']:6.3f} ms "
              f"predicted {r['predicted_ms']:6.3f} ms ({r['predicted_over_measured']:.2f}x)  speed-up over dense "
              f"measured {r['speedup_measured']:.2f}x predicted {r['speedup_predicted']:.2f}x")
    print(json.dumps(result["summary"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
