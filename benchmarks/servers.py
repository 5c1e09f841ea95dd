"""`cmg bench servers`: the same multi-camera load against 1 and against 2 local servers.

`cmg stream`'s own multi-server client sends SOURCES cameras x FRAMES frames (the run's
test frames, held in memory) as fast as each camera's window allows, once to one
tritonserver and once to two, in interleaved pairs (1, 2, 1, 2, ...) so drift on a shared
machine hits both alike. Reported: frames/s of each try, the median ratio two/one, and
per-server frame counts (servers.json, servers.md, servers.png).

On one small machine two servers share the same cores, so this measures what a second
server costs there (more processes, more context switches), not what it gains: a gain
needs servers on separate machines or GPUs (the Kubernetes manifests of `cmg build --k8s`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmg.errors import CMGError
from cmg_bench.common import add_run_arguments, run_frames
from cmg_build.repository import build
from cmg_build.server import TritonServer
from cmg_clients.sources import ArraySource
from cmg_clients.stream import StreamOptions, run_streams


def _one_try(urls: list[str], frames: np.ndarray, sources: int, per_source: int, window: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cmg-bench-servers-") as tmp:
        options = [StreamOptions(url=urls[0], source=f"cam{i}", out=Path(tmp) / f"cam{i}.jsonl", window=window,
                                 progress=False, frames=ArraySource(np.roll(frames, i, axis=0), per_source,
                                                                    label=f"cam{i}"))
                   for i in range(sources)]
        t0 = time.perf_counter()
        summaries, servers = run_streams(urls, options)
        elapsed = time.perf_counter() - t0
    errors = sum(s.errors for s in summaries)
    if errors or any(s.aborted for s in summaries):
        raise CMGError(f"bench stream to {urls} had {errors} error lines / aborted: "
                       + "; ".join(s.aborted or "" for s in summaries))
    frames_done = sum(s.frames for s in summaries)
    return {"servers": len(urls), "frames": frames_done, "seconds": elapsed, "fps": frames_done / elapsed,
            "p50_ms": float(np.median([s.p50_ms for s in summaries if s.p50_ms is not None])),
            "per_server": {u: v["frames"] for u, v in servers.items()}}


def compare_servers(run_dir: Path, out: Path, sources: int = 3, per_source: int = 200, repeats: int = 3,
                    window: int = 8, data: Path | None = None) -> dict:
    """Interleaved 1-server / 2-server tries of the same load; writes servers.{json,md,png}."""
    run_dir, out = Path(run_dir), Path(out)
    _, frames, _ = run_frames(run_dir, out, data)
    repo = out / "repository"
    build(run_dir, "cpu", repo)
    servers = [TritonServer(repo, log_file=out / f"tritonserver{i}.log") for i in range(2)]
    tries: list[dict] = []
    try:
        for server in servers:
            server.start()
        urls = [s.grpc_url for s in servers]
        _one_try(urls, frames, sources, min(per_source, 20), window)  # warm-up: both servers' first requests
        plan = [n for _ in range(repeats) for n in (1, 2)]
        for n in tqdm(plan, desc="cmg bench servers", unit="try"):
            tries.append(_one_try(urls[:n], frames, sources, per_source, window))
    finally:
        for server in servers:
            server.cleanup()
    one = [t["fps"] for t in tries if t["servers"] == 1]
    two = [t["fps"] for t in tries if t["servers"] == 2]
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    result = {"run": str(run_dir), "sources": sources, "frames_per_source": per_source, "window": window,
              "repeats": repeats, "tries": tries, "fps_one": float(np.median(one)), "fps_two": float(np.median(two)),
              "ratio_two_over_one": float(np.median(ratios)), "ratios": ratios,
              "note": "both servers share this machine's cores: the ratio shows the cost of a second server "
                      "here, not the gain of one on separate hardware"}
    (out / "servers.json").write_text(json.dumps(result, indent=2))
    (out / "servers.md").write_text(
        f"| servers | frames/s (median of {repeats}) | tries |\n|---|---|---|\n"
        f"| 1 | {result['fps_one']:.1f} | {', '.join(f'{x:.1f}' for x in one)} |\n"
        f"| 2 | {result['fps_two']:.1f} | {', '.join(f'{x:.1f}' for x in two)} |\n\n"
        f"two / one: {result['ratio_two_over_one']:.2f} (pairs {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"{sources} sources x {per_source} frames, window {window}. {result['note']}.\n")
    _plot(one, two, out / "servers.png")
    return result


def _plot(one: list[float], two: list[float], path: Path) -> None:
    import matplotlib  # heavy: only the plot needs it, not the measurement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot starts on the file-only backend

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar([0, 1], [float(np.median(one)), float(np.median(two))], color=["#4c72b0", "#dd8452"], alpha=0.7)
    for x, ys in ((0, one), (1, two)):
        ax.scatter([x] * len(ys), ys, color="k", s=12, zorder=3)
    ax.set_xticks([0, 1], ["1 server", "2 servers"])
    ax.set_ylabel("frames/s (all cameras)")
    ax.set_title("same load, same machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "servers.json, servers.md, servers.png", url=False)
    parser.add_argument("--quick", action="store_true", help="60 frames per camera and 2 pairs (default 200 and 3)")


def run(args: argparse.Namespace) -> int:
    res = compare_servers(args.run, args.out, per_source=60 if args.quick else 200,
                          repeats=2 if args.quick else 3, data=args.data)
    print(f"cmg bench servers: 1 server {res['fps_one']:.1f} frames/s, 2 servers {res['fps_two']:.1f} "
          f"(two/one {res['ratio_two_over_one']:.2f}); wrote {args.out / 'servers.json'}, servers.md, servers.png")
    return 0
