"""``search bench models``: a whole DeiT-B with block-sparse linear layers against the dense model, side by side.

timm ``deit_base_patch16_224`` (random weights: time does not depend on values) dense, and the
same weights with 50% block sparsity (seeded random masks with exactly half the blocks of each
layer removed; b = 32, and on CUDA also b = 64) in every qkv/proj/fc1/fc2 layer, swapped for
``BlockSparseLinear`` by ``to_block_sparse_layers``, each layer on the path its ``calibrate`` chose
for this batch and device, as a deployed model runs (counts in ``metrics.impls``: the Triton
kernel or dense on CUDA; dense, gather or PyTorch's BSR on the CPU). Batch 1
and 64, float16 on CUDA (each model captured in a CUDA graph, whose replay is timed and metered),
float32 on the CPU. ``metrics.energy_mj`` is the energy per image where a hardware counter exists
(NVML, RAPL), never estimated; with the idle power read from the same counter before the runs,
``energy_above_idle_mj`` is the part above idle (total − idle W × time).
"""

from __future__ import annotations

import copy
import functools
from collections import Counter

import timm
import torch
from rich.table import Table
from torch import nn

from hwnas.bench.kernels import block_mask
from hwnas.bench.record import result_row
from hwnas.hwprofiles.energy import Energy, idle_power_w, measure_energy
from hwnas.hwprofiles.latency import cuda_graph_replay, measure
from hwnas.pruning.block_layers import calibrate_block_sparse, to_block_sparse_layers
from hwnas.pruning.block_obs import find_linear_layers

MODEL = "deit_base_patch16_224"
SPARSITY = 0.5
BLOCKS = {"cpu": (32,), "cuda": (32, 64)}
BATCHES = (1, 64)
ENERGY_SECONDS = 2.0  # NVML's counter moves in steps: a longer window, a smaller relative step


def block_sparse_copy(model: nn.Module, block: int, sparsity: float = SPARSITY) -> nn.Module:
    """A copy of ``model`` whose qkv/proj/fc1/fc2 layers keep a seeded random ``1 - sparsity`` of their blocks."""
    sparse = copy.deepcopy(model)
    masks = {
        name: block_mask(layer.out_features // block, layer.in_features // block, sparsity, seed)
        for seed, (name, layer) in enumerate(find_linear_layers(sparse).items())
    }
    return to_block_sparse_layers(sparse, masks, block)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    dense = timm.create_model(MODEL, pretrained=False).eval()
    sparse = {block: block_sparse_copy(dense, block).to(device, dtype) for block in BLOCKS[device.type]}
    dense = dense.to(device, dtype)
    idle_w = idle_power_w(device)
    rows = []
    for batch in (1,) if quick else BATCHES:
        x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        if cuda:
            warmup, repeats = 10, 50
        else:  # a batch-64 DeiT-B forward takes ~15 s on 2 cores
            warmup, repeats = (1, 3) if quick or batch > 1 else (2, 10)
        for block, sparse_model in sparse.items():
            case = {"model": MODEL, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "sparsity": SPARSITY, "block": block}
            # on the CPU at batch 64 a layer call takes 0.1-1 s: one timed call per path
            calib_warmup, calib_repeats = (0, 1) if batch > 1 and not cuda else (1, 5)
            chosen = calibrate_block_sparse(sparse_model, x, warmup=calib_warmup, repeats=calib_repeats)
            sparse_metrics = {"impls": dict(Counter(chosen.values()))}
            for impl, model, metrics in (("dense", dense, {}), ("hwnas", sparse_model, sparse_metrics)):
                call = functools.partial(model, x)
                if cuda:  # latency and energy both of the graph's replay
                    call = cuda_graph_replay(call, device)
                timing = measure(call, device, warmup, repeats)
                energy = measure_energy(call, device, min_seconds=ENERGY_SECONDS, idle_w=idle_w)
                if energy is not None:
                    metrics = {**metrics, **energy_metrics(energy, batch, idle_w)}
                rows.append(result_row(case, impl, timing, metrics))
    return rows


def energy_metrics(energy: Energy, batch: int, idle_w: float | None) -> dict:
    """Energy per image (mJ): the counter's total and, with a known idle power, the part above idle."""
    metrics = {"energy_mj": energy.mj_per_call / batch, "energy_source": energy.source}
    if energy.above_idle_mj_per_call is not None:
        metrics.update(energy_above_idle_mj=energy.above_idle_mj_per_call / batch, idle_w=idle_w)
    return metrics


def summary(rows: list[dict]) -> Table:
    table = Table(title="DeiT-B, 50% block sparsity vs dense (median ms)", title_justify="left", caption="ratios: dense ÷ hwnas; energy above idle in brackets")
    for column in ("model", "batch", "dtype", "block", "dense", "hwnas", "speed-up", "energy ratio", "paths"):
        table.add_column(column, justify="right")
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        c = row["case"]
        by_case.setdefault((c["model"], c["batch"], c["dtype"], c["block"]), {})[row["impl"]] = row
    for (model, batch, dtype, block), impls in by_case.items():
        dense, ours = impls["dense"], impls["hwnas"]
        energy = [impl.get("metrics", {}).get("energy_mj") for impl in (dense, ours)]
        above_idle = [impl.get("metrics", {}).get("energy_above_idle_mj") for impl in (dense, ours)]
        paths = ours.get("metrics", {}).get("impls", {})
        table.add_row(
            model, str(batch), dtype, str(block), f"{dense['median_ms']:.1f}", f"{ours['median_ms']:.1f}",
            f"{dense['median_ms'] / ours['median_ms']:.2f}x",
            "n/a" if None in energy else f"{energy[0] / energy[1]:.2f}x"
            + ("" if None in above_idle else f" ({above_idle[0] / above_idle[1]:.2f}x)"),
            ", ".join(f"{k} {v}" for k, v in sorted(paths.items())),
        )  # fmt: skip
    return table
