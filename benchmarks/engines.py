"""`cmg bench engines`: a tensorrt-target repository's engine chain timed without Triton
(build/engine_runner.py: buffers once, one stream), plain enqueues vs CUDA graphs, in one run
(engines.json). Needs TensorRT 10 and a GPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cmg.errors import CMGError
from cmg_bench.common import add_out_argument, parse_ints
from cmg_build.engine_runner import open_repository
from cmg_build.tensorrt import missing_prerequisites


def bench_engines(repo: Path, out: Path, batches: tuple[int, ...], iterations: int = 200) -> int:
    """The engine chain alone, plain enqueues vs CUDA graphs, in one run (engines.json)."""
    missing = missing_prerequisites()
    if missing:
        raise CMGError(f"cmg bench engines needs TensorRT and a GPU: {missing}")
    result: dict = {"repository": str(Path(repo).resolve()), "modes": {}}
    for label, graphs in (("enqueue", False), ("cuda_graphs", True)):
        with open_repository(repo, cuda_graphs=graphs) as chain:
            result["modes"][label] = chain.time(batches, iterations=iterations)
    result["ratios"] = {f"cuda_graphs_vs_enqueue_b{a['batch']}": a["p50_ms"] / b["p50_ms"]
                        for a, b in zip(result["modes"]["enqueue"], result["modes"]["cuda_graphs"], strict=True)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps(result, indent=2))
    for label, rows in result["modes"].items():
        for r in rows:
            print(f"{label} b{r['batch']}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
                  f"{r['frames_per_s']:.0f} frames/s")
    print(f"cmg bench engines: wrote {out / 'engines.json'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True, metavar="REPO",
                        help="a repository built with `cmg build --target tensorrt`")
    add_out_argument(parser, "engines.json")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")


def run(args: argparse.Namespace) -> int:
    return bench_engines(args.repository, args.out, parse_ints(args.batch))
