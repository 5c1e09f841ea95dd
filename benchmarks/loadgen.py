"""Closed-loop load generation in the style of Triton's perf_analyzer.

`concurrency` workers each keep exactly one request in flight (send, wait, send again).
The warm-up lasts `warmup_s` and until every worker has had an answer (a first request,
often cold, never counts); then a measurement window opens, and requests that *complete*
inside it count. Throughput is inferences (frames) per second: requests x batch / window, as
perf_analyzer's "infer/sec". Latency is per request (send to response), reported
as p50/p90/p95/p99 in ms. Like perf_analyzer's count windows, a window that has not seen
`min_requests` completions is extended (up to `max_window_s`), so slow points (the P+1
exact mode at high concurrency x batch) still yield a measurement. A request counts toward
throughput by the share of its cycle (from its worker's previous answer to its own) inside
the window, so that a slow point's few requests do not round its rate. Workers are drained
before returning so one point's leftover requests never load the next (and the requests in
flight at the window's end are answered, which their share needs).

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
    """Thread-safe completion log: one cycle per answered request, (start, answer time,
    latency s); a cycle starts at its worker's previous answer (or the worker's start)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: list[tuple[float, float, float]] = []
        self.errors: list[str] = []
        self.answered: set[int] = set()  # workers that have had an answer

    def add(self, start: float, t_end: float, latency: float, worker: int) -> None:
        with self.lock:
            self.done.append((start, t_end, latency))
            self.answered.add(worker)

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)


def _point(log: _Log, concurrency: int, batch: int, t0: float, t1: float) -> Point:
    """Latency over the requests answered in [t0, t1]; throughput from each request's share of
    its cycle inside the window (a request half inside counts a half). Counting whole answers
    instead is off by up to one request per window, and the window's ends are not independent
    of the answers (it opens after one and closes on the one that reaches `min_requests`):
    slow points read up to a third too fast that way."""
    lat = np.array([lat for _, t, lat in log.done if t0 <= t <= t1], dtype=np.float64) * 1e3
    if lat.size == 0:
        raise RuntimeError(f"no request completed in the window (concurrency {concurrency}, batch {batch})"
                           + (f"; first error: {log.errors[0]}" if log.errors else ""))
    share = sum(max(0.0, min(t, t1) - max(s, t0)) / (t - s) for s, t, _ in log.done if t > s)
    pct = np.percentile(lat, PERCENTILES)
    return Point(concurrency, batch, throughput=share * batch / (t1 - t0),
                 p50_ms=float(pct[0]), p90_ms=float(pct[1]), p95_ms=float(pct[2]), p99_ms=float(pct[3]),
                 avg_ms=float(lat.mean()), requests=int(lat.size), window_s=t1 - t0, errors=len(log.errors))


def _warm(log: _Log, started: float, concurrency: int, win: Window) -> bool:
    """True when the warm-up may end: `warmup_s` passed and every worker has had an answer (a
    first request is often cold: a new batch shape, a lazy allocation), or the cap passed."""
    elapsed = time.perf_counter() - started
    if elapsed < win.warmup_s:
        return False
    with log.lock:
        return len(log.answered) >= concurrency or elapsed >= win.max_window_s


def _window_end(log: _Log, t0: float, win: Window) -> float | None:
    """The window's end (now) once it may close, else None: long enough and enough answers
    (or the cap)."""
    now = time.perf_counter()
    if now - t0 < win.window_s:
        return None
    with log.lock:
        enough = sum(1 for _, t, _ in log.done if t >= t0) >= win.min_requests
    return now if enough or now - t0 >= win.max_window_s else None


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

    def worker(w: int) -> None:
        cycle = time.perf_counter()
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
            log.add(cycle, end, end - t, w)
            cycle = end

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    try:
        while not _warm(log, started, concurrency, win) and not stop.is_set():
            time.sleep(0.01)
        t0 = time.perf_counter()
        while (t1 := _window_end(log, t0, win)) is None and not stop.is_set():
            time.sleep(0.01)
    finally:
        stop.set()
        for th in threads:
            th.join()
    _check_errors(log)
    return _point(log, concurrency, batch, t0, time.perf_counter() if t1 is None else t1)


async def _run_async(call: Callable[[int], Awaitable[object]], concurrency: int, batch: int,
                     win: Window) -> Point:
    log = _Log()
    stop = asyncio.Event()
    counter = iter(range(1 << 62))

    async def worker(w: int) -> None:
        cycle = time.perf_counter()
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
            log.add(cycle, end, end - t, w)
            cycle = end

    started = time.perf_counter()
    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    try:
        while not _warm(log, started, concurrency, win) and not stop.is_set():
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        while (t1 := _window_end(log, t0, win)) is None and not stop.is_set():
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks)  # drain: in-flight requests finish before the next point
    _check_errors(log)
    return _point(log, concurrency, batch, t0, time.perf_counter() if t1 is None else t1)


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
