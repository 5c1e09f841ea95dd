"""`cmg stream`: the factory-line client. Every frame gets exactly one JSON line, in order
(a camera's frames dropped while the servers were behind get none: they are counted).

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
import dataclasses
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from cmg import contract as C
from cmg.argtypes import positive_float, positive_int, retries_int, threshold_float
from cmg.errors import CMGError, naming
from cmg.frames import DEFAULT_MAX_PIXELS
from cmg.locks import OutputLock
from cmg_clients import core
from cmg_clients.output import (
    Existing,
    check_out_path,
    looks_like_stream_output,
    replace_lines,
    rewrite_tmp,
    same_source,
    scan_existing,
)
from cmg_clients.overlay import check_overlay_dir, claim_overlay_dir
from cmg_clients.planning import plan_sources, source_name
from cmg_clients.scorer import Progress, Scorer, StreamOptions, StreamSummary
from cmg_clients.servers import ServerPool
from cmg_clients.sources import LiveOptions, Source, SourceItem, open_source, redact


def _open(opts: StreamOptions) -> Source:
    """OPTS's source; a camera is sampled at --fps as it is read (pacing its sends would only
    send older frames, and in a burst after an outage)."""
    return open_source(opts.source, opts.max_pixels, dataclasses.replace(opts.live or LiveOptions(), fps=opts.fps))


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
        if opts.overlays is not None:
            claim_overlay_dir(opts.overlays, opts.out)
        await _stream_locked(opts, summary, pool, size, own_pool, url)


async def _stream_locked(opts: StreamOptions, summary: StreamSummary, pool: ServerPool | None,
                         size: tuple[int, int] | None, own_pool: bool, url: str) -> None:
    if opts.out.exists() and opts.out.stat().st_size and not (opts.resume or opts.overwrite):
        if not looks_like_stream_output(opts.out):
            raise CMGError(f"--out {opts.out} exists and is not a cmg stream output (its first line is not a "
                           "JSON line with seq 0): choose another file, or --overwrite to replace it")
        raise CMGError(f"{opts.out} already has results: pass --resume to continue it or --overwrite")
    source = opts.frames if opts.frames is not None else _open(opts)
    try:
        await _stream_source(opts, summary, source, pool, size, own_pool, url)
    finally:  # a camera's thread and connection
        source.close()


async def _stream_source(opts: StreamOptions, summary: StreamSummary, source: Source, pool: ServerPool | None,
                         size: tuple[int, int] | None, own_pool: bool, url: str) -> None:
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
        if own_pool:  # a shared pool's reconnects are per server (`stats`), not this source's
            await pool.close()
            summary.reconnects = pool.reconnects


async def _stream_into(opts: StreamOptions, summary: StreamSummary, source: Source, pool: ServerPool,
                       size: tuple[int, int]) -> None:
    fps = None if not source.replayable else opts.fps if opts.fps is not None else source.fps  # a camera paces itself
    total = source.count if opts.limit is None else (
        min(source.count, opts.limit) if source.count is not None else opts.limit)

    with contextlib.suppress(FileNotFoundError):  # a rewrite killed before its rename
        rewrite_tmp(opts.out).unlink()
    found = scan_existing(opts.out) if opts.resume else Existing()
    start = found.count
    summary.skipped = start
    if opts.retry_errors and found.errors and not source.replayable:
        raise CMGError(f"{opts.out}: --retry-errors re-scores earlier frames, and the live source "
                       f"{redact(opts.source)} cannot send them again; resume without it")
    if start and not source.replayable:  # a camera: new frames are appended after OUT's last line
        if found.last_source is not None and found.last_source != getattr(source, "label", opts.source):
            raise CMGError(f"{opts.out}: its lines come from source {found.last_source!r}; resume with the "
                           "source that wrote it, or choose another --out")
    elif start:  # OUT must have come from this source: check its last line's frame
        item = next(source.items(start - 1), None)
        if item is None:
            wrote = f" (the last from {found.last_source!r})" if found.last_source is not None else ""
            raise CMGError(f"{opts.out} has {start} lines{wrote} but source {opts.source} has fewer frames; "
                           "resume with the source that wrote it, or choose another --out")
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
    scorer = Scorer(opts, pool, size, summary)
    progress = Progress(total, start, opts.progress)
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
                await scorer.run(redo, keep, None, Progress(len(redo), 0, False))
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
                    summary.flagged += bool(line.get("is_anomaly"))
                if opts.on_line:
                    opts.on_line(line)

            count = max(0, (opts.limit if opts.limit is not None else 1 << 62) - start)
            jobs = enumerate(itertools.islice(source.items(_first_item(source, start, found)), count), start)
            await scorer.run(jobs, write, fps, progress, source.reads_in_thread)
    finally:
        if out is not None:
            with naming(opts.out):  # what a full disk refused is flushed again here, and fails again
                out.close()
        progress.close()
        summary.elapsed_s = time.perf_counter() - t_begin
        summary.fps = summary.frames / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
        if scorer.latencies:
            p50, p99 = scorer.latencies.percentiles([50, 99])
            summary.p50_ms, summary.p99_ms = float(p50), float(p99)
        summary.errors_in_out = len(found.errors) - summary.fixed + summary.errors
        summary.warnings = list(source.warnings)
        if scorer.fatal:
            summary.aborted = scorer.fatal[0]
        elif source.failure:
            summary.aborted = source.failure


def _first_item(source: Source, start: int, found: Existing) -> int:
    """Where the source's items begin: after OUT's lines; for a camera, whose frames are numbered
    as read, after the number in OUT's last frame id, so a resumed file has no id twice."""
    if source.replayable or found.last_id is None:
        return start
    m = re.search(r"#(\d+)$", found.last_id)
    return max(start, int(m.group(1)) + 1) if m else start


