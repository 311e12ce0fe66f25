"""``search bench tokens``: a token-keep schedule against the dense model, side by side in one run.

timm ``deit_small_patch16_224`` (random weights: time does not depend on values) dense, and the
same model with EViT's schedule, keep 0.7 of the tokens at blocks 4, 7 and 10 (so blocks 4-6,
7-9 and 10-11 process 70%, 49% and 34.3% of the patch tokens), at batch 1 and 8.
"""

from __future__ import annotations

import timm
import torch
from rich.table import Table

from hwnas.bench.record import result_row
from hwnas.hwprofiles.latency import measure
from hwnas.pruning.tokens import apply_token_keep

MODEL = "deit_small_patch16_224"
PRUNE_AT = (4, 7, 10)
KEEP = 0.7


def schedule(depth: int, prune_at=PRUNE_AT, keep: float = KEEP) -> dict[int, float]:
    """Absolute keep ratio per block for 'keep ``keep`` of the tokens at each block of ``prune_at``'."""
    ratios, ratio = {}, 1.0
    for block in range(1, depth):
        if block in prune_at:
            ratio *= keep
        ratios[block] = round(ratio, 6)
    return ratios


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    dense = timm.create_model(MODEL, pretrained=False).eval().to(device)
    pruned = apply_token_keep(timm.create_model(MODEL, pretrained=False).eval(), schedule(len(dense.blocks)))
    pruned.load_state_dict(dense.state_dict())
    pruned = pruned.to(device)
    repeats = 5 if quick else 15
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, device=device)
        case = {"model": MODEL, "batch": batch, "dtype": "float32", "schedule": f"keep {KEEP} at {list(PRUNE_AT)}"}
        for impl, model in (("dense", dense), ("hwnas", pruned)):
            rows.append(result_row(case, impl, measure(lambda: model(x), device, warmup=3, repeats=repeats)))
    return rows


def summary(rows: list[dict]) -> Table:
    table = Table(title="token-keep schedule vs dense (median ms, min-max)", title_justify="left")
    for column in ("model", "batch", "dense", "hwnas", "speed-up"):
        table.add_column(column, justify="right")
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["case"]["model"], row["case"]["batch"]), {})[row["impl"]] = row
    for (model, batch), impls in by_case.items():
        dense, ours = impls["dense"]["median_ms"], impls["hwnas"]["median_ms"]
        table.add_row(model, str(batch), _spread(impls["dense"]), _spread(impls["hwnas"]), f"{dense / ours:.2f}x")
    return table


def _spread(row: dict) -> str:
    return f"{row['median_ms']:.1f} ({row['min_ms']:.1f}-{row['max_ms']:.1f})"
