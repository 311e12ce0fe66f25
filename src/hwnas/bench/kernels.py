"""``search bench kernels``: the block-sparse linear kernel against dense and PyTorch's BSR, side by side.

DeiT-B linear shapes (qkv 768→2304, proj 768→768, fc1 768→3072, fc2 3072→768) on 197 tokens per
image at batch 1, 8 and 64; block sparsity 0.5, 0.75 and 0.9 (seeded random block masks with
exactly ``round(sparsity × blocks)`` blocks removed); blocks 32 and 64; float16 on CUDA, float32
on the CPU; every layer with its bias. Case ``shape`` is [tokens per image, in, out]. On CUDA
each call is captured in a CUDA graph and its replay timed, so the numbers are the GPU's time,
not Python's launch overhead (which Triton's autotuned launch makes large at these sizes).

Implementations: ``dense`` is ``F.linear`` with the dense weight; ``torch_bsr`` is PyTorch's BSR
(``weight.to_sparse_bsr((b, b))``, ``torch.addmm(bias, W, xᵀ)``), left out with the reason in
the hwnas row's ``metrics`` where PyTorch does not support it; ``hwnas`` is ``BlockSparseLinear``:
the Triton kernel on CUDA (this benchmark measures the kernel, so nothing is calibrated there),
on the CPU the path ``calibrate`` chose (``metrics.cpu_impl``). Each hwnas row also checks its
output: ``metrics.rel_err`` is ‖y − y_ref‖ / ‖y_ref‖ against ``F.linear`` with the masked dense
weight in float32 (fp16 rounding gives about 1e-3; a wrong kernel, ~1).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import torch
import torch.nn.functional as F
from rich.table import Table

from hwnas.bench.record import result_row
from hwnas.hwprofiles.latency import measure
from hwnas.kernels.block_sparse import BlockSparseLinear, BsrWeight, bsr_linear_reference, tuned_config

SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
TOKENS = 197
BATCHES = (1, 8, 64)
SPARSITIES = (0.5, 0.75, 0.9)
BLOCKS = (32, 64)


def block_mask(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    """Bool ``[rows, cols]`` with exactly ``round(sparsity × rows × cols)`` blocks removed (False)."""
    order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows * cols, dtype=torch.bool)
    mask[order[: round(sparsity * rows * cols)]] = False
    return mask.reshape(rows, cols)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    layers = [((768, 768), 0.75, 32)] if quick else list(itertools.product(SHAPES, SPARSITIES, BLOCKS))
    rows = []
    for seed, ((inp, out), sparsity, block) in enumerate(layers):  # one weight and mask per layer
        for batch in (1,) if quick else BATCHES:
            rows += _case(inp, out, batch, sparsity, block, device, seed, quick)
    return rows


def _case(
    inp: int, out: int, batch: int, sparsity: float, block: int, device: torch.device, seed: int, quick: bool
) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    name = str(dtype).removeprefix("torch.")
    case = {"shape": [TOKENS, inp, out], "batch": batch, "dtype": name, "sparsity": sparsity, "block": block}
    if cuda:
        warmup, repeats = 10, 50
    else:  # a batch-64 fc1 is ~30 GFLOP: a fraction of a second per call on 2 cores
        warmup, repeats = (1, 3) if quick or batch == 64 else (2, 10 if batch == 1 else 5)

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out, inp, generator=gen) / inp**0.5).to(device, dtype)
    bias = torch.randn(out, generator=gen).to(device, dtype)
    x = torch.randn(batch, TOKENS, inp, generator=gen).to(device, dtype)
    mask = block_mask(out // block, inp // block, sparsity, seed)
    layer = BlockSparseLinear(BsrWeight.from_dense(weight, mask), bias)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse BSR tensor support is in beta")
        sparse = layer.weight.to_dense().to_sparse_bsr((block, block))
    x2 = x.reshape(-1, inp)

    metrics = {}
    if not cuda:
        layer.calibrate(x, warmup=1, repeats=3 if quick or batch > 1 else 5)
        metrics["cpu_impl"] = layer.impl["cpu"]
    timed = functools.partial(measure, device=device, warmup=warmup, repeats=repeats, cuda_graph=cuda)
    rows = [result_row(case, "dense", timed(lambda: F.linear(x, weight, bias)))]
    torch_bsr = lambda: torch.addmm(bias[:, None], sparse, x2.T).T  # noqa: E731
    try:
        with torch.inference_mode():
            torch_bsr()
    except RuntimeError as error:  # NotImplementedError included
        metrics["torch_bsr_skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    else:
        rows.append(result_row(case, "torch_bsr", timed(torch_bsr)))
    with torch.inference_mode():
        metrics["rel_err"] = relative_error(layer(x), bsr_linear_reference(x.float(), layer.weight, layer.bias))
    timing = timed(lambda: layer(x))
    if cuda:
        metrics["kernel_config"] = tuned_config()
    rows.append(result_row(case, "hwnas", timing, metrics))
    return rows


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖ / ‖reference‖ in float32."""
    output, reference = output.float(), reference.float()
    return float(torch.linalg.vector_norm(output - reference) / torch.linalg.vector_norm(reference))


def summary(rows: list[dict]) -> Table:
    table = Table(title="block-sparse linear (median ms)", title_justify="left", show_edge=False)
    columns = ("in→out", "batch", "block", "sparsity", "dense", "torch_bsr", "hwnas", "path", "vs dense", "vs bsr")
    for column in columns:
        table.add_column(column, justify="right")
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        c = row["case"]
        by_case.setdefault((c["shape"][1], c["shape"][2], c["batch"], c["block"], c["sparsity"]), {})[row["impl"]] = row
    skipped = set()
    for (inp, out, batch, block, sparsity), impls in by_case.items():
        dense, ours = impls["dense"]["median_ms"], impls["hwnas"]["median_ms"]
        metrics = impls["hwnas"].get("metrics", {})
        ref = impls.get("torch_bsr", {}).get("median_ms")
        if "torch_bsr_skipped" in metrics:
            skipped.add(metrics["torch_bsr_skipped"])
        table.add_row(
            f"{inp}→{out}", str(batch), str(block), f"{sparsity:.2f}",
            f"{dense:.2f}", "n/a" if ref is None else f"{ref:.2f}", f"{ours:.2f}",
            metrics.get("cpu_impl", "triton"),
            f"{dense / ours:.2f}x", "n/a" if ref is None else f"{ref / ours:.2f}x",
        )  # fmt: skip
    errors = [row["metrics"]["rel_err"] for row in rows if "rel_err" in row.get("metrics", {})]
    captions = [f"largest relative error of hwnas against the masked dense weight: {max(errors):.1e}"] if errors else []
    if skipped:
        captions.append("torch_bsr not run (unsupported by PyTorch here): " + "; ".join(sorted(skipped)))
    table.caption = "\n".join(captions) or None
    return table
