"""``search profile``: measure this machine into a hardware profile (``source: measured``).

Cost tables per dtype (fp32 on a CPU; fp16, bf16 and fp32 on a GPU), each a list of (size, rate):

* ``gemm``: ``F.linear`` with bias, as models run it, at ViT shapes ([rows, d] → 3d or 4d and
  back, d = 192 and 768, rows from one image to a batch of 64); the peak is the best rate seen;
* ``attention``: ``F.scaled_dot_product_attention`` at ViT shapes (3 or 12 heads of 64, 17 to 197 tokens);
* ``activation``: ``F.gelu`` from 16 KB to 64 MB moved (norms and other transcendental ops cost alike);
* ``elementwise``: ``torch.add`` over the same sizes; the bandwidth is its rate at the largest.

Besides: the per-operator overhead (a tiny ViT at batch 1, whose operators are all too small to
cost anything else: its time over its operator count), the block-sparse efficiency (the best
sparse path of a 75 %-sparse 768→3072 layer, block 32, relative to the GEMM rate at its kept
FLOPs), and power: idle from NVML (GPU) or RAPL (CPU) over one second where readable, and the
GPU's power limit as TDP. Timings are medians after warm-up (``hwprofiles.latency.measure``); on
a GPU each is of a CUDA graph's replay, as the evaluator times candidates.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from hwnas.hwprofiles.energy import idle_power_w
from hwnas.hwprofiles.latency import device_name, measure
from hwnas.hwprofiles.predictor import interpolate, trace_ops
from hwnas.hwprofiles.profile import CostPoint, HardwareProfile
from hwnas.kernels.block_sparse import BlockSparseLinear, bsr_linear, triton_available
from hwnas.progress import transient_progress

GEMM_SHAPES = [(d, f) for d in (192, 768) for f in (3 * d, 4 * d)]
GEMM_ROWS = (17, 197, 1088, 4096, 12608)
ATTENTION_SHAPES = [(batch, heads, tokens) for heads in (3, 12) for tokens in (17, 65, 197) for batch in (1, 8, 64)]
BYTES = tuple(2 ** k for k in range(14, 27, 2))


def measure_profile(device: str = "cpu", name: str | None = None, quick: bool = False,
                    progress: bool = False) -> HardwareProfile:
    """Measure ``device`` (``cpu`` or ``cuda[:i]``) into a profile; ``quick`` measures fewer points.
    ``progress`` shows a bar on stderr (a full CPU profile takes about half a minute)."""
    dev = torch.device(device)
    dtypes = ["float16", "bfloat16", "float32"] if dev.type == "cuda" else ["float32"]
    repeats = 3 if quick else 11
    rows = GEMM_ROWS[:3] if quick else GEMM_ROWS
    main = "float16" if dev.type == "cuda" else "float32"
    steps = len(dtypes) * (2 * len(GEMM_SHAPES) * len(rows) + len(ATTENTION_SHAPES) + 2 * len(BYTES)) + 3
    columns = (TextColumn(f"[bold]profiling[/] {escape(device_name(dev))}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with transient_progress(*columns, enabled=progress) as bar:
        task = bar.add_task("profile", total=steps)

        def advance(steps: int = 1) -> None:
            bar.advance(task, steps)

        tables = {dtype: _tables(dev, getattr(torch, dtype), rows, repeats, advance) for dtype in dtypes}
        overhead_us = _operator_overhead_us(dev, repeats)
        advance()
        sparse_efficiency = _block_sparse_efficiency(dev, getattr(torch, main), tables[main]["gemm"], repeats)
        advance()
        power_w = _power(dev)
        advance()
    elementwise = tables[main]["elementwise"]
    return HardwareProfile(
        name=name or ("cpu-measured" if dev.type == "cpu" else "cuda-measured"),
        device=device_name(dev), kind=dev.type, source="measured",
        peak_tflops={d: max(p.rate for p in t["gemm"]) / 1e12 for d, t in tables.items()},
        memory_bandwidth_gbs=max(elementwise, key=lambda p: p.size).rate / 1e9,
        launch_overhead_us=overhead_us,
        power_w=power_w,
        gemm_efficiency=1.0,
        block_sparse_efficiency=sparse_efficiency,
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        tables=tables)


def _seconds(fn, device: torch.device, repeats: int) -> float:
    return measure(fn, device, warmup=2, repeats=repeats, cuda_graph=True).median_ms / 1e3


def _tables(device: torch.device, dtype: torch.dtype, rows: tuple[int, ...], repeats: int,
            advance: Callable[[int], None]) -> dict:
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    gemm, attention, activation, elementwise = [], [], [], []
    for d, f in GEMM_SHAPES:
        for m in rows:
            for k, n in ((d, f), (f, d)):
                x, w, b = randn(m, k), randn(n, k), randn(n)
                flops = 2.0 * m * k * n
                gemm.append(CostPoint(flops, flops / _seconds(lambda: F.linear(x, w, b), device, repeats)))
                advance()
    for batch, heads, tokens in ATTENTION_SHAPES:
        q, k, v = (randn(batch, heads, tokens, 64) for _ in range(3))
        flops = 4.0 * batch * heads * tokens * tokens * 64
        attention.append(CostPoint(flops, flops / _seconds(lambda: F.scaled_dot_product_attention(q, k, v),
                                                           device, repeats)))
        advance()
    itemsize = torch.empty((), dtype=dtype).element_size()
    for moved in BYTES:
        a, b = randn(moved // (3 * itemsize)), randn(moved // (3 * itemsize))  # add: reads two, writes one
        elementwise.append(CostPoint(float(moved), moved / _seconds(lambda: a + b, device, repeats)))
        g = randn(moved // (2 * itemsize))  # gelu: reads one, writes one
        activation.append(CostPoint(float(moved), moved / _seconds(lambda: F.gelu(g), device, repeats)))
        advance(2)
    return {"gemm": gemm, "attention": attention, "activation": activation, "elementwise": elementwise}


def _operator_overhead_us(device: torch.device, repeats: int) -> float:
    """Time per operator of a tiny ViT at batch 1: dispatch and framework overhead, no real work."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=4,
                              num_heads=1, num_classes=4).to(device).eval()
    x = torch.randn(1, 3, 16, 16, device=device)
    operators = len(trace_ops(model.cpu(), x.cpu()))
    model = model.to(device)
    return measure(lambda: model(x), device, warmup=20, repeats=30 * repeats, cuda_graph=True).median_ms * 1e3 / operators


