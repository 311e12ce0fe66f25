"""CPU timing keeps freed memory: a model's steady-state forwards take no page faults."""

import json
import platform
import statistics
import subprocess
import sys

import pytest

from hwnas.bench.record import bench_record

#: a 2-block ViT at batch 16 (activations up to 4.7 MiB): one warm-up forward, then the page faults
#: of each of 8 more, printed. argv[1] == "measure": ``measure`` (which sets the allocator) runs first;
#: "give-back": glibc's thresholds are pinned at their starting values (128 KiB), which glibc's own
#: dynamic threshold leaves after a few calls on some machines and not on others
FORWARDS = """
import ctypes, ctypes.util, json, resource, sys, timm, torch
from hwnas.hwprofiles.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
from hwnas.hwprofiles.latency import measure
torch.set_num_threads(1)
model = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
x = torch.randn(16, 3, 224, 224)
if sys.argv[1] == "measure":
    measure(lambda: x.sum(), "cpu", warmup=0, repeats=1)
else:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
faults = []
with torch.inference_mode():
    model(x)
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def page_faults_per_forward(mode: str) -> list[int]:
    result = subprocess.run([sys.executable, "-c", FORWARDS, mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_timed_forwards_take_no_page_faults():
    # memory given back: these activations land on fresh pages on every call (thousands of faults per forward)
    assert statistics.median(page_faults_per_forward("give-back")) >= 1000
    # kept memory: a typical forward takes none (an occasional one still grows the heap a little)
    assert statistics.median(page_faults_per_forward("measure")) == 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_benchmark_records_name_the_allocator_setting():
    from hwnas.hwprofiles.allocator import keep_freed_memory

    keep_freed_memory()
    record = bench_record("kernels", "cpu", [])
    assert record["allocator"].startswith("glibc ") and "freed memory kept" in record["allocator"]
