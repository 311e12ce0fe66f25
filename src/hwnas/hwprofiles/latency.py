"""Latency measurement: warm-up, then the median and spread of repeated runs.

CPU: ``time.perf_counter`` around each call. CUDA: CUDA events around each call, after a
``torch.cuda.synchronize``; when ``cuda_graph`` is set and shapes are static the call is captured
once into a CUDA graph and the graph is replayed.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings of one callable, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device | str) -> str:
    """Human-readable device name: the GPU's name, or ``cpu: <model name>``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}"


def measure(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    cuda_graph: bool = False,
) -> Timing:
    """Time ``fn()`` after ``warmup`` calls; return median, min and max over ``repeats`` calls."""
    device = torch.device(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        run = _captured(fn, device) if cuda_graph and device.type == "cuda" else fn
        samples = [_time_once(run, device) for _ in range(repeats)]
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def measure_side_by_side(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    rounds: int = 15,
    seed: int = 0,
) -> dict[str, Timing]:
    """Time several callables in interleaved rounds, each round in a new shuffled order.

    A machine whose speed drifts (a shared VM, thermal throttling) then slows every callable alike
    instead of whichever happened to run in the slow minute. One sample per callable per round.
    """
    device = torch.device(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for round_ in range(rounds):
            random.Random(seed + round_).shuffle(order)
            for name in order:
                samples[name].append(_time_once(fns[name], device))
    return {name: Timing(statistics.median(s), min(s), max(s), len(s)) for name, s in samples.items()}


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _captured(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph: the graph's replay."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()  # allocations made before capture
    torch.cuda.current_stream(device).wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
