"""Where UCC's and ToMe's forwards spend their time, kernel by kernel: the profile behind ``bench tokens``' UCC-vs-ToMe ratio.

    PYTHONPATH=src python3 benchmarks/token_profile.py [--device cuda] [--json OUT.json] [--forwards N]

Builds the latency cases of ``search bench tokens`` (deit_small/base, random weights, cuts at
blocks 3, 6, 9 at −50 % FLOPs, the same batches and dtypes) and runs ``N`` eager forwards of UCC
and of ToMe under ``torch.profiler``. Per model, point and method it writes the kernels launched
and the time the device was busy per forward, and per kernel name its launches and time; then
prints, per case, the kernels whose time differs most between the two. On the CPU (a dry run of
the same path) the "kernels" are the aten operators and the time is their own CPU time. Eager
launches are not what ``bench tokens`` times (CUDA-graph replays), but each kernel's device time is.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from hwnas.bench.record import bench_record, result_row, write_record
from hwnas.bench.tokens import latency_cases
from hwnas.pruning.tokens import apply_token_keep

METHODS = {"hwnas": "ucc", "tome": "tome"}


def kernel_times(model: torch.nn.Module, x: torch.Tensor, forwards: int) -> dict[str, dict[str, float]]:
    """Per kernel name (aten operator on the CPU), its launches and milliseconds per forward."""
    on_cuda = x.is_cuda
    with torch.inference_mode():
        for _ in range(3):  # warm-up: Triton compiles, cached bases are built
            model(x)
        if on_cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as run:
            for _ in range(forwards):
                model(x)
            if on_cuda:
                torch.cuda.synchronize()
    kernels = {}
    for event in run.key_averages():
        if on_cuda and event.device_type == DeviceType.CUDA:  # a kernel (the aten operator above it has its time too)
            microseconds = event.self_device_time_total
        elif not on_cuda and event.key.startswith("aten::"):
            microseconds = event.self_cpu_time_total
        else:
            continue
        if microseconds > 0:
            kernels[event.key[:160]] = {"launches": event.count / forwards, "ms": microseconds / 1000 / forwards}
    return kernels


def rows(device: torch.device, forwards: int) -> list[dict]:
    results = []
    for dense, keep, x, case in latency_cases(device):
        case = {**case, "forwards": forwards}
        profiles = {}
        for impl, method in METHODS.items():
            model = apply_token_keep(copy.deepcopy(dense), keep, method).to(x.device, x.dtype)
            profiles[impl] = kernel_times(model, x, forwards)
            launches, busy_ms = totals(profiles[impl])
            metrics = {"launches_per_forward": launches, "busy_ms_per_forward": busy_ms, "kernels": profiles[impl]}
            results.append(result_row(case, impl, None, metrics))
        print_difference(case, profiles)
    return results


def totals(kernels: dict[str, dict[str, float]]) -> tuple[float, float]:
    """Launches and busy milliseconds per forward, over all kernels."""
    return sum(k["launches"] for k in kernels.values()), sum(k["ms"] for k in kernels.values())


def print_difference(case: dict, profiles: dict[str, dict[str, dict[str, float]]], most: int = 12) -> None:
    """The case's totals and the kernels whose time per forward differs most between UCC and ToMe."""
    ucc, tome = profiles["hwnas"], profiles["tome"]
    total = {impl: totals(kernels) for impl, kernels in profiles.items()}
    print(f"{case['model']} batch {case['batch']} {case['dtype']}: UCC {total['hwnas'][0]:.0f} launches "
          f"{total['hwnas'][1]:.3f} ms busy, ToMe {total['tome'][0]:.0f} launches {total['tome'][1]:.3f} ms busy")
    none = {"launches": 0.0, "ms": 0.0}
    names = sorted(set(ucc) | set(tome), key=lambda n: -abs(ucc.get(n, none)["ms"] - tome.get(n, none)["ms"]))
    for name in names[:most]:
        a, b = ucc.get(name, none), tome.get(name, none)
        print(f"  {a['ms'] - b['ms']:+8.4f} ms  UCC {a['launches']:5.1f}x {a['ms']:.4f}  "
              f"ToMe {b['launches']:5.1f}x {b['ms']:.4f}  {name[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="benchmarks/results/token-profile.json")
    parser.add_argument("--forwards", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"wrote {write_record(bench_record('token-profile', device, rows(device, args.forwards)), args.json)}")


if __name__ == "__main__":
    main()
