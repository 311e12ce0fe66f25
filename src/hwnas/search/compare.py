"""``search compare``: one search per hardware profile, side by side.

Each profile gets its own study under ``OUT/<profile name>`` (reused and resumed when it is
already there): measured on this machine when the profile is this machine's, predicted from
the profile otherwise. The comparison shows each front (latency relative to the device's own
dense model, so devices of any speed share one plot), the most accurate configuration under
the same budget on each (``--budget``, or by default latency ≤ half the device's dense latency),
how those configurations differ variable by variable, and, where a study has both measured and
predicted latency, the predictor's error over its front. Written to ``compare.json``,
``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hwnas.errors import HwnasError
from hwnas.hwprofiles.profile import HardwareProfile, is_this_machine, load_profile
from hwnas.search.objectives import format_metric
from hwnas.search.runner import run_study
from hwnas.search.study import RunSettings, StudyDir, read_pareto
from hwnas.spaces import Space

DEFAULT_ACCURACY_DROP = 0.01  # without --budget: the fastest point within 1 point of the dense model's accuracy


@dataclass
class ProfileResult:
    """One profile's study, as the comparison reads it."""

    profile: HardwareProfile
    measured: bool
    path: Path
    document: dict  # pareto.json

    @property
    def latency_metric(self) -> str:
        return "latency_ms" if self.measured else "latency_ms_predicted"

    @property
    def dense_latency(self) -> float:
        return self.document["baseline"]["metrics"][self.latency_metric]

    def pick(self, budget_set: bool) -> dict | None:
        """With a budget, the most accurate front point (all are within it); without, the fastest
        point within ``DEFAULT_ACCURACY_DROP`` of the dense model's accuracy, or the dense model."""
        points = self.document["points"]
        if budget_set:
            return max(points, key=lambda p: (p["metrics"]["accuracy"], -p["metrics"][self.latency_metric]),
                       default=None)
        baseline = self.document["baseline"]
        floor = baseline["metrics"]["accuracy"] - DEFAULT_ACCURACY_DROP
        close = [p for p in points if p["metrics"]["accuracy"] >= floor - 1e-12]
        dense = {"trial": "dense", "config": baseline["config"], "metrics": baseline["metrics"]}
        return min(close + [dense], key=lambda p: p["metrics"][self.latency_metric])  # dense when nothing is faster

    def prediction_error(self) -> dict | None:
        """Median and max |predicted − measured| / measured latency over the front (measured studies only)."""
        pairs = [(p["metrics"]["latency_ms_predicted"], p["metrics"]["latency_ms"]) for p in self.document["points"]
                 if "latency_ms_predicted" in p["metrics"] and "latency_ms" in p["metrics"]]
        if not pairs:
            return None
        errors = [abs(pred - meas) / meas for pred, meas in pairs]
        return {"median": statistics.median(errors), "max": max(errors), "n": len(errors)}

    def prediction_error_all_trials(self) -> dict | None:
        """The same over every trial that both measured and predicted latency (the study's report summary):
        more points than a front of a few, so less at the mercy of one noisy measurement."""
        summary = self.document.get("predicted", {}).get("latency_ms_predicted")
        if not self.measured or not summary:
            return None
        return {"median": summary["median_rel_error"], "max": summary["max_rel_error"], "n": summary["n"]}


def compare(space: Space, profiles: list[str], out: str | Path, trials: int, budget: str = "",
            optimizer: str = "nsga2", seed: int = 0, workers: int = 1, device: str = "cpu",
            console: Console | None = None, progress: bool = True) -> list[ProfileResult]:
    """Run (or reuse) one study per profile under ``out``; return them in the order given."""
    console = console or Console(stderr=True)
    loaded = [load_profile(p) for p in profiles]
    names = [p.name for p in loaded]
    if len(set(names)) != len(names):
        raise HwnasError(f"two profiles share the name '{max(names, key=names.count)}': give each a distinct name")
    results = []
    for profile in loaded:
        path = Path(out) / profile.name
        settings = RunSettings(objectives="accuracy,latency", budget=budget, optimizer=optimizer, trials=trials,
                               seed=seed, workers=workers, device=device)
        settings.target(profile)
        study_dir = StudyDir.reuse_or_create(path, space, settings)
        measured = is_this_machine(profile, study_dir.settings.device)
        console.print(f"[bold]{profile.describe()}[/]: {'measured here' if measured else 'predicted from the profile'}")
        run_study(study_dir, console, progress)
        results.append(ProfileResult(profile, measured, path, read_pareto(path)))
    return results


