"""`cmg bench soak --minutes MINUTES`: a long stream at a fixed share of measured capacity.

What it answers: does the served chain stay healthy for a shift? Capacity is measured
first (closed loop, batch 1, as many requests in flight as the stream's window), then
`cmg stream`'s own client sends the run's test frames at `load` x that rate for the given
time. Reported: frames, errors, p50/p99 latency per minute, and the resident memory of
tritonserver and of each Python-backend stub process at the start and the end, sampled
all along (soak.json, soak.md, soak.png with both over time, soak.jsonl the stream's
lines). Memory is read from /proc for a server started here; with --url it is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cmg.argtypes import positive_float
from cmg.errors import CMGError
from cmg_bench.common import add_run_arguments, run_frames, start_local_server
from cmg_bench.loadgen import Window
from cmg_bench.memory import rss_bytes
from cmg_bench.modes import SERVED_CMG, Served
from cmg_clients.scorer import StreamSummary
from cmg_clients.sources import ArraySource
from cmg_clients.stream import StreamOptions, run_stream

DEFAULT_LOAD = 0.8
MIB = 1024 * 1024


# -- memory of the server and its stubs ---------------------------------------------------
def server_processes(server_pid: int) -> dict[str, int]:
    """{'tritonserver': pid, '<model> stub': pid, ...}: the server's process group (it runs
    in its own session, see cmg_build.server), stubs named by the model whose model.py they run."""
    found = {"tritonserver": server_pid}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == server_pid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                pgrp = int(fh.read().rsplit(")", 1)[1].split()[2])
            if pgrp != server_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        model_py = next((a for a in argv if a.endswith("model.py")), None)
        name = f"{Path(model_py).parent.parent.name} stub" if model_py else Path(argv[0]).name
        key, k = name, 2
        while key in found:  # several instances of one model
            key, k = f"{name} {k}", k + 1
        found[key] = int(entry)
    return found


class RssSampler:
    """Samples the RSS of every process of the server's group every `interval` seconds."""

    def __init__(self, server_pid: int, interval: float) -> None:
        self.server_pid, self.interval = server_pid, interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")
        self.t0 = time.perf_counter()

    def sample(self) -> dict:
        procs = server_processes(self.server_pid)
        rss = {name: rss_bytes(pid) for name, pid in procs.items()}
        row = {"t_s": time.perf_counter() - self.t0, "rss_mib": {k: v / MIB for k, v in rss.items() if v}}
        self.samples.append(row)
        return row

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RssSampler:
        self.t0 = time.perf_counter()
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.sample()


