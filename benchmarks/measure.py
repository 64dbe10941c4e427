"""What every benchmark here measures the same way: median wall time and peak memory of a call.

Peak memory is what a call adds above what was held before it: on CUDA the caching allocator's
peak (`max_memory_allocated`); on the CPU the process's peak resident size (VmHWM), reset to the
current size through /proc/self/clear_refs before the call (Linux), after handing freed heap back.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: torch.device) -> int:
    """Forget the peak so far; return the bytes held now (the baseline a peak is measured from)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # so the resident size reflects what is held
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass
    return _status_bytes("VmRSS:")


def peak_bytes(device: torch.device) -> int:
    """The peak since the last `reset_peak` (absolute; subtract its baseline)."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM:")


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB one call of `fn` adds at its peak above what was held before it."""
    base = reset_peak(device)
    fn()
    return max(peak_bytes(device) - base, 0) / 2**20