def run_stream(opts: StreamOptions, summary: StreamSummary | None = None) -> StreamSummary:
    """Stream SRC into OUT; returns the summary (also when aborted: OUT holds every line so far;
    `summary`, when given, is filled as it goes: what an interrupted caller can still report).

    With `opts.dashboard` the live page (cmg_clients.dashboard) is served while it streams."""
    summary = summary if summary is not None else StreamSummary(out=str(opts.out))
    if opts.dashboard is None:
        asyncio.run(_stream(opts, summary))
        return summary
    from cmg_clients.dashboard.app import Dashboard  # starlette and uvicorn: only with --dashboard

    with Dashboard.for_stream(opts) as board:
        opts.observer = board.state
        asyncio.run(_stream(opts, summary))
    return summary


# -- several sources, several servers -----------------------------------------------------
async def _stream_all(urls: list[str], jobs: list[tuple[StreamOptions, StreamSummary]]) -> dict[str, dict]:
    """Every source at once, each with its own window, ordering and resume, over one pool."""
    first = jobs[0][0]
    for opts, _ in jobs:
        core.positive_seconds(opts.timeout_s, "--timeout")
    opened = []
    try:
        for opts, _ in jobs:  # every source is opened before any frame is sent: a bad one fails fast
            if opts.frames is None:
                opts.frames = _open(opts)
                opened.append(opts.frames)
        # the longest deadline of the sources: a replaced channel is closed once its calls are past it
        pool = ServerPool(urls, first.model, max(o.timeout_s for o, _ in jobs))
        try:
            size = pool.handshake()
            pool.start_probes()
            await asyncio.gather(*(_stream(opts, summary, pool, size) for opts, summary in jobs))
        finally:
            await pool.close()
    finally:  # also those a failure kept from their stream (a camera reads until closed)
        for source in opened:
            source.close()
    return pool.stats()


def run_streams(urls: list[str], options: list[StreamOptions],
                summaries: list[StreamSummary] | None = None) -> tuple[list[StreamSummary], dict[str, dict]]:
    """Several sources (each its own StreamOptions and file) over the servers at `urls`;
    returns each source's summary and what each server did (`summaries`: filled as it goes)."""
    summaries = summaries if summaries is not None else [StreamSummary(out=str(o.out)) for o in options]
    jobs = list(zip(options, summaries, strict=True))
    if not options or options[0].dashboard is None:
        return [summary for _, summary in jobs], asyncio.run(_stream_all(urls, jobs))
    from cmg_clients.dashboard.app import Dashboard  # starlette and uvicorn: only with --dashboard

    with Dashboard.for_stream(options[0], names=[o.source_name for o in options], urls=urls) as board:
        for opts in options:  # one page, a tile per camera
            opts.observer = board.state
        stats = asyncio.run(_stream_all(urls, jobs))
    return [summary for _, summary in jobs], stats


