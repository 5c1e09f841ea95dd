"""`cmg bench fused-vs-ensemble`: the cpu target's fused `cmg` against the two-step ensemble it replaced.

Both repositories are built from the same run (`cmg build` default and `--cpu-cmg
ensemble`) and served at once by two tritonservers on this machine (the idle one costs
only its memory); the served `cmg` is measured over gRPC at a few (concurrency, batch)
points in interleaved pairs (ensemble, fused, then fused, ensemble, ...) so drift on a
shared machine hits both. Reported per point: median fused/ensemble ratios of frames/s,
p50 and p99 (cpu_cmg.json, cpu_cmg.md, cpu_cmg.png). This is the before/after measurement
behind making the fused graph the cpu target's default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmg_bench.common import (
    FULL_WINDOW,
    QUICK_WINDOW,
    add_repeats_argument,
    add_run_arguments,
    close_all,
    run_frames,
    start_local_server,
)
from cmg_bench.loadgen import Window
from cmg_bench.modes import SERVED_CMG, Served

POINTS = ((1, 1), (8, 1), (4, 8))
VARIANTS = ("ensemble", "fused")


def compare_cpu_cmg(run_dir: Path, out: Path, points: tuple[tuple[int, int], ...] = POINTS, repeats: int = 5,
                    window: Window | None = None, data: Path | None = None) -> dict:
    """Interleaved fused/ensemble pairs per point; writes cpu_cmg.{json,md,png}."""
    run_dir, out, window = Path(run_dir), Path(out), window or Window()
    _, frames, _ = run_frames(run_dir, out, data)
    servers: dict = {}
    loop = asyncio.new_event_loop()
    modes: dict = {}
    rows = []
    try:
        for variant in VARIANTS:
            servers[variant] = start_local_server(run_dir, out, cpu_cmg=variant)
        modes = {v: Served(SERVED_CMG, s.grpc_url, frames, loop) for v, s in servers.items()}
        bar = tqdm(total=len(points) * repeats, desc="cmg bench fused-vs-ensemble", unit="pair")
        for conc, batch in points:
            pairs = []
            for k in range(repeats):
                order = VARIANTS if k % 2 == 0 else VARIANTS[::-1]
                got = {v: modes[v].measure(conc, batch, window) for v in order}
                f, e = got["fused"], got["ensemble"]
                pairs.append({"ensemble_fps": e.throughput, "fused_fps": f.throughput,
                              "throughput": f.throughput / e.throughput, "p50": f.p50_ms / e.p50_ms,
                              "p99": f.p99_ms / e.p99_ms})
                bar.update(1)
            rows.append({"concurrency": conc, "batch": batch, "pairs": pairs,
                         **{f"{m}_median": float(np.median([p[m] for p in pairs]))
                            for m in ("throughput", "p50", "p99", "ensemble_fps", "fused_fps")}})
        bar.close()
    finally:
        close_all(modes.values(), loop, servers.values())
    result = {"run": str(run_dir), "repeats": repeats, "window_s": window.window_s, "points": rows,
              "note": "fused / ensemble: > 1 for frames/s and < 1 for latency favour the fused cmg"}
    (out / "cpu_cmg.json").write_text(json.dumps(result, indent=2))
    lines = ["| c | b | ensemble frames/s | fused frames/s | fused/ensemble frames/s (pairs) | p50 | p99 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pairs = ", ".join(f"{p['throughput']:.2f}" for p in r["pairs"])
        lines.append(f"| {r['concurrency']} | {r['batch']} | {r['ensemble_fps_median']:.1f} | "
                     f"{r['fused_fps_median']:.1f} | **{r['throughput_median']:.2f}** ({pairs}) | "
                     f"{r['p50_median']:.2f} | {r['p99_median']:.2f} |")
    (out / "cpu_cmg.md").write_text("\n".join(lines) + f"\n\nMedians of {repeats} interleaved pairs. "
                                    f"{result['note']}.\n")
    _plot(rows, out / "cpu_cmg.png")
    return result


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # heavy: only the plot needs it, not the measurement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot starts on the file-only backend

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    x = np.arange(len(rows))
    for dx, variant, color in ((-0.2, "ensemble", "#4c72b0"), (0.2, "fused", "#dd8452")):
        ax.bar(x + dx, [r[f"{variant}_fps_median"] for r in rows], 0.4, color=color, alpha=0.7, label=variant)
        for i, r in enumerate(rows):
            ax.scatter([i + dx] * len(r["pairs"]), [p[f"{variant}_fps"] for p in r["pairs"]], color="k", s=8, zorder=3)
    ax.set_xticks(x, [f"c{r['concurrency']} b{r['batch']}" for r in rows])
    ax.set_ylabel("served cmg frames/s")
    ax.set_title("cpu target: fused cmg vs two-step ensemble")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "cpu_cmg.json, cpu_cmg.md, cpu_cmg.png", url=False)
    parser.add_argument("--quick", action="store_true", help="short windows and 2 pairs (default 5)")
    add_repeats_argument(parser, "5, or 2 with --quick")


def run(args: argparse.Namespace) -> int:
    res = compare_cpu_cmg(args.run, args.out, repeats=args.repeats or (2 if args.quick else 5),
                          window=QUICK_WINDOW if args.quick else FULL_WINDOW, data=args.data)
    ratios = ", ".join(f"c{r['concurrency']} b{r['batch']} {r['throughput_median']:.2f}" for r in res["points"])
    print(f"cmg bench fused-vs-ensemble: fused/ensemble frames/s {ratios}; wrote {args.out / 'cpu_cmg.json'}, "
          "cpu_cmg.md, cpu_cmg.png")
    return 0
