"""Energy per inference from hardware counters: NVML on NVIDIA GPUs, RAPL on CPUs where readable.

Both read a cumulative energy counter over a window of at least ``min_seconds`` of repeated
inference and divide by the inferences run. Given the device's idle power, the energy above idle
(total − idle power × time) is reported beside the total. Where neither counter exists,
``measure_energy`` returns None: hwnas never presents a guess as a measurement.
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Energy:
    """Energy of one call in millijoules, the counter it came from, and the window measured."""

    mj_per_call: float
    source: str  # "nvml" | "rapl"
    calls: int
    seconds: float
    above_idle_mj_per_call: float | None = None  # with a known idle power: total minus idle power × time


def measure_energy(fn: Callable[[], object], device: torch.device | str, min_seconds: float = 1.0,
                   idle_w: float | None = None, counter=None) -> Energy | None:
    """Run ``fn`` repeatedly for at least ``min_seconds`` and read the device's energy counter around it
    (``counter``: a ``(read_mj, source)`` pair, by default the device's NVML or RAPL counter)."""
    device = torch.device(device)
    counter = counter or energy_counter(device)
    if counter is None:
        return None
    read, source = counter
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn()
        sync()
        start_mj, start = read(), time.perf_counter()
        calls = 0
        while time.perf_counter() - start < min_seconds:
            fn()
            calls += 1
            if calls % 10 == 0:
                sync()
        sync()
        seconds = time.perf_counter() - start
        used_mj = read() - start_mj
    above_idle = None if idle_w is None else (used_mj - idle_w * seconds * 1e3) / calls
    return Energy(used_mj / calls, source, calls, seconds, above_idle)


def idle_power_w(device: torch.device | str, seconds: float = 1.0, counter=None) -> float | None:
    """The device's mean power (W) over ``seconds`` with nothing running, from its energy counter; None without one."""
    device = torch.device(device)
    counter = counter or energy_counter(device)
    if counter is None:
        return None
    read, _ = counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start_mj, start = read(), time.perf_counter()
    time.sleep(seconds)
    return (read() - start_mj) / (time.perf_counter() - start) / 1e3


def energy_counter(device: torch.device | str) -> tuple[Callable[[], float], str] | None:
    """The device's energy counter as ``(read_mj, source)``: NVML on CUDA, RAPL on the CPU; None if unreadable."""
    device = torch.device(device)
    return _nvml_counter(device) if device.type == "cuda" else rapl_counter()


def _nvml_counter(device: torch.device):
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where unsupported
    except Exception:
        return None
    return (lambda: float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))), "nvml"


def rapl_counter():
    """Sum of the package-level RAPL counters (microjoules), if readable."""
    files = sorted(glob.glob("/sys/class/powercap/intel-rapl:[0-9]*/energy_uj"))
    try:
        for path in files:
            open(path).read()
    except OSError:
        return None
    if not files:
        return None

    def read() -> float:
        return sum(int(open(path).read()) for path in files) / 1e3

    return read, "rapl"
