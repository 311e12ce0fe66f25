"""UCC against ToMe alone, in many paired rounds: how much slower or faster UCC is, with a confidence interval.

    PYTHONPATH=src python3 benchmarks/token_tome_pairs.py [OUT.json] [--compile]   # default OUT:
                                                    # benchmarks/results/token-tome-pairs-cpu.json

``search bench tokens`` times dense, UCC, ``ucc-blocks`` and ToMe side by side in 25–60 rounds,
whose quartiles of UCC/ToMe straddle 1 on a noisy 2-core machine. This times only UCC and ToMe,
on the same latency cases (deit_small/base at −50 % FLOPs, cuts at blocks 3, 6, 9, random
weights, fp32 at batch 1 and 8 on the CPU), in ``ROUNDS`` interleaved rounds of shuffled order.
Per case it reports UCC's paired speed-up over ToMe (ToMe's time / UCC's, round by round: above
1, UCC is faster): the median, its quartiles, and a distribution-free 95 % confidence interval of
the median (the order statistics n/2 ± 0.98·√n of the n ratios). With ``--compile`` both models
run under ``torch.compile`` (inductor, static shapes; each case's rows say ``compiled``).
"""
import argparse
import copy
import functools
import math

import torch

from hwnas.bench.record import bench_record, result_row, write_record
from hwnas.bench.tokens import latency_cases
from hwnas.hwprofiles.latency import measure_side_by_side, paired_ratio
from hwnas.pruning.tokens import apply_token_keep

ROUNDS = {1: 300, 8: 120}
METHODS = {"hwnas": "ucc", "tome": "tome"}


def median_interval(ratios: list[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median of ``ratios``."""
    ordered, n = sorted(ratios), len(ratios)
    half_width = 0.98 * math.sqrt(n)
    return ordered[max(0, math.floor(n / 2 - half_width))], ordered[min(n - 1, math.ceil(n / 2 + half_width))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/token-tome-pairs-cpu.json")
    parser.add_argument("--compile", action="store_true", help="time both models compiled (torch.compile)")
    args = parser.parse_args()
    rows = []
    for dense, keep, x, case in latency_cases(torch.device("cpu")):
        models = {impl: apply_token_keep(copy.deepcopy(dense), keep, method) for impl, method in METHODS.items()}
        if args.compile:
            torch._dynamo.reset()  # each case compiles its own models, within dynamo's cache limit
            models = {impl: torch.compile(model, dynamic=False) for impl, model in models.items()}
            case = {**case, "compiled": True}
        calls = {impl: functools.partial(model, x) for impl, model in models.items()}
        timings = measure_side_by_side(calls, "cpu", warmup=5, rounds=ROUNDS[case["batch"]])
        tome, ucc = timings["tome"].samples_ms, timings["hwnas"].samples_ms
        low, high = median_interval([a / b for a, b in zip(tome, ucc)])
        speedup = {**vars(paired_ratio(tome, ucc)), "ci95_low": low, "ci95_high": high}
        rows += [result_row(case, "hwnas", timings["hwnas"], {"speedup_vs_tome": speedup}),
                 result_row(case, "tome", timings["tome"])]
        print(f"{case['model']} batch {case['batch']}: UCC {timings['hwnas'].median_ms:.2f} ms, ToMe "
              f"{timings['tome'].median_ms:.2f} ms; UCC over ToMe {speedup['median']:.3f}x "
              f"(quartiles {speedup['q1']:.3f}–{speedup['q3']:.3f}, 95 % CI of the median {low:.3f}–{high:.3f}, "
              f"{len(ucc)} rounds)", flush=True)
    print(f"wrote {write_record(bench_record('token-tome-pairs', 'cpu', rows), args.out)}")


if __name__ == "__main__":
    main()
