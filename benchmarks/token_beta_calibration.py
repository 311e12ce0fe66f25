"""Would a β chosen per model beat the fixed ``SPECTRAL_WEIGHT``? Read from the records of ``token_seeds.py``.

    PYTHONPATH=src python3 benchmarks/token_beta_calibration.py [RECORD.json ...]
    # default: benchmarks/results/token-seeds-cpu-{xeon,epyc}-2threads.json

No new measurement: the records hold each seed's right answers on the calibration and test splits
separately, per schedule and β. Here the calibration split decides and the test split scores, for
every method alike: each model's schedule (and, for the calibrated UCC, its β, ties to the β
nearest ``SPECTRAL_WEIGHT``) is the one with the most right answers on the calibration images,
and what counts is that choice's right answers on the test images. Prints, per record and FLOPs
reduction, the sums over seeds for ToMe, UCC at the fixed β and UCC with its calibrated β, and on
how many models each UCC is at least ToMe.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from hwnas.pruning.token_methods import SPECTRAL_WEIGHT

RECORDS = ("benchmarks/results/token-seeds-cpu-xeon-2threads.json", "benchmarks/results/token-seeds-cpu-epyc-2threads.json")


def chosen_on_calibration(rows: list[dict]) -> dict:
    """The row with the most right answers on the calibration split (the first of equals)."""
    return max(rows, key=lambda row: row["metrics"]["correct_calib"])


def report(path: str) -> None:
    by_method = defaultdict(list)  # (seed, target, impl, β or None) -> the rows of its schedules
    for row in json.loads(Path(path).read_text())["results"]:
        case = row["case"]
        by_method[(case["seed"], case["flops_reduction"], row["impl"], case.get("spectral_weight"))].append(row)
    seeds = sorted({key[0] for key in by_method})
    targets = sorted({key[1] for key in by_method})
    weights = sorted({key[3] for key in by_method if key[2] == "hwnas"})
    print(path)
    for target in targets:
        test = defaultdict(list)  # method -> right answers on the test split, per seed
        for seed in seeds:
            test["tome"].append(chosen_on_calibration(by_method[(seed, target, "tome", None)])["metrics"]["correct_test"])
            ucc = {w: chosen_on_calibration(by_method[(seed, target, "hwnas", w)]) for w in weights}
            test[f"β={SPECTRAL_WEIGHT}"].append(ucc[SPECTRAL_WEIGHT]["metrics"]["correct_test"])
            calibrated = max(weights, key=lambda w: (ucc[w]["metrics"]["correct_calib"], -abs(w - SPECTRAL_WEIGHT)))
            test["β calibrated"].append(ucc[calibrated]["metrics"]["correct_test"])
        print(f"  −{target:.0%} FLOPs, {len(seeds)} models: right answers on the test split (sum, per model)")
        for method, per_seed in test.items():
            at_least_tome = sum(a >= b for a, b in zip(per_seed, test["tome"]))
            versus = "" if method == "tome" else f"  ≥ ToMe on {at_least_tome} of {len(seeds)}"
            print(f"    {method:13s} {sum(per_seed):5d} {per_seed}{versus}")


def main() -> None:
    for path in sys.argv[1:] or RECORDS:
        report(path)


if __name__ == "__main__":
    main()
