"""Closed-loop load generation in the style of Triton's perf_analyzer.

`concurrency` workers each keep exactly one request in flight (send, wait, send again).
After a warm-up, a measurement window opens; requests that *complete* inside it count.
Throughput is inferences (frames) per second: completed requests x batch / window, as
perf_analyzer's "infer/sec". Latency is per request (send to response), reported as
p50/p90/p95/p99 in ms. Like perf_analyzer's count windows, a window that has not seen
`min_requests` completions is extended (up to `max_window_s`), so slow points (the P+1
exact mode at high concurrency x batch) still yield a measurement. Workers are drained
before returning so one point's leftover requests never load the next.

Two runners share this logic: threads (in-process modes: concurrency = threads calling
the session/module) and asyncio (gRPC via tritonclient.grpc.aio).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Window:
    """Warm-up and measurement settings for one point."""

    warmup_s: float = 1.0
    window_s: float = 3.0
    min_requests: int = 8
    max_window_s: float = 60.0


@dataclass
class Point:
    """One measured point: perf_analyzer's columns, latency in ms."""

    concurrency: int
    batch: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    requests: int
    window_s: float
    errors: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class _Log:
    """Thread-safe completion log: (finish time, latency s)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: list[tuple[float, float]] = []
        self.errors: list[str] = []

    def add(self, t_end: float, latency: float) -> None:
        with self.lock:
            self.done.append((t_end, latency))

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def count_since(self, t0: float) -> int:
        with self.lock:
            return sum(1 for t, _ in self.done if t >= t0)


def _point(log: _Log, concurrency: int, batch: int, t0: float, t1: float) -> Point:
    lat = np.array([lat for t, lat in log.done if t0 <= t <= t1], dtype=np.float64) * 1e3
    if lat.size == 0:
        raise RuntimeError(f"no request completed in the window (concurrency {concurrency}, batch {batch})"
                           + (f"; first error: {log.errors[0]}" if log.errors else ""))
    pct = np.percentile(lat, PERCENTILES)
    return Point(concurrency, batch, throughput=lat.size * batch / (t1 - t0),
                 p50_ms=float(pct[0]), p90_ms=float(pct[1]), p95_ms=float(pct[2]), p99_ms=float(pct[3]),
                 avg_ms=float(lat.mean()), requests=int(lat.size), window_s=t1 - t0, errors=len(log.errors))


def _window_end(log: _Log, t0: float, win: Window) -> bool:
    """True when the window may close: long enough and enough completions (or the cap)."""
    elapsed = time.perf_counter() - t0
    if elapsed < win.window_s:
        return False
    return log.count_since(t0) >= win.min_requests or elapsed >= win.max_window_s


def _check_errors(log: _Log) -> None:
    if log.errors:
        raise RuntimeError(f"{len(log.errors)} request(s) failed; first: {log.errors[0]}")


def run_threads(call: Callable[[int], object], concurrency: int, batch: int, win: Window) -> Point:
    """`call(i)` runs request number i (the worker picks its own frames from i) in each of
    `concurrency` threads, closed loop."""
    log = _Log()
    stop = threading.Event()
    counter = iter(range(1 << 62))
    counter_lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            with counter_lock:
                i = next(counter)
            t = time.perf_counter()
            try:
                call(i)
            except Exception as exc:  # noqa: BLE001 - recorded, raised after the point
                log.fail(f"{type(exc).__name__}: {exc}")
                stop.set()
                return
            end = time.perf_counter()
            log.add(end, end - t)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    try:
        time.sleep(win.warmup_s)
        t0 = time.perf_counter()
        while not _window_end(log, t0, win) and not stop.is_set():
            time.sleep(0.01)
        t1 = time.perf_counter()
    finally:
        stop.set()
        for th in threads:
            th.join()
    _check_errors(log)
    return _point(log, concurrency, batch, t0, t1)


async def _run_async(call: Callable[[int], Awaitable[object]], concurrency: int, batch: int,
                     win: Window) -> Point:
    log = _Log()
    stop = asyncio.Event()
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while not stop.is_set():
            i = next(counter)
            t = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:  # noqa: BLE001 - recorded, raised after the point
                log.fail(f"{type(exc).__name__}: {exc}")
                stop.set()
                return
            end = time.perf_counter()
            log.add(end, end - t)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(win.warmup_s)
        t0 = time.perf_counter()
        while not _window_end(log, t0, win) and not stop.is_set():
            await asyncio.sleep(0.01)
        t1 = time.perf_counter()
    finally:
        stop.set()
        await asyncio.gather(*tasks)  # drain: in-flight requests finish before the next point
    _check_errors(log)
    return _point(log, concurrency, batch, t0, t1)


def run_async(call: Callable[[int], Awaitable[object]], concurrency: int, batch: int, win: Window,
              loop: asyncio.AbstractEventLoop) -> Point:
    """Like run_threads for a coroutine function, on `loop` (which owns the gRPC channel)."""
    try:
        return loop.run_until_complete(_run_async(call, concurrency, batch, win))
    except BaseException:  # SIGTERM/SIGINT mid-point: end the workers here, not at interpreter exit
        cancel_pending(loop)
        raise


def cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await the loop's unfinished tasks (else asyncio prints "Task was destroyed
    but it is pending" for each when the loop is collected)."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