# -- latency per period ---------------------------------------------------------------------
def per_period(events: list[tuple[float, float | None]], period_s: float) -> list[dict]:
    """events (t since start, latency ms or None for an error line) -> one row per period."""
    if not events:
        return []
    last = int(max(t for t, _ in events) // period_s)
    rows = []
    for k in range(last + 1):
        lat = np.array([v for t, v in events if k * period_s <= t < (k + 1) * period_s and v is not None])
        errors = sum(1 for t, v in events if k * period_s <= t < (k + 1) * period_s and v is None)
        rows.append({"start_s": k * period_s, "frames": int(lat.size + errors), "errors": errors,
                     "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                     "p99_ms": float(np.percentile(lat, 99)) if lat.size else None})
    return rows


# -- the soak -------------------------------------------------------------------------------
def measure_capacity(url: str, frames: np.ndarray, concurrency: int, win: Window) -> dict:
    """Closed-loop throughput at batch 1 with `concurrency` requests in flight (frames/s)."""
    loop = asyncio.new_event_loop()
    try:
        mode = Served(SERVED_CMG, url, frames, loop)
        try:
            return mode.measure(concurrency, 1, win).to_dict()
        finally:
            mode.close()
    finally:
        loop.close()


def soak(run_dir: Path, out: Path, minutes: float, url: str | None = None, data: Path | None = None,
         load: float = DEFAULT_LOAD, window: int = 16, progress: bool = True) -> dict:
    """Stream for `minutes` at `load` x measured capacity; write soak.{json,md,png,jsonl}."""
    if not (minutes > 0 and np.isfinite(minutes)):
        raise CMGError(f"--minutes {minutes}: must be > 0")
    if not 0 < load <= 1:
        raise CMGError(f"--load {load}: expected a share of capacity in (0, 1]")
    run_dir, out = Path(run_dir), Path(out)
    _, frames, _ = run_frames(run_dir, out, data)

    started = time.time()
    server = None
    stopped: KeyboardInterrupt | None = None  # Ctrl-C / SIGTERM mid-stream: results so far are written, then raised
    try:
        if url is None:
            server = start_local_server(run_dir, out)
            url = server.grpc_url
        duration = minutes * 60.0
        short = duration < 120  # a smoke soak gets a short capacity measurement
        win = Window(warmup_s=0.5 if short else 2.0, window_s=2.0 if short else 10.0, min_requests=8)
        capacity = measure_capacity(url, frames, window, win)
        fps = load * capacity["throughput"]
        planned = max(1, int(round(fps * duration)))

        events: list[tuple[float, float | None]] = []
        t_start = [0.0]

        def on_line(line: dict) -> None:
            events.append((time.perf_counter() - t_start[0], line.get("latency_ms") if "error" not in line else None))

        sampler = RssSampler(server.pid, max(0.5, duration / 300)) if server is not None else None
        rss_start = sampler.start().samples[0] if sampler else None
        t_start[0] = time.perf_counter()
        opts = StreamOptions(url=url, source="memory", out=out / "soak.jsonl", overwrite=True, fps=fps,
                             window=window, progress=progress, on_line=on_line,
                             frames=ArraySource(frames, planned, label="soak"))
        summary = StreamSummary(out=str(opts.out))
        try:
            run_stream(opts, summary)
        except KeyboardInterrupt as exc:  # a long soak stopped near its end keeps its minutes and RSS samples
            stopped = exc  # (the stream filled `summary` on its way out: frames, fps, percentiles)
            summary.aborted = "interrupted"
        rss_end = sampler.stop() if sampler else None
    finally:
        if server is not None:
            server.cleanup()

    minutes_rows = per_period(events, 60.0)
    fine = per_period(events, max(1.0, duration / 60))
    result = {
        "minutes": minutes, "load": load, "window": window,
        "capacity": capacity, "target_fps": fps, "planned_frames": planned,
        "frames": summary.frames, "errors": summary.errors, "results": summary.results,
        "achieved_fps": summary.fps, "elapsed_s": summary.elapsed_s, "retries": summary.retries,
        "aborted": summary.aborted, "p50_ms": summary.p50_ms, "p99_ms": summary.p99_ms,
        "per_minute": minutes_rows, "per_period": fine,
        "rss_start_mib": rss_start["rss_mib"] if rss_start else None,
        "rss_end_mib": rss_end["rss_mib"] if rss_end else None,
        "rss_samples": sampler.samples if sampler else [],
        "server": {"url": url, "started_here": server is not None},
        "run": str(run_dir.resolve()), "stream": asdict(summary), "seconds": time.time() - started,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "soak.md")
    write_plot(result, out / "soak.png")
    if stopped is not None:
        raise stopped
    return result


def _mib(rss: dict | None, key: str) -> str:
    if not rss or key not in rss:
        return "-"
    return f"{rss[key]:.1f}"


def write_markdown(result: dict, path: Path) -> None:
    cap = result["capacity"]
    lines = [
        "# cmg bench soak", "",
        f"{result['minutes']:g} min at {result['load']:.0%} of the measured capacity "
        f"({cap['throughput']:.1f} frames/s closed loop at batch 1, {cap['concurrency']} in flight): "
        f"target {result['target_fps']:.1f} fps, achieved {result['achieved_fps']:.1f} fps.",
        f"Frames {result['frames']} of {result['planned_frames']}, errors {result['errors']}, retries "
        f"{result['retries']}" + (f", ABORTED: {result['aborted']}" if result["aborted"] else "") + ".",
        "", "| minute | frames | errors | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |",
    ]
    for row in result["per_minute"]:
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.1f}"
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}"
        lines.append(f"| {int(row['start_s'] // 60) + 1} | {row['frames']} | {row['errors']} | {p50} | {p99} |")
    start, end = result["rss_start_mib"], result["rss_end_mib"]
    if start:
        lines += ["", "| process | RSS start (MiB) | RSS end (MiB) |", "| --- | --- | --- |"]
        for name in sorted(set(start) | set(end or {})):
            lines.append(f"| {name} | {_mib(start, name)} | {_mib(end, name)} |")
    else:
        lines += ["", "Memory not measured: the server was not started here (--url)."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> Path:
    """RSS of tritonserver and each stub over time (top), p50/p99 latency per period (bottom)."""
    import matplotlib  # heavy: only the plot needs it, not the measurement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot starts on the file-only backend

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    samples = result["rss_samples"]
    names = sorted({k for s in samples for k in s["rss_mib"]})
    for name in names:
        pts = [(s["t_s"], s["rss_mib"][name]) for s in samples if name in s["rss_mib"]]
        ax1.plot([t / 60 for t, _ in pts], [v for _, v in pts], label=name)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_title(f"soak: {result['frames']} frames, {result['errors']} errors, "
                  f"{result['target_fps']:.0f} fps target")
    if names:
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "server not started here: no memory samples", ha="center", transform=ax1.transAxes)
    rows = [r for r in result["per_period"] if r["p50_ms"] is not None]
    x = [(r["start_s"]) / 60 for r in rows]
    ax2.plot(x, [r["p50_ms"] for r in rows], "o-", ms=3, label="p50")
    ax2.plot(x, [r["p99_ms"] for r in rows], "s--", ms=3, label="p99")
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("latency (ms)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "soak.json, soak.md, soak.png, soak.jsonl")
    parser.add_argument("--minutes", type=positive_float, required=True,
                        help="how long to stream at --load x measured capacity")
    parser.add_argument("--load", type=positive_float, default=DEFAULT_LOAD,
                        help=f"share of the measured capacity to stream at (default {DEFAULT_LOAD})")


def run(args: argparse.Namespace) -> int:
    res = soak(args.run, args.out, args.minutes, url=args.url, data=args.data, load=args.load)
    print(f"cmg bench soak: {res['frames']} frames, {res['errors']} errors at {res['achieved_fps']:.1f} fps "
          f"(target {res['target_fps']:.1f}, {res['load']:.0%} of {res['capacity']['throughput']:.1f}); "
          f"p50 {res['p50_ms'] or 0:.1f} ms, p99 {res['p99_ms'] or 0:.1f} ms; "
          f"wrote {args.out / 'soak.json'}, soak.md, soak.png")
    return 1 if res["errors"] or res["aborted"] else 0
