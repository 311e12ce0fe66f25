"""CPU timing without page faults: glibc's malloc keeps the memory a model frees for its next call.

By default glibc gives large freed blocks back to the kernel (blocks above its mmap threshold
are unmapped, a freed heap top above its trim threshold is trimmed), so the next forward writes
to fresh pages and pays one page fault per 4 KiB. glibc raises both thresholds as it sees large
blocks freed, but whether and when that settles differs between machines and runs (a 2-block ViT
took 9,000 faults for three calls and then none on one machine, thousands on every call on
another). A ViT at batch 8 takes thousands per call, and they fall unevenly on whichever model's
sequence of tensor sizes the heuristic happens to punish: on deit_small at batch 8, −50 % FLOPs,
the dense model took about 11,000 faults per forward, ToMe 2,400 and UCC 7,000, which made UCC
5.5 % slower than ToMe; with the memory kept, each took none, and the gap was 1.7 %.
``keep_freed_memory`` raises both thresholds through ``mallopt``: blocks up to 32 MiB (glibc's
largest mmap threshold) come from the heap, and the heap is never trimmed. jemalloc and
tcmalloc, the allocators usually preloaded for CPU inference, behave the same way by design. The
setting is process-wide, and benchmark records and study info name it (``allocator_setting``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit machines
TRIM_THRESHOLD_BYTES = 1 << 30
SYSTEM_DEFAULT = "system default"


@functools.cache
def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory, once per process; returns the setting in words."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): leave its allocator alone
        return SYSTEM_DEFAULT
    version.restype = ctypes.c_char_p
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return SYSTEM_DEFAULT
    return (f"glibc {version().decode()}: freed memory kept (mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD_BYTES >> 30} GiB)")


def allocator_setting() -> str:
    """How this process's allocator is set for timing: ``keep_freed_memory``'s setting once it ran."""
    return keep_freed_memory() if keep_freed_memory.cache_info().currsize else SYSTEM_DEFAULT
