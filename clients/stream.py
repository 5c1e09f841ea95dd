"""`cmg stream`: the factory-line client. Every frame gets exactly one JSON line, in order.

Async gRPC with a bounded window of frames not yet written. A request that fails for a
reason outside the frame (server stopping or gone, model unloading or reloading, server
busy, deadline) is retried within the retry budget (`cmg_clients.core.classify`), on a
fresh channel when the old one may be dead, never dropped and never written twice; a
frame that is itself bad (unreadable image, refused input) gets an error line and the
stream goes on. Lines go out through a reorder buffer in sequence order and are flushed
one by one, so `--resume` continues after the last line of a crashed or stopped run,
and `--resume --retry-errors` re-scores the error lines of an earlier run (the file is
rewritten through a temporary file and an atomic rename: a kill mid-way loses nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob as globlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

import numpy as np

from cmg import contract as C
from cmg.errors import CMGError, check_parent_folders, naming
from cmg.frames import DEFAULT_MAX_PIXELS
from cmg_clients import core
from cmg_clients.servers import ServerPool

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
Loader = Callable[[tuple[int, int]], np.ndarray]  # (height, width) -> UINT8 frame


@dataclass(frozen=True)
class SourceItem:
    """A frame to come: its id, where it comes from, and how to read it (lazily)."""

    frame_id: str
    source: str
    load: Loader
    extra: dict = field(default_factory=dict)  # e.g. the synthetic scene's label


# -- sources ------------------------------------------------------------------------------
class Source:
    """Frames in a fixed order; `items(start)` begins at frame `start` (seq numbers are
    positions in this order), `pick(seqs)` gives chosen earlier frames again."""

    count: int | None = None  # None: unknown or endless
    fps: float | None = None  # the source's own rate, if it has one

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        raise NotImplementedError

    def pick(self, seqs: Iterable[int]) -> Iterator[tuple[int, SourceItem]]:
        """(seq, item) for the wanted seqs, in order (generic: read through)."""
        wanted = sorted(set(seqs))
        if not wanted:
            return
        todo = iter(wanted)
        target = next(todo)
        for seq, item in enumerate(self.items(0)):
            if seq == target:
                yield seq, item
                target = next(todo, None)
                if target is None:
                    return


class FileSource(Source):
    def __init__(self, paths: list[Path], root: Path | None, max_pixels: int) -> None:
        self.paths, self.root, self.max_pixels = paths, root, max_pixels
        self.count = len(paths)

    def _item(self, p: Path) -> SourceItem:
        from cmg.frames import load_frame

        fid = str(p.relative_to(self.root)) if self.root is not None else str(p)
        return SourceItem(fid, str(p), lambda size, p=p: load_frame(p, size, max_pixels=self.max_pixels))

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        return (self._item(p) for p in self.paths[start:])

    def pick(self, seqs: Iterable[int]) -> Iterator[tuple[int, SourceItem]]:
        return ((s, self._item(self.paths[s])) for s in sorted(set(seqs)) if 0 <= s < len(self.paths))


class VideoSource(Source):
    def __init__(self, path: Path) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise CMGError(f"{path}: video sources need OpenCV (pip install 'cmg-triton[video]')") from exc
        self.cv2, self.path = cv2, path

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        from cmg.frames import to_frame

        cap = self.cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise CMGError(f"cannot open video {self.path}")
        try:
            index = 0
            while True:
                if index < start:  # skip without decoding
                    if not cap.grab():
                        return
                    index += 1
                    continue
                ok, bgr = cap.read()
                if not ok:
                    return
                rgb = np.ascontiguousarray(bgr[..., ::-1])
                yield SourceItem(f"{self.path.name}#{index}", str(self.path), lambda size, a=rgb: to_frame(a, size))
                index += 1
        finally:
            cap.release()


def parse_synth(spec: str) -> dict:
    """`synth:PRESET[?fps=..&seed=..&n=..]` -> {"preset", "fps", "seed", "n"}."""
    body = spec[len("synth:") :]
    preset, _, query = body.partition("?")
    try:
        params = {k: v[-1] for k, v in parse_qs(query, strict_parsing=bool(query)).items()} if query else {}
    except ValueError as exc:
        raise CMGError(f"{spec}: malformed parameters ({exc})") from exc
    unknown = set(params) - {"fps", "seed", "n"}
    if unknown:
        raise CMGError(f"{spec}: unknown parameter(s) {', '.join(sorted(unknown))} (expected fps, seed, n)")
    try:
        opts = {
            "preset": preset or "tiny",
            "fps": float(params["fps"]) if "fps" in params else None,
            "seed": int(params.get("seed", 0)),
            "n": int(params["n"]) if "n" in params else None,
        }
    except ValueError as exc:
        raise CMGError(f"{spec}: {exc}") from exc
    if opts["fps"] is not None and not (np.isfinite(opts["fps"]) and opts["fps"] > 0):
        raise CMGError(f"{spec}: fps must be a finite number > 0")
    if opts["n"] is not None and opts["n"] < 0:
        raise CMGError(f"{spec}: n must be >= 0")
    return opts


class SynthSource(Source):
    """Frames from the synthetic factory generator (cmg_data.synth), deterministic per index."""

    def __init__(self, spec: str) -> None:
        self.opts = parse_synth(spec)
        try:
            from cmg_data import synth
        except ImportError as exc:
            raise CMGError(f"{spec}: the synthetic generator cmg_data.synth is not available ({exc})") from exc
        if self.opts["preset"] not in synth.PRESETS:
            raise CMGError(f"{spec}: unknown preset {self.opts['preset']!r} (known: {', '.join(synth.PRESETS)})")
        self.synth = synth
        self.count, self.fps = self.opts["n"], self.opts["fps"]
        self.label = f"synth:{self.opts['preset']}?seed={self.opts['seed']}"

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        from cmg.frames import to_frame

        o = self.opts
        frames = self.synth.stream_frames(o["preset"], seed=o["seed"], n=o["n"], start=start)
        for index, (image, info) in enumerate(frames, start):
            yield SourceItem(f"{index:06d}", self.label, lambda size, a=image: to_frame(a, size), dict(info))

    def pick(self, seqs: Iterable[int]) -> Iterator[tuple[int, SourceItem]]:
        for s in sorted(set(seqs)):
            item = next(self.items(s), None)
            if item is not None:
                yield s, item


class ArraySource(Source):
    """Frames already in memory (UINT8 [N, H, W, 3] at the model's size), cycled `count`
    times over; `cmg bench --soak` streams the test split this way without decoding files."""

    def __init__(self, frames: np.ndarray, count: int, label: str = "memory") -> None:
        if frames.ndim != 4 or not len(frames):
            raise CMGError(f"ArraySource needs frames [N, H, W, 3], got shape {list(frames.shape)}")
        self.frames, self.count, self.label = frames, int(count), label

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        from cmg.frames import to_frame

        n = len(self.frames)
        for i in range(start, self.count):
            yield SourceItem(f"{i:07d}", self.label, lambda size, a=self.frames[i % n]: to_frame(a, size))


def open_source(spec: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """SRC (folder, glob, video file, a single image, synth:PRESET) -> Source."""
    if spec.startswith("synth:"):
        return SynthSource(spec)
    path = Path(spec)
    if path.is_dir():
        from cmg_clients.client import iter_image_paths

        paths = iter_image_paths([path])
        if not paths:
            raise CMGError(f"no images in folder {path}")
        return FileSource(paths, path, max_pixels)
    if path.is_file() and path.suffix.lower() in VIDEO_EXTS:
        return VideoSource(path)
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in sorted(globlib.glob(spec, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise CMGError(f"glob {spec} matches no files")
        return FileSource(paths, None, max_pixels)
    if path.is_file():
        return FileSource([path], path.parent, max_pixels)
    raise CMGError(f"source {spec}: not a folder, glob, video file or synth:PRESET")


# -- output -------------------------------------------------------------------------------
@dataclass
class Existing:
    """What OUT already holds: line count, last frame id, and the error lines by seq."""

    count: int = 0
    last_id: str | None = None
    last_source: str | None = None  # the `source` its last line names (resume checks it)
    errors: dict[int, str | None] = field(default_factory=dict)  # seq -> frame_id


def scan_existing(out: Path) -> Existing:
    """Lines already in OUT. Truncates a torn last line (crash mid-write).

    The lines must be seqs 0..n-1 in order, which is what this client writes; anything
    else means OUT came from somewhere else, and continuing would corrupt it.
    """
    found = Existing()
    if not out.is_file():
        return found
    raw = out.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
    for lineno, line in enumerate(keep.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CMGError(f"{out}:{lineno}: not a JSON line ({exc}); cannot resume") from exc
        if not isinstance(rec, dict) or rec.get("seq") != found.count:
            seq = rec.get("seq") if isinstance(rec, dict) else None
            raise CMGError(f"{out}:{lineno}: seq {seq} where {found.count} was expected; cannot resume")
        if "error" in rec:
            found.errors[found.count] = rec.get("frame_id")
        found.count, found.last_id, found.last_source = found.count + 1, rec.get("frame_id"), rec.get("source")
    if len(keep) != len(raw):
        out.write_bytes(keep)
    return found


def read_existing(out: Path) -> tuple[int, str | None]:
    """(line count, last frame_id) of OUT; see scan_existing."""
    found = scan_existing(out)
    return found.count, found.last_id


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_lines(out: Path, new: dict[int, dict]) -> None:
    """Rewrite OUT with the lines of `new` (by seq) in place of the old ones, atomically:
    a temporary file next to OUT, fsync, rename. Killed at any point, OUT is either the
    old file or the new one."""
    if not new:
        return
    tmp = out.with_name(out.name + ".rewrite.tmp")
    with out.open("rb") as src, tmp.open("wb") as dst:
        for seq, line in enumerate(src):
            if seq in new:
                dst.write(json.dumps(new[seq]).encode() + b"\n")
            else:
                dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)
    _fsync_dir(out.parent)


class OutputLock:
    """One writer per output file: an OS lock (fcntl.flock) on a sibling lock file, held
    for the stream's life.

    Why a sibling (`.OUT.lock`) and not OUT itself: `--retry-errors` replaces OUT by a
    rename, and a lock on the old inode would not stop a writer that opens the new one.
    The holder writes its pid into the lock file so a refused stream can name it. The
    kernel drops the lock when the holder dies however it dies (SIGKILL too), so a stale
    lock file never blocks anyone. OUT that is not a regular file (/dev/full, a FIFO) has
    its lock under the temporary folder, keyed by OUT's resolved path.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        if out.exists() and not out.is_file():
            import hashlib
            import tempfile

            key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
            folder = Path(tempfile.gettempdir()) / "cmg-locks"
            folder.mkdir(exist_ok=True)
            self.path = folder / f"{key}.lock"
        else:
            self.path = out.with_name(f".{out.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise CMGError naming the holder's pid; never waits."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CMGError(f"--out {self.out} is being written by another process (pid {holder}, lock "
                               f"{self.path}): one writer per file; wait for it to end or choose another --out") from None
            try:  # the holder before us may have removed the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _looks_like_stream_output(out: Path) -> bool:
    """True when OUT's first line is a line this client writes (JSON with seq 0)."""
    try:
        with out.open("rb") as fh:
            first = fh.readline(1 << 20)
        rec = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("seq") == 0


def same_source(recorded: object, now: str) -> bool:
    """A line's `source` against the source's now: equal, or the same file by path (a
    folder given as `cam1` then `./cam1/` is the same source)."""
    if recorded == now:
        return True
    if not isinstance(recorded, str) or now.startswith("synth:") or recorded.startswith("synth:"):
        return False
    try:
        return Path(recorded).resolve() == Path(now).resolve()
    except OSError:
        return False


def check_out_path(out: Path) -> None:
    """OUT must be a file we can write (not a folder, not under a file)."""
    if out.is_dir():
        raise CMGError(f"--out {out} is a folder; give a file name such as {out / 'stream.jsonl'}")
    check_parent_folders(out, "--out")


# -- the stream ---------------------------------------------------------------------------
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
    metrics_url: str | None = None  # Triton's Prometheus endpoint for the page (default: URL's host:8002)
    name: str | None = None  # the camera's NAME (from NAME=SRC) when several sources stream

    @property
    def source_name(self) -> str:
        """The camera's name on the page and in the observer's calls."""
        if self.name:
            return self.name
        return getattr(self.frames, "label", self.source) if self.frames is not None else self.source

    @property
    def retry(self) -> core.RetryPolicy:
        return core.RetryPolicy(self.max_retries, self.backoff_s, self.backoff_max_s)


@dataclass
class StreamSummary:
    out: str
    frames: int = 0  # lines appended by this run
    results: int = 0
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

    def line(self) -> str:
        lat = "n/a" if self.p50_ms is None else f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms"
        return (
            f"{self.frames} frames ({self.results} results, {self.errors} errors) in {self.elapsed_s:.1f}s, "
            f"{self.fps:.1f} fps, latency {lat}, {self.retries} retries, {self.reconnects} reconnects"
            + (f", {self.skipped} already in {self.out}" if self.skipped else "")
            + (f", {self.fixed} of {self.rescored} earlier errors now scored" if self.rescored else "")
            + (f"; {self.errors_in_out} error lines in {self.out}" if self.errors_in_out else "")
            + (f"; ABORTED: {self.aborted}" if self.aborted else "")
        )


class _Channel:
    """The current aio client; `reset` swaps in a fresh channel once per failure, not once per frame."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s
        self.generation = 0
        self.reconnects = 0
        self._lock = asyncio.Lock()
        self._old: list = []
        self._last_reset = float("-inf")
        self.min_interval_s = 0.25
        self.client = self._make()

    def _make(self):
        import tritonclient.grpc.aio as aio

        # Short reconnect backoff inside gRPC too: its default grows to 2 minutes.
        args = [
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        return aio.InferenceServerClient(self.url, channel_args=args)

    async def reset(self, generation: int) -> None:
        # The old channel is not closed here: closing cancels the calls still on it, and
        # each of those frames would then need telling apart from a real cancellation.
        # They fail or finish on their own; `close` ends every channel at the end.
        async with self._lock:
            now = time.monotonic()
            if generation != self.generation or now - self._last_reset < self.min_interval_s:
                return  # another frame already reconnected, or did so a moment ago
            self._last_reset = now
            self._old.append(self.client)
            self.client = self._make()
            self.generation += 1
            self.reconnects += 1

    async def close(self) -> None:
        for client in [*self._old, self.client]:
            with contextlib.suppress(Exception):
                await client.close()
        self._old = []


class _Fatal(Exception):
    pass


def _frame_error(exc: BaseException) -> str:
    """One frame's load failure as its error line says it (FrameError already names the file)."""
    from cmg.frames import FrameError

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


class _Scorer:
    """Scores (seq, item) jobs with a bounded window; hands lines to `sink` in job order."""

    def __init__(self, opts: StreamOptions, pool: ServerPool, size: tuple[int, int], summary: StreamSummary):
        self.opts, self.size, self.summary = opts, size, summary
        self.pool = pool
        self.latencies: list[float] = []
        self.fatal: list[str] = []

    async def run(self, jobs: Iterable[tuple[int, SourceItem]], sink: Callable[[dict], None],
                  fps: float | None, progress: _Progress) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

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
                frame = await asyncio.to_thread(item.load, self.size)
            except Exception as exc:  # noqa: BLE001 - every image problem is this frame's error line
                failed(k, {**base, "error": _frame_error(exc)})
                return
            threshold = opts.threshold if observer is None else observer.threshold(name, opts.threshold)
            if threshold is not None:  # the THRESHOLD this frame was scored with, in its line
                base["threshold"] = threshold
            inputs = core.build_inputs(grpcclient, frame[None], threshold)
            attempt = 0
            server = None
            t_first = time.perf_counter()  # latency_ms counts from here: retries are waiting too
            while True:
                server = pool.pick(avoid=server)
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
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    now = time.perf_counter()
                    latency = (now - t_first) * 1000.0
                    self.latencies.append(latency)  # the summary's percentiles: first send to result
                    server.frames += 1
                    line = scored_line(base, arrays, res, latency, attempt, server.url if pool.multi else None,
                                       attempt_ms=(now - t0) * 1000.0)
                    if observer is not None:
                        observer.on_frame(name, line, frame, arrays)
                    deliver(k, line)
                    return
                finally:
                    server.in_flight -= 1
                attempt += 1
                summary.retries += 1
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

        try:
            for k, (seq, item) in enumerate(jobs):
                if self.fatal:
                    break
                await window.acquire()
                if self.fatal:
                    break
                if fps:
                    wait = t_begin + k / fps - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
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


def _really_cancelled() -> bool:
    """True when this task itself was cancelled (not a gRPC call cancelled under it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling()) if cancelling is not None else False


async def _stream(opts: StreamOptions, summary: StreamSummary, pool: ServerPool | None = None,
                  size: tuple[int, int] | None = None) -> None:
    """One source into one file. `pool` (with the frame `size` from its handshake) is
    shared when several sources stream at once; by default a pool of `opts.url` alone."""
    own_pool = pool is None
    url = core.normalize_url(opts.url, "grpc")
    core.positive_seconds(opts.timeout_s, "--timeout")
    opts.threshold = core.finite_threshold(opts.threshold)
    if opts.retry_errors and not opts.resume:
        raise CMGError("--retry-errors re-scores the error lines of an earlier run: use it with --resume")
    if opts.resume and opts.overwrite:
        raise CMGError("--resume continues OUT and --overwrite starts it afresh: give one of them")
    check_out_path(opts.out)
    with OutputLock(opts.out):  # before OUT is read: a second writer or resume stops here, exit 2
        await _stream_locked(opts, summary, pool, size, own_pool, url)


async def _stream_locked(opts: StreamOptions, summary: StreamSummary, pool: ServerPool | None,
                         size: tuple[int, int] | None, own_pool: bool, url: str) -> None:
    if opts.out.exists() and opts.out.stat().st_size and not (opts.resume or opts.overwrite):
        if not _looks_like_stream_output(opts.out):
            raise CMGError(f"--out {opts.out} exists and is not a cmg stream output (its first line is not a "
                           "JSON line with seq 0): choose another file, or --overwrite to replace it")
        raise CMGError(f"{opts.out} already has results: pass --resume to continue it or --overwrite")
    source = opts.frames if opts.frames is not None else open_source(opts.source, opts.max_pixels)
    if own_pool:
        # Synchronous handshake: fails fast with a clear message if the server or model is
        # wrong, and gives the frame size without a run folder.
        pool = ServerPool([url], opts.model, opts.timeout_s)
        try:
            size = pool.handshake()
        except BaseException:
            await pool.close()
            raise
    try:
        await _stream_into(opts, summary, source, pool, size)
    finally:
        if own_pool:
            await pool.close()
        summary.reconnects = pool.reconnects


async def _stream_into(opts: StreamOptions, summary: StreamSummary, source: Source, pool: ServerPool,
                       size: tuple[int, int]) -> None:
    if opts.threshold is None:  # GPU targets require one: the calibrated default from the config
        opts.threshold = pool.default_threshold
    fps = opts.fps if opts.fps is not None else source.fps
    total = source.count if opts.limit is None else (
        min(source.count, opts.limit) if source.count is not None else opts.limit)

    with contextlib.suppress(FileNotFoundError):  # a rewrite killed before its rename
        opts.out.with_name(opts.out.name + ".rewrite.tmp").unlink()
    found = scan_existing(opts.out) if opts.resume else Existing()
    start = found.count
    summary.skipped = start
    if start:  # OUT must have come from this source: check its last line's frame
        item = next(source.items(start - 1), None)
        if item is None:
            raise CMGError(f"{opts.out} has {start} lines but source {opts.source} has fewer frames")
        if found.last_id is not None and item.frame_id != found.last_id:
            raise CMGError(
                f"{opts.out}: last line is frame {found.last_id!r} but the source's frame {start - 1} is "
                f"{item.frame_id!r}; it was written from another source"
            )
        if found.last_source is not None and not same_source(found.last_source, item.source):
            raise CMGError(f"{opts.out}: its lines come from source {found.last_source!r}, not {item.source!r}; "
                           "resume with the source that wrote it, or choose another --out")
    redo: list[tuple[int, SourceItem]] = []
    if opts.retry_errors and found.errors:
        redo = list(source.pick(found.errors))
        for seq, item in redo:
            if found.errors[seq] is not None and item.frame_id != found.errors[seq]:
                raise CMGError(f"{opts.out}: line {seq} is frame {found.errors[seq]!r} but the source's frame "
                               f"{seq} is {item.frame_id!r}; it was written from another source")

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    scorer = _Scorer(opts, pool, size, summary)
    progress = _Progress(total, start, opts.progress)
    t_begin = time.perf_counter()
    out = None
    try:
        if redo:
            redone: dict[int, dict] = {}

            def keep(line: dict) -> None:
                redone[line["seq"]] = line
                summary.rescored += 1
                if "error" not in line:
                    summary.fixed += 1
                if opts.on_line:
                    opts.on_line(line)

            try:
                await scorer.run(redo, keep, None, _Progress(len(redo), 0, False))
            finally:  # also when aborted: what was re-scored is kept
                replace_lines(opts.out, {s: line for s, line in redone.items() if "error" not in line})
        if not scorer.fatal:
            out = open(opts.out, "a" if opts.resume else "w", encoding="utf-8")  # noqa: SIM115

            def write(line: dict) -> None:
                with naming(opts.out):  # e.g. [Errno 28] on a full disk: say which file
                    out.write(json.dumps(line) + "\n")
                    out.flush()
                summary.frames += 1
                if "error" in line:
                    summary.errors += 1
                else:
                    summary.results += 1
                if opts.on_line:
                    opts.on_line(line)

            count = max(0, (opts.limit if opts.limit is not None else 1 << 62) - start)
            jobs = enumerate(itertools.islice(source.items(start), count), start)
            await scorer.run(jobs, write, fps, progress)
    finally:
        if out is not None:
            with naming(opts.out):  # what a full disk refused is flushed again here, and fails again
                out.close()
        progress.close()
        summary.elapsed_s = time.perf_counter() - t_begin
        summary.fps = summary.frames / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
        if scorer.latencies:
            p50, p99 = np.percentile(np.asarray(scorer.latencies), [50, 99])
            summary.p50_ms, summary.p99_ms = float(p50), float(p99)
        summary.errors_in_out = len(found.errors) - summary.fixed + summary.errors
        if scorer.fatal:
            summary.aborted = scorer.fatal[0]


class _Progress:
    """tqdm bar with live fps and p50/p99 latency, refreshed at most a few times a second."""

    def __init__(self, total: int | None, initial: int, enabled: bool | None):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, unit="frame", desc="stream", file=sys.stderr,
            disable=None if enabled is None else not enabled, dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.frames = 0
        self.last = 0.0

    def update(self, latencies: list[float], summary: StreamSummary) -> None:
        self.bar.update(1)
        self.frames += 1
        now = time.perf_counter()
        if now - self.last < 0.5 or self.bar.disable:
            return
        self.last = now
        post = {"fps": f"{self.frames / max(now - self.t0, 1e-9):.1f}"}
        if latencies:
            p50, p99 = np.percentile(np.asarray(latencies[-2000:]), [50, 99])
            post.update(p50=f"{p50:.1f}ms", p99=f"{p99:.1f}ms")
        if summary.retries:
            post["retries"] = str(summary.retries)
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_stream(opts: StreamOptions) -> StreamSummary:
    """Stream SRC into OUT; returns the summary (also when aborted: OUT holds every line so far).

    With `opts.dashboard` the live page (cmg_clients.dashboard) is served while it streams."""
    summary = StreamSummary(out=str(opts.out))
    if opts.dashboard is None:
        asyncio.run(_stream(opts, summary))
        return summary
    from cmg_clients.dashboard.app import Dashboard

    with Dashboard.for_stream(opts) as board:
        opts.observer = board.state
        asyncio.run(_stream(opts, summary))
    return summary


# -- several sources, several servers -----------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def source_name(spec: str) -> tuple[str, str]:
    """`NAME=SRC` -> (NAME, SRC); otherwise a file-name-safe name made from SRC itself
    (a folder's or video's name, a synth spec with its seed)."""
    name, sep, rest = spec.partition("=")
    if sep and _NAME.fullmatch(name) and rest and not Path(spec).exists():
        return name, rest
    if spec.startswith("synth:"):
        o = parse_synth(spec)
        base = f"synth_{o['preset']}_seed{o['seed']}"
    else:
        path = Path(spec.rstrip("/"))
        base = path.stem if path.suffix.lower() in VIDEO_EXTS else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_.") or "source", spec


def plan_sources(specs: list[str], out_dir: Path) -> list[tuple[str, str, Path]]:
    """(name, SRC, DIR/name.jsonl) per source; two sources may not share a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CMGError(f"--out {out_dir} is a file: with several --source it is a folder (one NAME.jsonl per source)")
    check_parent_folders(out_dir / "x.jsonl", "--out")
    plan, seen = [], {}
    for spec in specs:
        name, src = source_name(spec)
        if name in seen:
            raise CMGError(f"sources {seen[name]!r} and {spec!r} would both write {name}.jsonl: "
                           f"name them, e.g. --source cam1={src}")
        seen[name] = spec
        plan.append((name, src, out_dir / f"{name}.jsonl"))
    return plan


async def _stream_all(urls: list[str], jobs: list[tuple[StreamOptions, StreamSummary]]) -> dict[str, dict]:
    """Every source at once, each with its own window, ordering and resume, over one pool."""
    first = jobs[0][0]
    core.positive_seconds(first.timeout_s, "--timeout")
    for opts, _ in jobs:  # every source is opened before any frame is sent: a bad one fails fast
        if opts.frames is None:
            opts.frames = open_source(opts.source, opts.max_pixels)
    pool = ServerPool(urls, first.model, first.timeout_s)
    try:
        size = pool.handshake()
        pool.start_probes()
        await asyncio.gather(*(_stream(opts, summary, pool, size) for opts, summary in jobs))
    finally:
        await pool.close()
    return pool.stats()


def run_streams(urls: list[str], options: list[StreamOptions]) -> tuple[list[StreamSummary], dict[str, dict]]:
    """Several sources (each its own StreamOptions and file) over the servers at `urls`;
    returns each source's summary and what each server did."""
    jobs = [(opts, StreamSummary(out=str(opts.out))) for opts in options]
    if not options or options[0].dashboard is None:
        return [summary for _, summary in jobs], asyncio.run(_stream_all(urls, jobs))
    from cmg_clients.dashboard.app import Dashboard

    with Dashboard.for_stream(options[0], names=[o.source_name for o in options]) as board:
        for opts in options:  # one page, a tile per camera
            opts.observer = board.state
        stats = asyncio.run(_stream_all(urls, jobs))
    return [summary for _, summary in jobs], stats


# -- command line -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cmg.argtypes import positive_float, positive_int, retries_int, threshold_float

    parser.add_argument("--url", action="append", default=None,
                        help=f"gRPC HOST:PORT (default {core.default_url('grpc')}); repeat for several servers: "
                        "each frame goes to the one with the fewest frames in flight, a failed one's frames "
                        "to the others")
    parser.add_argument("--source", action="append", required=True,
                        help="folder, glob, video file (OpenCV) or synth:PRESET[?fps=..&seed=..&n=..]; "
                        "repeat for several cameras, optionally as NAME=SRC")
    parser.add_argument("--out", required=True, type=Path,
                        help="JSONL output, one line per frame; with several --source a folder (NAME.jsonl each)")
    parser.add_argument("--model", default=C.CMG, choices=list(C.ENSEMBLES), help="ensemble to call")
    parser.add_argument("--fps", type=positive_float, default=None,
                        help="frame rate to send at (default: as fast as possible)")
    parser.add_argument("--window", type=positive_int, default=16,
                        help="frames in flight, not yet written (default 16)")
    parser.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--resume", action="store_true", help="continue after the last line already in OUT")
    parser.add_argument("--retry-errors", action="store_true",
                        help="with --resume: re-score the error lines already in OUT (rewritten atomically)")
    parser.add_argument("--overwrite", action="store_true", help="start OUT afresh if it exists")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many frames in OUT")
    parser.add_argument("--max-retries", type=retries_int, default=30,
                        help="tries per frame while the server is away before giving up (-1: forever)")
    parser.add_argument("--backoff-max", type=positive_float, default=5.0,
                        help="longest wait between retries (s)")
    parser.add_argument("--threshold", type=threshold_float, default=None, help="override the calibrated threshold")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse image files declaring more pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dashboard", default=None, metavar="[HOST:]PORT",
                        help="serve the live line page while streaming (host default 127.0.0.1)")
    parser.add_argument("--metrics-url", default=None, metavar="HOST:PORT",
                        help="Triton's Prometheus metrics for the page (default: --url's host, port 8002)")


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise CMGError(f"--limit must be >= 0, got {args.limit}")
    urls = args.url or [core.default_url("grpc")]

    def options(source: str, out: Path, progress: bool | None, name: str | None = None) -> StreamOptions:
        return StreamOptions(
            url=urls[0], source=source, out=out, model=args.model, fps=args.fps,
            window=args.window, timeout_s=args.timeout, resume=args.resume, retry_errors=args.retry_errors,
            overwrite=args.overwrite, limit=args.limit, max_retries=args.max_retries,
            backoff_max_s=args.backoff_max, threshold=args.threshold, max_pixels=args.max_pixels,
            progress=False if args.no_progress else progress, dashboard=args.dashboard,
            metrics_url=args.metrics_url, name=name,
        )

    if len(args.source) == 1 and len(urls) == 1:
        summary = run_stream(options(source_name(args.source[0])[1], args.out, None))
        print(f"cmg stream: {summary.line()}", file=sys.stderr)
        print(json.dumps(asdict(summary)))
        return 1 if summary.aborted or summary.errors_in_out else 0
    if len(args.source) == 1:  # one camera, several servers: OUT stays a file
        plan = [(None, source_name(args.source[0])[1], args.out)]
    else:
        plan = plan_sources(args.source, args.out)
    summaries, servers = run_streams(urls, [options(src, out, False, name) for name, src, out in plan])
    for (name, _, _), summary in zip(plan, summaries, strict=True):
        print(f"cmg stream{' ' + name if name else ''}: {summary.line()}", file=sys.stderr)
    for url, stat in servers.items():
        print(f"  server {url}: {stat['frames']} frames, marked down {stat['failures']} times", file=sys.stderr)
    print(json.dumps({"sources": {str(out): asdict(s) for (_, _, out), s in zip(plan, summaries, strict=True)},
                      "servers": servers}))
    return 1 if any(s.aborted or s.errors_in_out for s in summaries) else 0
