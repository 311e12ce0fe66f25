"""Latency measurement: warm-up, then the median and spread of repeated runs.

CPU: ``time.perf_counter`` around each call, with the allocator keeping freed memory
(``allocator.keep_freed_memory``: no page faults on fresh pages inside the timed calls). CUDA:
CUDA events around each call, after a ``torch.cuda.synchronize``; when ``cuda_graph`` is set and
shapes are static the call is captured once into a CUDA graph and the graph is replayed.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from hwnas.hwprofiles.allocator import keep_freed_memory


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings of one callable, in milliseconds.

    ``samples_ms`` keeps every sample in round order for side-by-side timings (``paired_ratio``
    compares two of them round by round); it is empty for the others.
    """

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    samples_ms: tuple[float, ...] = ()

    def as_dict(self) -> dict:
        row = asdict(self)
        if self.samples_ms:
            row["samples_ms"] = [round(sample, 4) for sample in self.samples_ms]
        else:
            del row["samples_ms"]
        return row


@dataclass(frozen=True)
class Ratio:
    """The median and quartiles of per-round ratios of two side-by-side timings."""

    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.q1:.2f}-{self.q3:.2f})"


def paired_ratio(numerator_ms: Sequence[float], denominator_ms: Sequence[float]) -> Ratio:
    """``numerator / denominator`` round by round (a slow round slows both alike, so it cancels)."""
    if len(numerator_ms) != len(denominator_ms) or not numerator_ms:
        raise ValueError("paired_ratio needs two equally long, non-empty series of side-by-side samples")
    ratios = [a / b for a, b in zip(numerator_ms, denominator_ms)]
    if len(ratios) == 1:
        return Ratio(ratios[0], ratios[0], ratios[0])
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(median, q1, q3)


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
    keep_freed_memory()
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        run = cuda_graph_replay(fn, device) if cuda_graph and device.type == "cuda" else fn
        samples = [_time_once(run, device) for _ in range(repeats)]
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def measure_side_by_side(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    rounds: int = 15,
    seed: int = 0,
    on_round: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time several callables in interleaved rounds, each round in a new shuffled order.

    A machine whose speed drifts (a shared VM, thermal throttling) then slows every callable alike
    instead of whichever happened to run in the slow minute. One sample per callable per round,
    kept in ``Timing.samples_ms`` for ``paired_ratio``. ``on_round()`` is called after each round
    (a progress bar's advance).
    """
    device = torch.device(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    keep_freed_memory()
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for round_ in range(rounds):
            random.Random(seed + round_).shuffle(order)
            for name in order:
                samples[name].append(_time_once(fns[name], device))
            if on_round is not None:
                on_round()
    return {name: Timing(statistics.median(s), min(s), max(s), len(s), tuple(s)) for name, s in samples.items()}


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


def cuda_graph_replay(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph (in inference mode): the graph's replay.

    ``fn`` runs once uncaptured first, so its allocations and any kernel autotuning happen outside
    the capture.
    """
    device = torch.device(device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode():
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
    return graph.replay
