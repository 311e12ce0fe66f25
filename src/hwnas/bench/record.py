"""The benchmark JSON format of DESIGN.md: raw measurements, so anyone can recompute the ratios."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from hwnas.hwprofiles.allocator import allocator_setting
from hwnas.hwprofiles.latency import Timing, device_name


def result_row(case: dict, impl: str, timing: Timing | None, metrics: dict | None = None) -> dict:
    """One measurement: the case's parameters, the implementation, its timing and extra metrics."""
    row = {"case": case, "impl": impl}
    if timing is not None:
        row.update(timing.as_dict())
    if metrics:
        row["metrics"] = metrics
    return row


def bench_record(bench: str, device: torch.device | str, results: list[dict],
                 checkpoints: dict[str, str | None] | None = None) -> dict:
    """The whole file: which benchmark, where it ran, the built-in models' weights it measured, and its rows."""
    record = {
        "bench": bench,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if checkpoints:
        record["checkpoints"] = checkpoints
    return {**record, "results": results}


def write_record(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
