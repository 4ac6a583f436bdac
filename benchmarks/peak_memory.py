"""Peak memory of one call on CPU, read from the kernel's resident-set high-water mark.

The CPU allocator keeps no statistics, and the profiler attributes a fused kernel's scratch
buffers only net of their frees; the kernel's peak RSS sees every byte, Inductor's buffers and
SDPA's internal blocks included. Writing 5 to /proc/self/clear_refs resets that peak (Linux >= 4.0),
so the peak of one call is its high-water mark minus the resident size before it. For the figure to
track live tensors, freed memory must leave the resident set: glibc raises its mmap threshold after
each large free (up to 32 MiB), after which freed tensors stay in its heap; importing this module
fixes the threshold at 128 KiB (which also turns that adjustment off) and trims the heap as low.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path
from typing import Callable

STATUS = Path("/proc/self/status")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
FIXED_THRESHOLD = 128 * 1024


def _fix_malloc_thresholds() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, FIXED_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, FIXED_THRESHOLD)


_fix_malloc_thresholds()


def _status_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def peak_mib(call: Callable[[], object]) -> float | None:
    """MiB the process's resident set grew to above its size before `call` (None off Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    call()
    return (_status_bytes("VmHWM") - before) / 2**20