# -- command line -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", default=None,
                        help=f"gRPC HOST:PORT (default {core.default_url('grpc')}); repeat for several servers: "
                        "each frame goes to the one with the fewest frames in flight, a failed one's frames "
                        "to the others")
    parser.add_argument("--source", action="append", required=True,
                        help="folder, glob, video file, camera (rtsp://, http://, tcp://, udp://, rtmp://, srt:// "
                        "URL, /dev/videoN or camera:N; OpenCV) or synth:PRESET[?fps=..&seed=..&n=..]; "
                        "repeat for several cameras, optionally as NAME=SRC")
    parser.add_argument("--out", required=True, type=Path,
                        help="JSONL output, one line per frame; with several --source a folder (NAME.jsonl each)")
    parser.add_argument("--model", default=C.CMG, choices=list(C.ENSEMBLES), help="ensemble to call")
    parser.add_argument("--fps", type=positive_float, default=None,
                        help="frame rate to send at (default: a synth: source's own ?fps=, else as fast as possible); "
                             "a camera is sampled at this rate as it is read")
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
                        help="longest wait between retries (s), and between a camera's reopen tries")
    parser.add_argument("--reconnects", type=retries_int, default=30,
                        help="tries in a row to reopen a camera whose stream stopped before the stream "
                             "ends (-1: forever; default 30)")
    parser.add_argument("--camera-timeout", type=positive_float, default=LiveOptions.read_timeout_s,
                        help="seconds a camera may send nothing before it is reopened; also how long its "
                             "first frame is waited for (default %(default)s; raise it for a triggered camera)")
    parser.add_argument("--threshold", type=threshold_float, default=None, help="override the calibrated threshold")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse image files declaring more pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--overlays", type=Path, default=None,
                        help="write an overlay PNG per flagged frame under DIR/OUT-NAME/ (a folder per output "
                             "file); each flagged line names its file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dashboard", default=None, metavar="[HOST:]PORT",
                        help="serve the live line page while streaming (host default 127.0.0.1)")
    parser.add_argument("--metrics-url", action="append", default=None, metavar="HOST:PORT",
                        help="Triton's Prometheus metrics for the page, repeatable, summed (default: each "
                             "--url's host, port 8002)")


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise CMGError(f"--limit must be >= 0, got {args.limit}")
    if args.metrics_url and args.dashboard is None:  # only the page reads them: it had been ignored
        raise CMGError("--metrics-url is what the live page (--dashboard) reads: give --dashboard too")
    urls = args.url or [core.default_url("grpc")]
    check_overlay_dir(args.overlays)

    def options(source: str, out: Path, progress: bool | None, name: str | None = None) -> StreamOptions:
        return StreamOptions(
            url=urls[0], source=source, out=out, model=args.model, fps=args.fps,
            window=args.window, timeout_s=args.timeout, resume=args.resume, retry_errors=args.retry_errors,
            overwrite=args.overwrite, limit=args.limit, max_retries=args.max_retries,
            backoff_max_s=args.backoff_max, threshold=args.threshold, max_pixels=args.max_pixels,
            live=LiveOptions(reconnects=args.reconnects, backoff_max_s=args.backoff_max,
                             read_timeout_s=args.camera_timeout),
            progress=False if args.no_progress else progress, dashboard=args.dashboard,
            metrics_url=args.metrics_url, name=name,
            overlays=None if args.overlays is None else args.overlays / out.stem,  # one folder per OUT
        )

    if len(args.source) == 1 and len(urls) == 1:
        summary = StreamSummary(out=str(args.out))
        with _said_when_interrupted([summary], lambda: asdict(summary)):
            run_stream(options(source_name(args.source[0])[1], args.out, None), summary)
        print(f"cmg stream: {summary.line()}", file=sys.stderr)
        print(json.dumps(asdict(summary)))
        return 1 if summary.aborted or summary.errors_in_out else 0
    if len(args.source) == 1:  # one camera, several servers: OUT stays a file
        plan = [(None, source_name(args.source[0])[1], args.out)]
    else:
        plan = plan_sources(args.source, args.out)
    summaries = [StreamSummary(out=str(out)) for _, _, out in plan]

    def by_source() -> dict:
        return {str(out): asdict(s) for (_, _, out), s in zip(plan, summaries, strict=True)}

    with _said_when_interrupted(summaries, lambda: {"sources": by_source()}):
        _, servers = run_streams(urls, [options(src, out, False, name) for name, src, out in plan], summaries)
    for (name, _, _), summary in zip(plan, summaries, strict=True):
        print(f"cmg stream{' ' + name if name else ''}: {summary.line()}", file=sys.stderr)
    for url, stat in servers.items():
        print(f"  server {url}: {stat['frames']} frames, marked down {stat['failures']} times", file=sys.stderr)
    print(json.dumps({"sources": by_source(), "servers": servers}))
    return 1 if any(s.aborted or s.errors_in_out for s in summaries) else 0


@contextlib.contextmanager
def _said_when_interrupted(summaries: list[StreamSummary], report: Callable[[], dict]) -> Iterator[None]:
    """Ctrl-C or SIGTERM mid-stream: what each OUT holds now, before the exit line, and the
    JSON summary on stdout as a finished run prints it (`aborted: interrupted`), so a
    script reading stdout gets its counts either way."""
    try:
        yield
    except KeyboardInterrupt:
        for s in summaries:
            s.aborted = s.aborted or "interrupted"
            print(f"cmg stream: stopped with {s.frames} frames written to {s.out} by this run ({s.results} "
                  f"results, {s.errors} errors; every line whole): `--resume` continues it", file=sys.stderr)
        print(json.dumps(report()))
        raise
