"""`cmg stream`: the factory-line client. Every frame gets exactly one JSON line, in order.

Async gRPC with a bounded window of frames not yet written; a frame whose request fails
because the server went away (refused, unavailable, deadline) is retried on a fresh
channel with exponential backoff, never dropped and never written twice. Lines go out
through a reorder buffer in sequence order and are flushed one by one, so `--resume`
can continue after the last line of a crashed or stopped run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob as globlib
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from cmg import contract as C
from cmg.errors import CMGError

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
# gRPC codes meaning "the server is (temporarily) not there": retry the frame on a new channel.
RETRYABLE = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.CANCELLED",
    "StatusCode.ABORTED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.UNKNOWN",
}
Loader = Callable[[tuple[int, int]], np.ndarray]  # (height, width) -> UINT8 frame


@dataclass(frozen=True)
class SourceItem:
    """A frame to come: its id, where it comes from, and how to read it (lazily)."""

    frame_id: str
    source: str
    load: Loader
    extra: dict = field(default_factory=dict)  # e.g. the synthetic scene's label


# -- sources ------------------------------------------------------------------------------
def _file_items(paths: list[Path], root: Path | None) -> Iterator[SourceItem]:
    from cmg.frames import load_frame

    for p in paths:
        fid = str(p.relative_to(root)) if root is not None else str(p)
        yield SourceItem(fid, str(p), lambda size, p=p: load_frame(p, size))


def _video_items(path: Path) -> Iterator[SourceItem]:
    try:
        import cv2
    except ImportError as exc:
        raise CMGError(f"{path}: video sources need OpenCV (pip install 'cmg-triton[video]')") from exc
    from cmg.frames import to_frame

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise CMGError(f"cannot open video {path}")
    try:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            rgb = np.ascontiguousarray(bgr[..., ::-1])
            yield SourceItem(f"{path.name}#{index}", str(path), lambda size, a=rgb: to_frame(a, size))
            index += 1
    finally:
        cap.release()


def parse_synth(spec: str) -> dict:
    """`synth:PRESET[?fps=..&seed=..&n=..]` -> {"preset", "fps", "seed", "n"}."""
    body = spec[len("synth:") :]
    preset, _, query = body.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, strict_parsing=bool(query)).items()} if query else {}
    unknown = set(params) - {"fps", "seed", "n"}
    if unknown:
        raise CMGError(f"{spec}: unknown parameter(s) {', '.join(sorted(unknown))} (expected fps, seed, n)")
    try:
        return {
            "preset": preset or "tiny",
            "fps": float(params["fps"]) if "fps" in params else None,
            "seed": int(params.get("seed", 0)),
            "n": int(params["n"]) if "n" in params else None,
        }
    except ValueError as exc:
        raise CMGError(f"{spec}: {exc}") from exc


def _synth_items(spec: str) -> Iterator[SourceItem]:
    """Frames from the synthetic factory generator (cmg.synth), deterministic for a seed."""
    from cmg.frames import to_frame

    opts = parse_synth(spec)
    try:
        from cmg import synth
    except ImportError as exc:
        raise CMGError(f"{spec}: the synthetic generator cmg.synth is not available ({exc})") from exc
    label = f"synth:{opts['preset']}?seed={opts['seed']}"
    for index, (image, info) in enumerate(synth.stream_frames(opts["preset"], seed=opts["seed"], n=opts["n"])):
        yield SourceItem(f"{index:06d}", label, lambda size, a=image: to_frame(a, size), dict(info))


def open_source(spec: str) -> tuple[Iterator[SourceItem], int | None, float | None]:
    """SRC -> (items, count if known, the source's own fps if it has one)."""
    if spec.startswith("synth:"):
        opts = parse_synth(spec)
        return _synth_items(spec), opts["n"], opts["fps"]
    path = Path(spec)
    if path.is_dir():
        from cmg_clients.client import iter_image_paths

        paths = iter_image_paths([path])
        if not paths:
            raise CMGError(f"no images in folder {path}")
        return _file_items(paths, path), len(paths), None
    if path.is_file() and path.suffix.lower() in VIDEO_EXTS:
        return _video_items(path), None, None
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in sorted(globlib.glob(spec, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise CMGError(f"glob {spec} matches no files")
        return _file_items(paths, None), len(paths), None
    if path.is_file():
        return _file_items([path], path.parent), 1, None
    raise CMGError(f"source {spec}: not a folder, glob, video file or synth:PRESET")


# -- output -------------------------------------------------------------------------------
def read_existing(out: Path) -> tuple[int, str | None]:
    """Lines already in OUT: (count, last frame_id). Truncates a torn last line (crash mid-write).

    The lines must be seqs 0..n-1 in order, which is what this client writes; anything
    else means OUT came from somewhere else, and continuing would corrupt it.
    """
    if not out.is_file():
        return 0, None
    raw = out.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
    count, last_id = 0, None
    for lineno, line in enumerate(keep.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CMGError(f"{out}:{lineno}: not a JSON line ({exc}); cannot resume") from exc
        if rec.get("seq") != count:
            raise CMGError(f"{out}:{lineno}: seq {rec.get('seq')} where {count} was expected; cannot resume")
        count, last_id = count + 1, rec.get("frame_id")
    if len(keep) != len(raw):
        out.write_bytes(keep)
    return count, last_id


# -- the stream ---------------------------------------------------------------------------
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
    overwrite: bool = False
    limit: int | None = None
    max_retries: int = 30  # per frame; < 0 means no limit
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0
    threshold: float | None = None
    progress: bool | None = None  # None: only on a terminal


@dataclass
class StreamSummary:
    out: str
    frames: int = 0  # lines written by this run
    results: int = 0
    errors: int = 0
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


async def _stream(opts: StreamOptions, summary: StreamSummary) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from cmg_clients.client import CMGClient, normalize_url

    url = normalize_url(opts.url, "grpc")
    # Synchronous handshake: fails fast with a clear message if the server or model is wrong,
    # and gives the frame size without a run folder.
    with CMGClient(url, "grpc", model=opts.model, timeout_s=opts.timeout_s) as probe:
        size = probe.size

    items, count, src_fps = open_source(opts.source)
    fps = opts.fps if opts.fps is not None else src_fps
    total = count if opts.limit is None else (min(count, opts.limit) if count is not None else opts.limit)

    if opts.out.exists() and opts.out.stat().st_size and not (opts.resume or opts.overwrite):
        raise CMGError(f"{opts.out} already has results: pass --resume to continue it or --overwrite")
    start, last_id = read_existing(opts.out) if opts.resume else (0, None)
    summary.skipped = start
    for seq in range(start):  # skip what OUT already has; check it came from this source
        item = next(items, None)
        if item is None:
            raise CMGError(f"{opts.out} has {start} lines but source {opts.source} has only {seq} frames")
        if seq == start - 1 and last_id is not None and item.frame_id != last_id:
            raise CMGError(
                f"{opts.out}: last line is frame {last_id!r} but the source's frame {seq} is "
                f"{item.frame_id!r}; it was written from another source"
            )

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    out = open(opts.out, "a" if opts.resume else "w", encoding="utf-8")  # noqa: SIM115
    channel = _Channel(url, opts.timeout_s)
    window = asyncio.Semaphore(max(1, opts.window))
    pending: dict[int, dict] = {}
    next_write = start
    latencies: list[float] = []
    fatal: list[str] = []
    progress = _Progress(total, start, opts.progress)
    t_begin = time.perf_counter()

    def deliver(seq: int, line: dict) -> None:
        nonlocal next_write
        pending[seq] = line
        while next_write in pending:
            rec = pending.pop(next_write)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            summary.frames += 1
            if "error" in rec:
                summary.errors += 1
            else:
                summary.results += 1
            next_write += 1
            window.release()
            progress.update(latencies, summary)

    async def handle(seq: int, item: SourceItem) -> None:
        base = {"seq": seq, "frame_id": item.frame_id, "source": item.source, **item.extra}
        try:
            frame = await asyncio.to_thread(item.load, size)
        except (ValueError, OSError) as exc:  # FrameError is a ValueError
            deliver(seq, {**base, "error": str(exc)})
            return
        inputs = [grpcclient.InferInput(C.IMAGE, [1, *frame.shape], "UINT8")]
        inputs[0].set_data_from_numpy(frame[None])
        if opts.threshold is not None:
            inputs.append(grpcclient.InferInput(C.THRESHOLD, [1, 1], "FP32"))
            inputs[1].set_data_from_numpy(np.array([[opts.threshold]], dtype=np.float32))
        # All ensemble outputs (outputs=None): Triton 2.47-2.51 ensembles fail with "unexpected
        # deadlock" when a request names only a subset (triton-inference-server/server#7482).
        outputs = None
        attempt = 0
        while True:
            generation = channel.generation
            t0 = time.perf_counter()
            try:
                res = await channel.client.infer(
                    opts.model, inputs, outputs=outputs, client_timeout=opts.timeout_s
                )
            except InferenceServerException as exc:
                status = str(exc.status())
                if status not in RETRYABLE:
                    deliver(seq, {**base, "error": f"{status}: {exc.message()}"})
                    return
                reason = f"{status}: {exc.message()}"
            except asyncio.CancelledError:
                if stopping or _really_cancelled():
                    raise
                reason = "call cancelled by the channel"  # grpc.aio: the channel went away under it
            except Exception as exc:  # noqa: BLE001 - e.g. grpc.aio.UsageError on a closed channel
                reason = f"{type(exc).__name__}: {exc}"
            else:
                latency = (time.perf_counter() - t0) * 1000.0
                latencies.append(latency)
                deliver(seq, {
                    **base,
                    "score": float(res.as_numpy(C.ANOMALY_SCORE).reshape(-1)[0]),
                    "is_anomaly": bool(res.as_numpy(C.IS_ANOMALY).reshape(-1)[0]),
                    "latency_ms": round(latency, 3),
                    "retries": attempt,
                })
                return
            attempt += 1
            summary.retries += 1
            if 0 <= opts.max_retries < attempt:
                raise _Fatal(f"frame {seq} ({item.frame_id}) failed {attempt} times; last: {reason}")
            await channel.reset(generation)
            delay = min(opts.backoff_max_s, opts.backoff_s * 2 ** (attempt - 1))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    tasks: set[asyncio.Task] = set()
    stopping = False

    def on_done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if task.cancelled():
            if not stopping:  # a frame that ended without a line would stall the writer forever
                fatal.append(f"{task.get_name()} was cancelled")
                window.release()
            return
        if task.exception() is not None:
            exc = task.exception()
            fatal.append(str(exc) if isinstance(exc, _Fatal) else f"{type(exc).__name__}: {exc}")
            window.release()  # wake the producer so it sees the failure instead of waiting forever

    try:
        seq = start
        for item in items:
            if fatal or (opts.limit is not None and seq >= opts.limit):
                break
            await window.acquire()
            if fatal:
                break
            if fps:
                wait = t_begin + (seq - start) / fps - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            task = asyncio.create_task(handle(seq, item), name=f"frame {seq} ({item.frame_id})")
            tasks.add(task)
            task.add_done_callback(on_done)
            seq += 1
        while tasks and not fatal:
            await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
    finally:
        stopping = True
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        out.close()
        progress.close()
        summary.elapsed_s = time.perf_counter() - t_begin
        summary.reconnects = channel.reconnects
        summary.fps = summary.frames / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
        if latencies:
            p50, p99 = np.percentile(np.asarray(latencies), [50, 99])
            summary.p50_ms, summary.p99_ms = float(p50), float(p99)
        if fatal:
            summary.aborted = fatal[0]


def _really_cancelled() -> bool:
    """True when this task itself was cancelled (not a gRPC call cancelled under it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling()) if cancelling is not None else False


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
    """Stream SRC into OUT; returns the summary (also when aborted: OUT holds every line so far)."""
    summary = StreamSummary(out=str(opts.out))
    asyncio.run(_stream(opts, summary))
    return summary


# -- command line -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT (default 127.0.0.1:8001)")
    parser.add_argument("--source", required=True,
                        help="folder, glob, video file (OpenCV) or synth:PRESET[?fps=..&seed=..&n=..]")
    parser.add_argument("--out", required=True, type=Path, help="JSONL output, one line per frame")
    parser.add_argument("--model", default=C.CMG, choices=list(C.ENSEMBLES), help="ensemble to call")
    parser.add_argument("--fps", type=float, default=None, help="frame rate to send at (default: as fast as possible)")
    parser.add_argument("--window", type=int, default=16, help="frames in flight, not yet written (default 16)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--resume", action="store_true", help="continue after the last line already in OUT")
    parser.add_argument("--overwrite", action="store_true", help="start OUT afresh if it exists")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many frames in OUT")
    parser.add_argument("--max-retries", type=int, default=30,
                        help="tries per frame while the server is away before giving up (-1: forever)")
    parser.add_argument("--backoff-max", type=float, default=5.0, help="longest wait between retries (s)")
    parser.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.window < 1:
        raise CMGError(f"--window must be >= 1, got {args.window}")
    if args.fps is not None and args.fps <= 0:
        raise CMGError(f"--fps must be > 0, got {args.fps}")
    if args.limit is not None and args.limit < 0:
        raise CMGError(f"--limit must be >= 0, got {args.limit}")
    opts = StreamOptions(
        url=args.url, source=args.source, out=args.out, model=args.model, fps=args.fps,
        window=args.window, timeout_s=args.timeout, resume=args.resume, overwrite=args.overwrite,
        limit=args.limit, max_retries=args.max_retries, backoff_max_s=args.backoff_max,
        threshold=args.threshold, progress=False if args.no_progress else None,
    )
    summary = run_stream(opts)
    print(f"cmg stream: {summary.line()}", file=sys.stderr)
    print(json.dumps(asdict(summary)))
    return 1 if summary.aborted else 0
