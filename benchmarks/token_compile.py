"""``bench tokens``' latency cases eager and under torch.compile, side by side: what compiling does to UCC vs ToMe.

    PYTHONPATH=src python3 benchmarks/token_compile.py [--device cpu] [--json OUT.json] [--quick]

Builds the latency cases of ``search bench tokens`` (deit_small/base, random weights, cuts at
blocks 3, 6, 9 at −50 % FLOPs, the same batches and dtypes) and times dense, UCC and ToMe, each
eager and compiled (``torch.compile``, inductor's default mode, static shapes), all six in one
side-by-side run (interleaved rounds, shuffled order; ``bench tokens``' rounds per batch). Each
row's metrics hold its paired speed-ups: over dense (eager over eager, compiled over compiled),
UCC's over ToMe's alike, and each compiled model's over its eager self. Eager UCC runs about 170
more small operators per forward than ToMe; compiled, inductor fuses them. On CUDA the calls are
plain launches, not the CUDA-graph replays ``bench tokens`` times. Writes OUT (default
benchmarks/results/token-compile.json).
"""

from __future__ import annotations

import argparse
import copy
import functools
import time

import torch

from hwnas.bench.record import bench_record, result_row, write_record
from hwnas.bench.tokens import ROUNDS, latency_cases
from hwnas.hwprofiles.latency import measure_side_by_side, paired_ratio
from hwnas.pruning.tokens import apply_token_keep

METHODS = {"dense": None, "hwnas": "ucc", "tome": "tome"}
#: whom each impl's speed-ups are over
BASELINES = {"dense": (), "hwnas": ("dense", "tome"), "tome": ("dense",)}


def rows(device: torch.device, quick: bool) -> list[dict]:
    results = []
    for dense, keep, x, case in latency_cases(device, quick):
        torch._dynamo.reset()  # each case compiles its own models, within dynamo's cache limit
        calls, compile_s = {}, {}
        with torch.inference_mode():
            for impl, method in METHODS.items():
                model = copy.deepcopy(dense) if method is None else apply_token_keep(copy.deepcopy(dense), keep, method)
                model = model.to(x.device, x.dtype)
                compiled = torch.compile(model, dynamic=False)
                start = time.perf_counter()
                compiled(x)
                compile_s[impl] = time.perf_counter() - start
                calls[impl], calls[f"{impl}-compiled"] = functools.partial(model, x), functools.partial(compiled, x)
            timings = measure_side_by_side(calls, x.device, warmup=3, rounds=5 if quick else ROUNDS[case["batch"]])
        samples = {name: timing.samples_ms for name, timing in timings.items()}
        for impl in METHODS:
            for suffix in ("", "-compiled"):
                name = impl + suffix
                metrics = {f"speedup_vs_{baseline}": vars(paired_ratio(samples[baseline + suffix], samples[name]))
                           for baseline in BASELINES[impl]}
                if suffix:
                    metrics["speedup_vs_eager"] = vars(paired_ratio(samples[impl], samples[name]))
                    metrics["compile_s"] = round(compile_s[impl], 1)
                results.append(result_row({**case, "compiled": bool(suffix)}, impl, timings[name], metrics))
        print_case(case, results[-2 * len(METHODS):])
    return results


def print_case(case: dict, case_rows: list[dict]) -> None:
    print(f"{case['model']} batch {case['batch']} {case['dtype']}:")
    for row in case_rows:
        ratios = "  ".join(f"{key.removeprefix('speedup_')} {value['median']:.3f} ({value['q1']:.3f}-{value['q3']:.3f})"
                           for key, value in row.get("metrics", {}).items() if key.startswith("speedup"))
        mode = "compiled" if row["case"]["compiled"] else "eager"
        print(f"  {row['impl']:6s} {mode:8s} {row['median_ms']:8.2f} ms  {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="benchmarks/results/token-compile.json")
    parser.add_argument("--quick", action="store_true", help="deit_small only, 5 rounds")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"wrote {write_record(bench_record('token-compile', device, rows(device, args.quick)), args.json)}")


if __name__ == "__main__":
    main()
