"""`cmg bench dashboard-cost`: what `cmg stream --dashboard` costs the stream.

The same frames (the run's test split, in memory) are streamed as fast as the window
allows, alternately without and with the dashboard, in interleaved pairs; with it, a
watcher plays the page's part (reads every server-sent snapshot and fetches each new
flagged thumbnail, as the browser does) and Triton's metrics are read every 2 s. Reported:
frames/s of each run and the with/without ratio per pair and its median (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cmg.argtypes import positive_int
from cmg.errors import CMGError
from cmg_bench.common import add_repeats_argument, add_run_arguments, run_frames, start_local_server
from cmg_clients.dashboard.app import Dashboard, default_metrics_url
from cmg_clients.dashboard.state import DashboardState
from cmg_clients.sources import ArraySource
from cmg_clients.stream import StreamOptions, run_stream

GOAL = 0.95


class PageWatcher(threading.Thread):
    """Reads /events like the page and fetches every new flagged frame's thumbnail."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="page-watcher")
        self.port = port
        self.snapshots = 0
        self.thumbs = 0
        self.seen: set[int] = set()
        self.connected = threading.Event()  # the page is open before the stream starts

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/events")
            resp = conn.getresponse()
            self.connected.set()
            while True:
                line = resp.fp.readline()
                if not line or line.startswith(b"event: end"):
                    return
                if not line.startswith(b"data: "):
                    continue
                self.snapshots += 1
                for cam in json.loads(line[6:])["cameras"]:
                    for item in cam["flagged"]:
                        if item["id"] not in self.seen:
                            self.seen.add(item["id"])
                            self._get(f"/frames/{item['id']}/thumb.png")
        except OSError:
            return
        finally:
            conn.close()

    def _get(self, path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            if conn.getresponse().read() and path.endswith(".png"):
                self.thumbs += 1
        finally:
            conn.close()


def _one(url: str, frames: np.ndarray, count: int, out: Path, window: int, metrics_url: str | None,
         dashboard: bool) -> dict:
    opts = StreamOptions(url=url, source="bench", out=out, overwrite=True, window=window, progress=False,
                         frames=ArraySource(frames, count, label="bench"))
    if not dashboard:
        return {"dashboard": False, **_summary(run_stream(opts))}
    with Dashboard(DashboardState([opts.source_name]), metrics_url=metrics_url, announce=False) as board:
        watcher = PageWatcher(board.port)
        watcher.start()
        watcher.connected.wait(10)
        opts.observer = board.state
        summary = run_stream(opts)
    watcher.join(timeout=5)
    return {"dashboard": True, **_summary(summary), "snapshots": watcher.snapshots, "thumbs": watcher.thumbs}


def _summary(summary) -> dict:
    s = asdict(summary)
    return {k: s[k] for k in ("frames", "errors", "elapsed_s", "fps", "p50_ms", "p99_ms")}


def dashboard_cost(run_dir: Path, out: Path, url: str | None = None, data: Path | None = None,
                   frames: int = 1000, repeats: int = 3, window: int = 16) -> dict:
    """Stream `frames` frames without and with the dashboard, `repeats` interleaved pairs."""
    if repeats < 1:
        raise CMGError(f"--repeats {repeats}: must be >= 1")
    if frames < 2 * window:  # fewer frames than two windows in flight: a start-up, not a throughput
        raise CMGError(f"--frames {frames}: at least {2 * window} (two windows of {window} frames in flight) "
                       "for a frame rate to compare")
    run_dir, out = Path(run_dir), Path(out)
    _, test_frames, _ = run_frames(run_dir, out, data)
    started = time.time()
    server = None
    try:
        if url is None:
            server = start_local_server(run_dir, out)
            url, metrics_url = server.grpc_url, server.metrics_url
        else:
            metrics_url = default_metrics_url(url)
        _one(url, test_frames, min(frames, 200), out / "warmup.jsonl", window, None, False)  # warm the server
        runs = []
        for r in range(repeats):  # alternate which goes first, so drift does not favour one side
            order = (False, True) if r % 2 == 0 else (True, False)
            pair = {d: _one(url, test_frames, frames, out / f"stream_{'with' if d else 'without'}.jsonl",
                            window, metrics_url, d) for d in order}
            runs.append({"without": pair[False], "with": pair[True],
                         "ratio": pair[True]["fps"] / pair[False]["fps"] if pair[False]["fps"] else None})
    finally:
        if server is not None:
            server.cleanup()
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
    result = {"frames": frames, "repeats": repeats, "window": window, "url": url, "metrics_url": metrics_url,
              "pairs": runs, "ratio_median": float(np.median(ratios)) if ratios else None, "goal": GOAL,
              "run": str(run_dir.resolve()), "seconds": time.time() - started}
    (out / "dashboard_cost.json").write_text(json.dumps(result, indent=2))
    lines = ["# cmg bench dashboard-cost", "",
             f"{frames} frames per run, window {window}, {repeats} interleaved pairs; with the dashboard a "
             "watcher reads every pushed snapshot and fetches each new flagged thumbnail.", "",
             "| pair | without: frames/s | with: frames/s | ratio | snapshots | thumbnails |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['without']['fps']:.1f} | {r['with']['fps']:.1f} | {r['ratio']:.3f} | "
                     f"{r['with']['snapshots']} | {r['with']['thumbs']} |")
    lines += ["", f"Median ratio with/without: **{result['ratio_median']:.3f}** (goal >= {GOAL})."]
    (out / "dashboard_cost.md").write_text("\n".join(lines) + "\n")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "dashboard_cost.json, dashboard_cost.md")
    parser.add_argument("--frames", type=positive_int, default=1000, help="frames per run (default 1000)")
    add_repeats_argument(parser, "3")


def run(args: argparse.Namespace) -> int:
    res = dashboard_cost(args.run, args.out, url=args.url, data=args.data, frames=args.frames,
                         repeats=args.repeats or 3)
    pairs = ", ".join(f"{r['ratio']:.3f}" for r in res["pairs"])
    print(f"cmg bench dashboard-cost: stream with/without the dashboard, median ratio "
          f"{res['ratio_median']:.3f} (pairs {pairs}; goal >= {res['goal']}); wrote "
          f"{args.out / 'dashboard_cost.json'}, dashboard_cost.md")
    return 0
