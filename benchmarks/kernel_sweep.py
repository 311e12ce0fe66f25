"""Every configuration of the block-sparse kernel, forced one at a time: the data behind its autotune list.

    PYTHONPATH=src python3 benchmarks/kernel_sweep.py [SPARSITIES] [BLOCKS]    # default 0.5,0.75,0.9 64,32
    PYTHONPATH=src python3 benchmarks/kernel_sweep.py --from FILE              # describe a recorded sweep again

On a CUDA GPU (a session lent the device tool), at the DeiT-B shapes of ``search bench kernels``,
batch 64, fp16. Per case it times, each as a CUDA graph replay: dense ``F.linear``, dense on the
kept share of K alone (cuBLAS doing only the kept work: what a perfect block-sparse kernel could
reach), the autotuned kernel, and every forced configuration (BLOCK_M, KB, FEATURE_MAJOR, warps,
stages), each checked against the masked dense weight. Prints the best of each tile layout per
case; writes everything to $OUT/kernel_sweep.json (or ./kernel_sweep.json).
H100 result: benchmarks/results/kernel-sweep-h100.json.

Each best configuration is also given the rate at which it moved data from L2 to the SMs, as the
tile layout implies (``l2_traffic``): every program (one b-wide block-row, BLOCK_M tokens) reads
BLOCK_M×b inputs and b×b weights per kept block, and every output is written once. On the H100
at 50 % sparsity the best configurations all moved 5.7-7.3 TB/s, at b=32 as at b=64, while their
FLOP rates differ by 1.6x: the kernel is bound by that traffic, which only a tile reading each
input for more than b outputs can lower.
"""
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from hwnas.bench.kernels import SHAPES, block_mask, relative_error
from hwnas.hwprofiles.latency import measure
from hwnas.kernels import block_sparse as bs


#: the tokens of every case: DeiT-B's 197 at batch 64
TOKENS = 197 * 64


def configurations(block: int):
    """Every (tile layout, BLOCK_M, KB, warps, stages) worth trying at block size ``block``."""
    for fm, bm, kb, w, s in itertools.product((False, True), (64, 128, 256, 512), (1, 2, 4), (4, 8), (3, 4)):
        if fm and block < 64 or kb * block > 256 or (bm == 64 and w == 8) or (bm == 512 and (kb, w) != (1, 8)):
            continue  # feature-major needs 64 rows; K steps past 256; 8 warps on 64 rows; 512 rows: 8 warps, 1 block
        yield dict(FEATURE_MAJOR=fm, BLOCK_M=bm, KB=kb, num_warps=w, num_stages=s)


def run_forced(x2: torch.Tensor, weight: bs.BsrWeight, bias: torch.Tensor, y: torch.Tensor, config: dict) -> torch.Tensor:
    """One launch of the kernel with ``config`` instead of the autotuner's choice."""
    b = weight.block
    grid = (weight.shape[0] // b, triton.cdiv(x2.shape[0], config["BLOCK_M"]))
    bs._bsr_linear_kernel.fn[grid](
        x2, weight.blocks, weight.col_indices, weight.row_offsets, bias, y,
        x2.shape[0], weight.shape[0], weight.shape[1], x2.stride(0), y.stride(0),
        B=b, HAS_BIAS=True, PRECISION="tf32", UPCAST=False, **config,
    )  # fmt: skip
    return y


def sweep_case(inp: int, out: int, sparsity: float, block: int, seed: int, tokens: int = TOKENS) -> dict:
    timed = lambda fn: measure(fn, "cuda", 5, 30, cuda_graph=True).median_ms  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=gen) / inp**0.5).cuda().half()
    bias = torch.randn(out, generator=gen).cuda().half()
    x = torch.randn(tokens, inp, generator=gen).cuda().half()
    weight = bs.BsrWeight.from_dense(w, block_mask(out // block, inp // block, sparsity, seed))
    reference = F.linear(x.float(), weight.to_dense().float(), bias.float())
    kept_k = round(inp * (1 - sparsity) / 64) * 64
    record = dict(
        shape=[inp, out], sparsity=sparsity, block=block,
        dense=timed(lambda: F.linear(x, w, bias)),
        dense_kept_k=timed(lambda: F.linear(x[:, :kept_k], w[:, :kept_k], bias)),
        autotuned=timed(lambda: bs.bsr_linear(x, weight, bias)), tuned=bs.tuned_config(), forced=[],
    )  # fmt: skip
    y = torch.empty(tokens, out, device="cuda", dtype=torch.half)
    for config in configurations(block):
        try:
            y.fill_(float("nan"))  # every element must be written
            error = relative_error(run_forced(x, weight, bias, y, config), reference)
            record["forced"].append(dict(config, ms=timed(lambda: run_forced(x, weight, bias, y, config)), rel_err=error))
        except Exception as failure:  # out of shared memory, for instance
            record["forced"].append(dict(config, error=type(failure).__name__))
    return record


def l2_traffic(record: dict, config: dict, tokens: int = TOKENS) -> float:
    """TB/s from L2 to the SMs that ``config``'s time implies: BLOCK_M×b inputs and b×b weights per kept block
    per program, and each output written once (fp16)."""
    inp, out = record["shape"]
    b, block_m = record["block"], config["BLOCK_M"]
    kept = round((out // b) * (inp // b) * (1 - record["sparsity"]))
    moved = -(-tokens // block_m) * kept * (block_m * b + b * b) + tokens * out
    return 2 * moved / (config["ms"] * 1e-3) / 1e12


def describe(record: dict) -> str:
    ran = [f for f in record["forced"] if "ms" in f]
    wrong = [f for f in ran if not f["rel_err"] < 5e-3]
    inp, out = record["shape"]
    line = (f"{inp}->{out} s={record['sparsity']} b={record['block']}: dense {record['dense']:.4f} "
            f"kept-K dense {record['dense_kept_k']:.4f} autotuned {record['autotuned']:.4f}")
    for layout in (False, True):
        family = [f for f in ran if f["FEATURE_MAJOR"] == layout]
        if family:
            best = min(family, key=lambda f: f["ms"])
            line += (f" | FM={int(layout)} {best['ms']:.4f} ({record['dense'] / best['ms']:.2f}x) BM{best['BLOCK_M']} "
                     f"KB{best['KB']} w{best['num_warps']} s{best['num_stages']}, "
                     f"L2 {l2_traffic(record, best):.1f} TB/s")
    return line + (f"  WRONG OUTPUT in {len(wrong)} configurations" if wrong else "")


def main() -> None:
    if sys.argv[1:2] == ["--from"]:
        with open(sys.argv[2]) as file:
            for record in json.load(file):
                print(describe(record))
        return
    sparsities = [float(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0.5,0.75,0.9").split(",")]
    blocks = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "64,32").split(",")]
    path = os.path.join(os.environ.get("OUT", "."), "kernel_sweep.json")
    records, start = [], time.time()
    for seed, ((inp, out), sparsity, block) in enumerate(itertools.product(SHAPES, sparsities, blocks)):
        records.append(sweep_case(inp, out, sparsity, block, seed))
        print(describe(records[-1]), f"[{time.time() - start:.0f} s]", flush=True)
        with open(path, "w") as file:
            json.dump(records, file, indent=1)


if __name__ == "__main__":
    main()
