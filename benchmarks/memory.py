"""Process memory, read from /proc (Linux): what the benchmarks need to stay clear of the
OOM killer and what the soak test plots. Elsewhere every reading is None (no guard)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def _proc_field_bytes(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file, in bytes; None when the file or line is missing."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process, or None when it is gone or /proc is missing."""
    return _proc_field_bytes(f"/proc/{pid}/status", "VmRSS")


def available_bytes() -> int | None:
    """The kernel's estimate of memory a new allocation can get without swapping (MemAvailable)."""
    return _proc_field_bytes("/proc/meminfo", "MemAvailable")


def call_peak_bytes(fn: Callable[[], object], interval_s: float = 0.001) -> int | None:
    """How far this process's RSS rises above its level before `fn()` while it runs.

    Why sampled: a runtime's buffers for one call (ONNX Runtime's arena, torch's allocator)
    are allocated and freed inside the call, so only a reading taken during it sees them."""
    before = rss_bytes()
    if before is None:
        fn()
        return None
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = rss_bytes()
            if now is not None and now > peak[0]:
                peak[0] = now
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True, name="rss-peak")
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    after = rss_bytes() or before
    return max(peak[0], after) - before