def _block_sparse_efficiency(device: torch.device, dtype: torch.dtype, gemm: list[CostPoint], repeats: int) -> float:
    linear = torch.nn.Linear(768, 3072).to(device, dtype)
    mask = torch.rand(3072 // 32, 768 // 32, generator=torch.Generator().manual_seed(0)) < 0.25
    layer = BlockSparseLinear.from_linear(linear, mask, 32).to(device)
    x = torch.randn(1088, 768, device=device, dtype=dtype)
    if device.type == "cuda":
        if not triton_available(device):
            return 1.0
        seconds = _seconds(lambda: bsr_linear(x, layer.weight, layer.bias), device, repeats)
    else:
        seconds = min(_seconds(lambda i=impl: layer.forward_with(x, i), device, repeats) for impl in ("gather", "torch_bsr"))
    kept = 2.0 * 1088 * 768 * 3072 * float(mask.float().mean())
    return (kept / seconds) / interpolate(gemm, kept)


def _power(device: torch.device) -> dict[str, float]:
    """Idle power (W) over one second and, on a GPU, its power limit as TDP; {} where nothing is readable."""
    idle = idle_power_w(device)
    power = {} if idle is None else {"idle": idle}
    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            power["tdp"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)) / 1e3
        except Exception:  # no NVML, or the limit is not readable here
            pass
    return power
