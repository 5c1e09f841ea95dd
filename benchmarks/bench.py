"""`cmg bench SUB-VERB`: each measurement is its own sub-verb with its own options.

A sub-verb is a module with `add_arguments(parser)` and `run(args) -> int`, listed in
SUBVERBS; adding one is one line here. Only the chosen sub-verb's module is imported to
run; every one is imported to list its options (their heavy dependencies are imported
inside functions), except one whose third-party dependency is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cmg.errors import CMGError
from cmg.locks import writing

# sub-verb -> (module, one-line help)
SUBVERBS: dict[str, tuple[str, str]] = {
    "sweep": ("cmg_bench.sweep", "latency/throughput/accuracy of the five modes, ratios, FLOPs, PNGs (bench.*)"),
    "soak": ("cmg_bench.soak", "stream at a share of measured capacity for MINUTES: errors, p50/p99 per minute, "
             "RSS of tritonserver and its stubs (soak.*)"),
    "servers": ("cmg_bench.servers", "the same multi-camera stream against 1 and 2 local servers, interleaved "
                "(servers.*; on one machine: the cost of a second server, not a gain)"),
    "engines": ("cmg_bench.engines", "a tensorrt repository's engine chain without Triton, CUDA graphs on and off "
                "(engines.json; needs TensorRT 10 and a GPU)"),
    "fused-vs-ensemble": ("cmg_bench.cpu_cmg", "served `cmg` as the cpu target's fused graph against the two-step "
                          "ensemble, interleaved pairs (cpu_cmg.*)"),
    "dashboard-cost": ("cmg_bench.dashboard_cost", "stream frames/s without and with `cmg stream --dashboard`, "
                       "interleaved pairs (dashboard_cost.*)"),
    "peer": ("cmg_bench.peer", "CMG side by side with anomalib's PatchCore and PaDiM on the same folder and "
             "backbone weights (the `peer` extra; bench.json, peer.md, peer.png)"),
    "shots": ("cmg_bench.shots", "AUROC against the number of normal training images: a config trained on N "
              "drawn images, several N and seeds (shots.json, shots.md, shots.png)"),
    "tradeoff": ("cmg_bench.tradeoff", "image AUROC against served frames/s, one point per config: each trained "
                 "on the same folder and seeds, served side by side (tradeoff.json, tradeoff.md, tradeoff.png)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_verb", required=True, metavar="SUB-VERB")
    for name, (module_name, help_line) in SUBVERBS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        p.set_defaults(_bench_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").startswith("cmg"):
                raise
            # A third-party dependency not installed here: the sub-verb says so when chosen.
            p.set_defaults(_bench_missing=f"{exc}; `cmg bench {name}` needs it installed")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        module.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    missing = getattr(args, "_bench_missing", None)
    if missing:
        print(f"cmg bench {args.bench_verb}: error: {missing}", file=sys.stderr)
        return 2
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():
        raise CMGError(f"--out {out} is a file, not a folder")
    if out is None:
        return int(importlib.import_module(args._bench_module).run(args) or 0)
    # One measurement per --out at a time: two had rebuilt each other's repositories under
    # running servers, each measured on a machine the other loaded, and one result was kept.
    with writing(out, refusal=f"--out {out} is being written by another `cmg bench` (pid {{pid}}, lock {{lock}}): "
                 "one measurement at a time (and two on one machine measure each other)"):
        return int(importlib.import_module(args._bench_module).run(args) or 0)