def comparison_tables(results: list[ProfileResult], budget_set: bool) -> list[Table]:
    """The side-by-side table of the studies, and the chosen configurations variable by variable."""
    overview = Table(title="fronts side by side", title_justify="left")
    overview.add_column("")
    for r in results:
        overview.add_column(r.profile.name, justify="right")
    picks = [r.pick(budget_set) for r in results]
    rule = "the budget" if budget_set else f"≤ {DEFAULT_ACCURACY_DROP:.0%} accuracy drop"
    rows = {
        "device": [r.profile.device for r in results],
        "latency is": ["measured" if r.measured else f"predicted ({r.profile.source} profile)" for r in results],
        "dense latency": [format_metric("latency_ms", r.dense_latency) for r in results],
        "dense accuracy": [format_metric("accuracy", r.document["baseline"]["metrics"]["accuracy"]) for r in results],
        "front points": [str(len(r.document["points"])) for r in results],
        f"chosen ({rule})": [(f"trial {p['trial']}" if p["trial"] != "dense" else "dense") if p else "none" for p in picks],
        "· accuracy": [format_metric("accuracy", p["metrics"]["accuracy"]) if p else "-" for p in picks],
        "· latency": [format_metric("latency_ms", p["metrics"][r.latency_metric]) if p else "-"
                      for r, p in zip(results, picks)],
        "· speed-up over dense": [f"{r.dense_latency / p['metrics'][r.latency_metric]:.2f}x" if p else "-"
                                  for r, p in zip(results, picks)],
    }
    for over, errors in (("front", [r.prediction_error() for r in results]),
                         ("all trials", [r.prediction_error_all_trials() for r in results])):
        if any(errors):
            rows[f"predicted vs measured latency ({over})"] = [
                f"median {e['median']:.1%}, max {e['max']:.1%} (n={e['n']})" if e else "-" for e in errors]
    for label, values in rows.items():
        overview.add_row(label, *values)

    choices = Table(title="chosen configuration per variable", title_justify="left")
    choices.add_column("variable")
    for r in results:
        choices.add_column(r.profile.name, justify="right")
    choices.add_column("differs")
    if all(picks):
        names = list(picks[0]["config"])
        for name in names:
            values = [p["config"].get(name) for p in picks]
            choices.add_row(name, *(str(v) for v in values), "*" if len({json.dumps(v) for v in values}) > 1 else "")
        differing = sum(len({json.dumps(p["config"].get(n)) for p in picks}) > 1 for n in names)
        choices.caption = f"{differing} of {len(names)} variables differ"
    else:
        choices.caption = "a profile has no point under the budget: nothing to compare"
    return [overview, choices]


def write_comparison(out: str | Path, results: list[ProfileResult], budget_set: bool) -> Path:
    """``compare.json`` (the data), ``compare.md`` (the tables) and ``compare.png`` (both fronts)."""
    out = Path(out)
    data = {"profiles": [{"name": r.profile.name, "device": r.profile.device, "source": r.profile.source,
                          "measured": r.measured, "study": str(r.path), "latency_metric": r.latency_metric,
                          "dense_latency_ms": r.dense_latency, "pick": r.pick(budget_set),
                          "prediction_error": r.prediction_error(),
                          "prediction_error_all_trials": r.prediction_error_all_trials()} for r in results]}
    (out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    console = Console(record=True, width=160, file=io.StringIO())
    for table in comparison_tables(results, budget_set):
        console.print(table)
    (out / "compare.md").write_text("# Hardware comparison\n\n```\n" + console.export_text() + "```\n\n"
                                    "![fronts](compare.png)\n")
    _plot(out / "compare.png", results)
    return out


def _plot(path: Path, results: list[ProfileResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        points = sorted(r.document["points"], key=lambda p: p["metrics"][r.latency_metric])
        xs = [p["metrics"][r.latency_metric] / r.dense_latency for p in points]
        ys = [100 * p["metrics"]["accuracy"] for p in points]
        kind = "measured" if r.measured else "predicted"
        ax.step(xs, ys, where="post", marker="o", label=f"{r.profile.name} ({kind})")
    ax.set_xlabel("latency / the device's dense latency")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
