"""``search bench prune``: accuracy of second-order block pruning against magnitude pruning, no fine-tuning.

The built-in digits DeiT (``digits-deit``, trained on scikit-learn's digits) with every
qkv/proj/fc1/fc2 layer pruned to the same block sparsity (0.25, 0.5, 0.75; blocks 16 and 32):
``hwnas`` is LPViT-style OBS saliency with compensation (``LayerDatabase``, Hessians from the
whole calibration split: 270 images × 17 tokens = 4590 rows per layer), ``magnitude`` removes
the blocks of smallest L2 norm and leaves the rest as they are, ``dense`` is the unpruned model.
Metrics on the test split: ``accuracy`` and ``fidelity_kl`` (mean KL of the dense model's class
distribution to the pruned one's). No timing: the speed of block-sparse layers is ``bench models``.

Damping 0.01 and the whole calibration split were the best of damp 0.001/0.01/0.1 × 48/270
calibration images (measured at block 32: every setting within 0.7 points of dense at 50%
sparsity; 88-95% accuracy at 75%).
"""

from __future__ import annotations

import copy

import torch
from rich.table import Table
from torch import nn

from hwnas.bench.record import result_row
from hwnas.evaluators.metrics import accuracy, fidelity_kl, predict_logits
from hwnas.models.digits import create_digits_model, load_digits_splits
from hwnas.pruning.block_obs import LayerDatabase, apply_block_sparsity, find_linear_layers, prune_blocks_magnitude

MODEL = "digits-deit"
DIGITS_CHECKPOINTS = (MODEL,)  # recorded with the results (``checkpoint_fingerprint``)
SPARSITIES = (0.25, 0.5, 0.75)
BLOCKS = (16, 32)
DAMP = 0.01
CALIB_BATCH = 64


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    model = create_digits_model(MODEL).to(device)
    data = load_digits_splits()
    dense_logits = predict_logits(model, data.test_x)
    sparsities, blocks = ((0.5,), (16,)) if quick else (SPARSITIES, BLOCKS)

    def metrics(pruned: nn.Module) -> dict:
        logits = predict_logits(pruned, data.test_x)
        return {"accuracy": accuracy(logits, data.test_y), "fidelity_kl": fidelity_kl(dense_logits, logits)}

    rows = []
    dense = metrics(model)
    for block in blocks:
        db = LayerDatabase.build(model, data.calib_x.to(device).split(CALIB_BATCH), block, sparsities, damp=DAMP, progress=False)
        for sparsity in sparsities:
            case = {"model": MODEL, "sparsity": sparsity, "block": block}
            config = dict.fromkeys(db.layer_names, sparsity)
            rows.append(result_row(case, "dense", None, dense))
            rows.append(result_row(case, "hwnas", None, metrics(apply_block_sparsity(model, db, config))))
            rows.append(result_row(case, "magnitude", None, metrics(magnitude_pruned(model, sparsity, block))))
    return rows


@torch.no_grad()
def magnitude_pruned(model: nn.Module, sparsity: float, block: int) -> nn.Module:
    """A copy of ``model`` with the smallest-norm blocks of every qkv/proj/fc1/fc2 layer zeroed."""
    pruned = copy.deepcopy(model)
    for layer in find_linear_layers(pruned).values():
        layer.weight.copy_(prune_blocks_magnitude(layer.weight, sparsity, block)[0])
    return pruned


def summary(rows: list[dict]) -> Table:
    table = Table(title="block pruning without fine-tuning (test accuracy)", title_justify="left")
    for column in ("model", "block", "sparsity", "dense", "hwnas", "magnitude", "hwnas − dense", "KL hwnas", "KL magnitude"):
        table.add_column(column, justify="right")
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        c = row["case"]
        by_case.setdefault((c["model"], c["block"], c["sparsity"]), {})[row["impl"]] = row["metrics"]
    for (model, block, sparsity), impls in by_case.items():
        dense, ours, magnitude = (impls[k]["accuracy"] for k in ("dense", "hwnas", "magnitude"))
        table.add_row(
            model, str(block), f"{sparsity:.2f}", f"{dense:.1%}", f"{ours:.1%}", f"{magnitude:.1%}",
            f"{(ours - dense) * 100:+.1f} pt", f"{impls['hwnas']['fidelity_kl']:.4f}", f"{impls['magnitude']['fidelity_kl']:.4f}",
        )  # fmt: skip
    return table
