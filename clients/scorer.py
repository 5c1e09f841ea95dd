"""The stream's options and summary, and the scorer: (seq, frame) jobs through a bounded
window of requests over the server pool, retried within the budget, delivered in order."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from cmg import contract as C
from cmg.frames import DEFAULT_MAX_PIXELS, FrameError
from cmg_clients import core
from cmg_clients.overlay import overlay_into, stream_overlay_name
from cmg_clients.servers import ServerPool
from cmg_clients.sources import LiveOptions, Source, SourceItem, redact


class StreamObserver(Protocol):
    """What watches a running stream (the dashboard). Called on the stream's event loop,
    so every method must return at once (keep references, render later elsewhere)."""

    def threshold(self, source: str, default: float | None) -> float | None:
        """THRESHOLD to send with the next request of `source` (None: the server's calibrated one)."""

    def on_frame(self, source: str, line: dict, frame: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """A scored frame: its output line (latency_ms, threshold sent), the UINT8 frame, every output."""

    def on_error(self, source: str, line: dict) -> None:
        """A frame that got an error line."""


@dataclass
class StreamOptions:
    url: str
    source: str
    out: Path
    model: str = C.CMG
    fps: float | None = None  # None: the source's own fps, else as fast as the window allows
    window: int = 16
    timeout_s: float = 10.0
    resume: bool = False
    retry_errors: bool = False  # with resume: re-score OUT's error lines
    overwrite: bool = False
    limit: int | None = None
    max_retries: int = 30  # per frame; < 0 means no limit
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0
    threshold: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None  # None: only on a terminal
    on_line: Callable[[dict], None] | None = None  # called per written line (bench --soak)
    frames: Source | None = None  # a ready source instead of `source` (bench --soak)
    observer: StreamObserver | None = None  # sees every scored frame; may set THRESHOLD (--dashboard)
    dashboard: str | None = None  # [HOST:]PORT to serve the live page on while streaming
    metrics_url: str | list[str] | None = None  # Triton's Prometheus endpoint(s) for the page, summed (default: URL's host:8002)
    name: str | None = None  # the camera's NAME (from NAME=SRC) when several sources stream
    overlays: Path | None = None  # an overlay PNG per flagged frame here (its line names it)
    live: LiveOptions | None = None  # a camera's reopen tries and timeouts (default LiveOptions())

    @property
    def source_name(self) -> str:
        """The camera's name on the page and in the observer's calls."""
        if self.name:
            return self.name
        return getattr(self.frames, "label", self.source) if self.frames is not None else redact(self.source)

    @property
    def retry(self) -> core.RetryPolicy:
        return core.RetryPolicy(self.max_retries, self.backoff_s, self.backoff_max_s)


BEHIND_SAID_S = 0.5  # a paced stream this late or later says so in its summary


@dataclass
class StreamSummary:
    out: str
    frames: int = 0  # lines appended by this run
    results: int = 0
    flagged: int = 0  # results with IS_ANOMALY (at the calibrated threshold, or the one sent)
    errors: int = 0  # error lines appended by this run
    rescored: int = 0  # earlier error lines re-scored (--retry-errors)
    fixed: int = 0  # ... of which now have a score
    errors_in_out: int = 0  # error lines in OUT after this run (the exit status follows it)
    retries: int = 0
    reconnects: int = 0
    skipped: int = 0  # frames already in OUT (resume)
    elapsed_s: float = 0.0
    fps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    aborted: str | None = None
    behind_s: float = 0.0  # paced (--fps): how late the latest frame was sent against its schedule, at worst
    warnings: list[str] = field(default_factory=list)  # the source's (a video shorter than its header says)

    def line(self) -> str:
        lat = "n/a" if self.p50_ms is None else f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms"
        return (
            f"{self.frames} frames ({self.results} results, {self.errors} errors; {self.flagged} flagged"
            f"{f' = {self.flagged / self.results:.0%}' if self.results else ''}) in {self.elapsed_s:.1f}s, "
            f"{self.fps:.1f} fps, latency {lat}, {self.retries} retries, {self.reconnects} reconnects"
            + (f", {self.skipped} already in {self.out}" if self.skipped else "")
            + (f", {self.fixed} of {self.rescored} earlier errors now scored" if self.rescored else "")
            + (f"; {self.errors_in_out} error lines in {self.out}" if self.errors_in_out else "")
            + (f"; sent up to {self.behind_s:.1f} s behind the --fps schedule (frames could not be read and "
               "scored that fast: they waited before their latencies start)" if self.behind_s >= BEHIND_SAID_S else "")
            + "".join(f"; WARNING: {w}" for w in self.warnings)
            + (f"; ABORTED: {self.aborted}" if self.aborted else "")
        )


class _Fatal(Exception):
    pass


def _frame_error(exc: BaseException) -> str:
    """One frame's load failure as its error line says it (FrameError already names the file)."""
    return str(exc) if isinstance(exc, FrameError) else f"{type(exc).__name__}: {exc}"


def scored_line(base: dict, arrays: dict[str, np.ndarray], result: object, latency_ms: float, retries: int,
                server: str | None = None, attempt_ms: float | None = None) -> dict:
    """The one place a frame's scored line is made (callbacks see it through `on_line`):
    the frame's fields, score and flag, the model version that answered (Triton's
    response names it), latency, retries, and with several servers the one that answered.

    `latency_ms` runs from the frame's first send to its result, retries and backoff
    included (what the line waited); `attempt_ms` is the last attempt alone (the server)."""
    line = {**base, **core.scalars(arrays), "model_version": core.model_version(result),
            "latency_ms": round(latency_ms, 3),
            "attempt_ms": round(latency_ms if attempt_ms is None else attempt_ms, 3), "retries": retries}
    if server is not None:
        line["server"] = server
    return line


class OutageNotice:
    """A stderr line when frames stop getting through to a server, one every `every` seconds
    while they do not, and one when a frame gets through that server again. Why: retries are
    silent by design (no frame is lost), so without it a stream whose server is down says
    nothing for the whole retry budget (30 tries with backoff: about 90 s), bar or no bar.
    Kept per server: with several, the others carry the frames while one is down. At most one
    outage line per server every `every` seconds, however often outages begin and end (a
    server slower than --timeout fails one frame in a few), and "answering again" only after
    an outage that was said."""

    def __init__(self, label: str | None, every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.prefix = f"cmg stream{f' [{label}]' if label else ''}:"
        self.every, self.clock = every, clock
        self.since: dict[str, float] = {}  # url -> when its outage began
        self.last: dict[str, float] = {}  # url -> when it was last reported
        self.said: set[str] = set()  # urls whose current outage was reported

    def failed(self, url: str, seq: int, attempt: int, limit: int, reason: str) -> None:
        now = self.clock()
        began = self.since.setdefault(url, now)
        if url in self.last and now - self.last[url] < self.every:
            return
        self.last[url] = now
        self.said.add(url)
        budget = "(no limit)" if limit < 0 else f"of {limit}"
        # A deadline is what a busy server gives too: frames queued behind a full window wait
        # their turn past --timeout although every one is answered.
        busy = ("; past the deadline: the server may be busy rather than down (queued frames wait): "
                "lower --window or raise --timeout" if "deadline" in reason.lower() else "")
        tqdm.write(f"{self.prefix} {url} not answering for {now - began:.0f} s; frame {seq} retry {attempt} "
                   f"{budget}; last: {reason}{busy}", file=sys.stderr)

    def answered(self, url: str) -> None:
        began = self.since.pop(url, None)
        if began is not None and url in self.said:
            self.said.discard(url)
            tqdm.write(f"{self.prefix} {url} answering again after {self.clock() - began:.0f} s", file=sys.stderr)


class Latencies:
    """Every frame's latency for the summary's percentiles, in bounded memory: exact up to
    `cap` frames (float32, 4 bytes each), then a uniform sample of `cap` of them (reservoir
    sampling), so a line's stream that runs for weeks holds 4 MB, not a Python float (32
    bytes) per frame. The bar reads the last `RECENT`."""

    RECENT = 2000

    def __init__(self, cap: int = 1_000_000, seed: int = 0) -> None:
        self.cap, self.count = cap, 0
        self._values = array("f")
        self._recent: deque[float] = deque(maxlen=self.RECENT)
        self._rng = random.Random(seed)

    def append(self, ms: float) -> None:
        self.count += 1
        self._recent.append(ms)
        if len(self._values) < self.cap:
            self._values.append(ms)
        else:
            slot = self._rng.randrange(self.count)  # keep each frame with probability cap / count
            if slot < self.cap:
                self._values[slot] = ms

    def __len__(self) -> int:
        return self.count

    def percentiles(self, q: list[float]) -> np.ndarray:
        return np.percentile(np.frombuffer(self._values, np.float32).astype(np.float64), q)

    def recent(self) -> np.ndarray:
        return np.asarray(self._recent)


class Scorer:
    """Scores (seq, item) jobs with a bounded window; hands lines to `sink` in job order."""

    def __init__(self, opts: StreamOptions, pool: ServerPool, size: tuple[int, int], summary: StreamSummary):
        self.opts, self.size, self.summary = opts, size, summary
        self.pool = pool
        self.latencies = Latencies()
        self.fatal: list[str] = []
        self.outage = OutageNotice(opts.name)  # the camera name only where several stream

    async def run(self, jobs: Iterable[tuple[int, SourceItem]], sink: Callable[[dict], None],
                  fps: float | None, progress: Progress, pull_in_thread: bool = False) -> None:
        """`pull_in_thread`: reading the next job blocks (a video decodes, a camera waits for its
        next frame), so it is read on a worker thread while the answers keep coming in."""
        opts, pool, summary = self.opts, self.pool, self.summary
        window = asyncio.Semaphore(max(1, opts.window))
        pending: dict[int, dict] = {}
        next_write = 0
        t_begin = time.perf_counter()
        tasks: set[asyncio.Task] = set()
        stopping = False
        outputs = core.requested_outputs(grpcclient)

        def deliver(k: int, line: dict) -> None:
            nonlocal next_write
            pending[k] = line
            while next_write in pending:
                sink(pending.pop(next_write))
                next_write += 1
                window.release()
                progress.update(self.latencies, summary)

        observer, name = opts.observer, opts.source_name

        def failed(k: int, line: dict) -> None:
            if observer is not None:
                observer.on_error(name, line)
            deliver(k, line)

        async def handle(k: int, seq: int, item: SourceItem) -> None:
            base = {"seq": seq, "frame_id": item.frame_id, "source": item.source, **item.extra}
            try:
                async with pool.decodes:  # a few at a time: a large image's decode holds gigabytes
                    frame = await asyncio.to_thread(item.load, self.size)
            except Exception as exc:  # noqa: BLE001 - every image problem is this frame's error line
                failed(k, {**base, "error": _frame_error(exc)})
                return
            # Given (--threshold, the page's slider), or None: the server's calibrated one (GPU
            # targets), per server and version, sent again where a deploy changed it under the frame
            given = opts.threshold if observer is None else observer.threshold(name, opts.threshold)
            inputs, sent = None, None
            attempt = rescores = 0
            server = avoid = None
            t_first = time.perf_counter()  # latency_ms counts from here: retries are waiting too
            if item.read_at is not None:  # a camera's frame: how long it waited (buffer, decode queue) before its send
                base["queued_ms"] = round((time.monotonic() - item.read_at) * 1000.0, 1)
            while True:
                server = pool.pick(avoid=avoid)
                # (a resend's threshold is the answering version's: `resend_with` made it the server's own)
                threshold = given if given is not None else pool.threshold(server)
                if inputs is None or threshold != sent:
                    inputs, sent = core.build_inputs(grpcclient, frame[None], threshold), threshold
                    if threshold is not None:  # the THRESHOLD this frame was scored with, in its line
                        base["threshold"] = threshold
                generation = server.channel.generation
                t0 = time.perf_counter()
                reconnect = True
                server.in_flight += 1
                try:
                    res = await server.channel.client.infer(
                        opts.model, inputs, outputs=outputs, client_timeout=opts.timeout_s
                    )
                    arrays = core.decode(res)
                except InferenceServerException as exc:
                    if stopping:  # torn down (Ctrl-C): a call that failed under it is not retried or written
                        raise asyncio.CancelledError from exc
                    failure = core.classify(exc)
                    if failure.kind == core.PERMANENT:  # about this frame: its error line
                        failed(k, {**base, "error": failure.line()})
                        return
                    reason, reconnect = failure.line(), failure.reconnect
                except asyncio.CancelledError:
                    if stopping or _really_cancelled():
                        raise
                    reason = "call cancelled by the channel"  # grpc.aio: the channel went away under it
                except Exception as exc:  # noqa: BLE001 - e.g. grpc.aio.UsageError on a closed channel
                    if stopping:
                        raise asyncio.CancelledError from exc
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    again = None  # the threshold to score this frame again with, if any
                    if given is None and sent is not None and rescores < core.RESCORES - 1:
                        again = await pool.resend_with(server, core.model_version(res), sent)
                    if again is not None:  # scored at another version's threshold: once more
                        rescores += 1
                        avoid = None
                        continue
                    now = time.perf_counter()
                    latency = (now - t_first) * 1000.0
                    self.latencies.append(latency)  # the summary's percentiles: first send to result
                    server.frames += 1
                    self.outage.answered(server.url)
                    line = scored_line(base, arrays, res, latency, attempt, server.url if pool.multi else None,
                                       attempt_ms=(now - t0) * 1000.0)
                    if opts.overlays is not None and line["is_anomaly"]:
                        await self._overlay(line, frame, arrays)
                    if observer is not None:
                        observer.on_frame(name, line, frame, arrays)
                    deliver(k, line)
                    return
                finally:
                    server.in_flight -= 1
                if stopping:  # the run is being torn down while this frame waited: no retry
                    raise asyncio.CancelledError
                avoid = server
                attempt += 1
                summary.retries += 1
                self.outage.failed(server.url, seq, attempt, opts.max_retries, reason)
                if opts.retry.exhausted(attempt):
                    raise _Fatal(f"frame {seq} ({item.frame_id}) failed {attempt} times; last: {reason}")
                await pool.failed(server, generation, reconnect)
                if not pool.another_up(server):  # with another server up, the frame goes there at once
                    await asyncio.sleep(opts.retry.delay(attempt))

        def on_done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if task.cancelled():
                if not stopping:  # a frame that ended without a line would stall the writer forever
                    self.fatal.append(f"{task.get_name()} was cancelled")
                    window.release()
                return
            exc = task.exception()
            if exc is not None:
                self.fatal.append(str(exc) if isinstance(exc, _Fatal) else f"{type(exc).__name__}: {exc}")
                window.release()  # wake the producer so it sees the failure instead of waiting forever

        # A source that blocks gets a reading thread of its own: on the shared pool, a few silent
        # cameras would hold every worker and stall the other cameras' frame loads.
        reader = ThreadPoolExecutor(1, thread_name_prefix="cmg-source") if pull_in_thread else None
        loop = asyncio.get_running_loop()
        try:
            it = iter(jobs)
            for k in itertools.count():
                await window.acquire()  # before the next frame is read: a camera's waits in its own buffer
                if self.fatal:
                    break
                job = await loop.run_in_executor(reader, next, it, None) if reader else next(it, None)
                if job is None:
                    window.release()
                    break
                seq, item = job
                if fps:
                    wait = t_begin + k / fps - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    else:  # the servers answer slower than --fps asks: said, as latencies start at the send
                        summary.behind_s = max(summary.behind_s, -wait)
                task = asyncio.create_task(handle(k, seq, item), name=f"frame {seq} ({item.frame_id})")
                tasks.add(task)
                task.add_done_callback(on_done)
            while tasks and not self.fatal:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            stopping = True
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if reader is not None:  # a read in flight ends on its own (the source is closed next)
                reader.shutdown(wait=False)

    async def _overlay(self, line: dict, frame: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """A flagged frame's overlay PNG, named in its line (`overlay_into`), off the event loop."""
        path = self.opts.overlays / stream_overlay_name(line["seq"], line["frame_id"])
        await asyncio.to_thread(overlay_into, line, frame, core.results_from_arrays(arrays)[0], path)


def _really_cancelled() -> bool:
    """True when this task itself was cancelled (not a gRPC call cancelled under it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling()) if cancelling is not None else False



class Progress:
    """tqdm bar with live fps and p50/p99 latency, refreshed at most a few times a second."""

    def __init__(self, total: int | None, initial: int, enabled: bool | None):
        self.bar = tqdm(
            total=total, initial=initial, unit="frame", desc="stream", file=sys.stderr,
            disable=None if enabled is None else not enabled, dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.frames = 0
        self.last = 0.0
        self._seen: tuple[Latencies | None, StreamSummary | None] = (None, None)

    def update(self, latencies: Latencies, summary: StreamSummary) -> None:
        self.bar.update(1)
        self.frames += 1
        self._seen = (latencies, summary)
        now = time.perf_counter()
        if now - self.last < 0.5 or self.bar.disable:
            return
        self.last = now
        self._set_postfix(now)

    def _set_postfix(self, now: float) -> None:
        latencies, summary = self._seen
        post = {"fps": f"{self.frames / max(now - self.t0, 1e-9):.1f}"}
        if latencies:
            p50, p99 = np.percentile(latencies.recent(), [50, 99])
            post.update(p50=f"{p50:.1f}ms", p99=f"{p99:.1f}ms")
        if summary is not None and summary.retries:
            post["retries"] = str(summary.retries)
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        """Last figures first: a stream shorter than the refresh interval would otherwise
        keep the first frame's fps and latency on the bar."""
        if self.frames and not self.bar.disable:
            self._set_postfix(time.perf_counter())
        self.bar.close()


