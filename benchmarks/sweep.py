"""`cmg bench sweep`: latency/throughput/accuracy of the five modes, measured in one run.

Same frames (the test split), same weights (one run folder), one process: the served
ensembles over gRPC (one-pass `cmg` and P+1-pass `cmg_exact`), PyTorch eager in-process,
ONNX Runtime in-process on the fp32 graphs and on the int8 Q/DQ graphs of
`cmg build --precision int8`. Every mode runs with the intra-op thread count the built
cpu repository's config.pbtxt sets (recorded as bench.json "threads"). Achieved FLOP/s are
set against the CPU's theoretical float32 peak (flops.peak_gflops), with a measured ONNX
Runtime GEMM reported next to it. Speed ratios come from key points re-measured `repeats`
times with the two sides interleaved (A,B then B,A), so machine drift hits both sides;
medians are reported. Imports no torch at module import (only inside `run`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from cmg.argtypes import nonnegative_float, positive_float, positive_int
from cmg.contract import CMER_SCORER, CMER_TEACHER, CMG, CMLE_ENCODER, Contract
from cmg.dataset import resolve_data
from cmg.errors import CMGError
from cmg_bench import flops, report
from cmg_bench.common import (
    FULL_WINDOW,
    QUICK_WINDOW,
    add_run_arguments,
    check_run_folder,
    close_all,
    ensure_export,
    load_test_frames,
    measure_grid,
    memory_refusal,
    parse_ints,
)
from cmg_bench.loadgen import Window
from cmg_bench.modes import (
    MODES,
    ORT_INPROCESS,
    ORT_INT8,
    SERVED_CMG,
    SERVED_EXACT,
    TORCH_EAGER,
    OrtInProcess,
    Served,
    TorchEager,
    served_graphs,
)
from cmg_build.config import intra_op_threads
from cmg_build.repository import build
from cmg_build.server import TritonServer

FULL_CONCURRENCY = (1, 2, 4, 8, 16, 32)
FULL_BATCH = (1, 8, 32)
QUICK_CONCURRENCY = (1, 4)
QUICK_BATCH = (1, 8)
ORT_KEY_CONCURRENCY = 8  # Triton overhead is quoted at concurrency 8 (issue 6)

# Goals of issue 6 (docs/results.md, Performance): ratio name -> (comparison, value).
GOALS = {
    "onepass_vs_exact_throughput": (">=", 10.0),
    "served_vs_torch_eager_throughput": (">=", 1.5),
    "served_vs_ort_inprocess_throughput": (">=", 0.85),  # Triton overhead under 15%
    "int8_vs_fp32_throughput": (">=", 1.5),  # issue 13
}
MAX_AUROC_LOSS = 0.01  # one-pass vs exact: under 1 AUROC point
MAX_INT8_AUROC_DELTA = 0.01  # fp32 minus int8 image AUROC


@dataclass(frozen=True)
class Settings:
    """What a run sweeps and how long each point is measured."""

    concurrency: tuple[int, ...] = FULL_CONCURRENCY
    batch: tuple[int, ...] = FULL_BATCH
    window: Window = FULL_WINDOW
    repeats: int = 3
    exact_key: tuple[int, int] = (4, 8)  # (concurrency, batch) of the one-pass vs exact pair
    ort_key: tuple[int, int] = (ORT_KEY_CONCURRENCY, 1)
    single: tuple[int, int] = (1, 1)  # single-stream latency pairs

    @classmethod
    def quick(cls) -> Settings:
        return cls(QUICK_CONCURRENCY, QUICK_BATCH, QUICK_WINDOW)


def machine_info(peak: dict) -> dict:
    """Core count, CPU model, versions and the peak that bounds every mode (with its method)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("numpy", "onnxruntime", "torch", "tritonclient", "nvidia-pytriton"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": affinity, "cpu_model": model,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "peak_gflops": peak["gflops"], "peak_method": peak["method"], "peak": peak,
            "gpu": Path("/dev/nvidia0").exists()}


# ----------------------------------------------------------------------------- ratios


def _ratio_entry(name: str, a: dict, b: dict, metric: str, pairs: list[tuple[dict, dict]]) -> dict:
    vals = [{"a": pa[metric], "b": pb[metric], "ratio": pa[metric] / pb[metric]} for pa, pb in pairs]
    entry = {"median": float(np.median([v["ratio"] for v in vals])), "pairs": vals, "metric": metric,
             "a": a, "b": b}
    if name in GOALS:
        op, goal = GOALS[name]
        entry["goal"] = f"{op} {goal}"
        entry["met"] = bool(entry["median"] >= goal)
    return entry


def refused_point(mode, point: tuple[int, int], settings: Settings) -> str | None:
    """Why a ratio side may not run `point`: the grid's memory guard skipped it, or (a key point
    outside the grid) the guard would, or None. Measuring it anyway can get the whole sweep
    OOM-killed, which is what the guard is for."""
    conc, batch = point
    if conc in settings.concurrency and batch in settings.batch:
        return next((s["reason"] for s in getattr(mode, "skipped", [])
                     if (s["concurrency"], s["batch"]) == point), None)
    return memory_refusal(conc, mode.call_bytes(batch) if hasattr(mode, "call_bytes") else None, 0)


def measure_ratios(modes: dict, settings: Settings, best: dict[str, tuple[int, int]],
                   progress) -> tuple[dict, dict[str, str]]:
    """Key-point pairs re-measured `repeats` times, sides interleaved (ABBA); the pairs with
    a side the memory guard refuses are left out, with the reason (second return value)."""
    plan = {  # pair -> (side A (mode, point), side B)
        "onepass_vs_exact": ((SERVED_CMG, settings.exact_key), (SERVED_EXACT, settings.exact_key)),
        "served_vs_torch_eager_best": ((SERVED_CMG, best.get(SERVED_CMG, settings.single)),
                                       (TORCH_EAGER, best.get(TORCH_EAGER, settings.single))),
        "served_vs_torch_eager_single": ((SERVED_CMG, settings.single), (TORCH_EAGER, settings.single)),
        "served_vs_ort_inprocess": ((SERVED_CMG, settings.ort_key), (ORT_INPROCESS, settings.ort_key)),
        # int8 vs fp32: same graphs' runtime, same threads, at the batched key point (kernels dominate)
        "int8_vs_fp32": ((ORT_INT8, settings.exact_key), (ORT_INPROCESS, settings.exact_key)),
    }
    plan = {k: v for k, v in plan.items() if v[0][0] in modes and v[1][0] in modes}
    refused: dict[str, str] = {}
    for key, sides in list(plan.items()):
        why = next((f"{mode} c{point[0]} b{point[1]}: {reason}" for mode, point in sides
                    if (reason := refused_point(modes[mode], point, settings))), None)
        if why:
            refused[key] = why
            del plan[key]
            progress.write(f"cmg bench: ratio pair {key} not measured: {why}")
            progress.update(2 * settings.repeats)
    got: dict[str, list[tuple[dict, dict]]] = {k: [] for k in plan}
    for r in range(settings.repeats):
        for key, sides in plan.items():
            order = sides if r % 2 == 0 else sides[::-1]
            res = {}
            for mode, (conc, batch) in order:
                res[mode] = modes[mode].measure(conc, batch, settings.window).to_dict()
                progress.update(1)
            got[key].append((res[sides[0][0]], res[sides[1][0]]))

    def side(s):
        return {"mode": s[0], "concurrency": s[1][0], "batch": s[1][1]}

    ratios: dict[str, dict] = {}
    specs = [
        ("onepass_vs_exact_throughput", "onepass_vs_exact", "throughput"),
        ("onepass_vs_exact_p50_latency", "onepass_vs_exact", "p50_ms"),
        ("onepass_vs_exact_p99_latency", "onepass_vs_exact", "p99_ms"),
        ("served_vs_torch_eager_throughput", "served_vs_torch_eager_best", "throughput"),
        ("served_vs_torch_eager_p50_latency", "served_vs_torch_eager_single", "p50_ms"),
        ("served_vs_torch_eager_p99_latency", "served_vs_torch_eager_single", "p99_ms"),
        ("served_vs_ort_inprocess_throughput", "served_vs_ort_inprocess", "throughput"),
        ("served_vs_ort_inprocess_p50_latency", "served_vs_ort_inprocess", "p50_ms"),
        ("served_vs_ort_inprocess_p99_latency", "served_vs_ort_inprocess", "p99_ms"),
        ("int8_vs_fp32_throughput", "int8_vs_fp32", "throughput"),
    ]
    for name, key, metric in specs:
        if key in plan:
            a, b = plan[key]
            ratios[name] = _ratio_entry(name, side(a), side(b), metric, got[key])
    return ratios, refused


def fit_served_batches(settings: Settings, modes: dict) -> Settings:
    """Drop the client batches a served model refuses (above its max_batch_size), saying so:
    `small` serves at most 8 frames per request, the full sweep asks for 32 too."""
    limit = min((m.max_batch for m in modes.values() if isinstance(m, Served)), default=None)
    if limit is None or max(settings.batch) <= limit:
        return settings
    kept = tuple(b for b in settings.batch if b <= limit) or (limit,)
    print(f"cmg bench: client batch {max(settings.batch)} is above the served model's max_batch_size "
          f"{limit}; measuring batches {', '.join(map(str, kept))}")
    conc, batch = settings.exact_key
    return replace(settings, batch=kept, exact_key=(conc, min(batch, limit)))


def ratio_plan_size(settings: Settings, mode_names: list[str]) -> int:
    pairs = [("served_cmg", "served_cmg_exact"), ("served_cmg", "torch_eager"), ("served_cmg", "torch_eager"),
             ("served_cmg", "ort_inprocess"), ("ort_int8", "ort_inprocess")]
    return 2 * settings.repeats * sum(1 for a, b in pairs if a in mode_names and b in mode_names)


# ----------------------------------------------------------------------------- main


def bench(run_dir: Path, out: Path, settings: Settings, url: str | None = None, data: Path | None = None,
          modes_wanted: tuple[str, ...] | None = None, progress: bool = True) -> dict:
    """Measure every mode and write bench.json, bench.md and the PNGs into `out`."""
    started = time.time()
    run_dir = check_run_folder(run_dir)
    wanted = tuple(MODES if modes_wanted is None else modes_wanted)
    if not wanted:
        raise CMGError(f"--modes names no mode: expected some of {', '.join(MODES)}")
    unknown = sorted(set(wanted) - set(MODES))
    if unknown:
        raise CMGError(f"unknown mode(s) {unknown}: expected some of {', '.join(MODES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_dir, meta = ensure_export(run_dir)
    contract = Contract.from_dict(meta["contract"])
    data = resolve_data(run_dir, data)
    frames, labels = load_test_frames(data, contract.height, contract.width)
    # The inputs hold: an earlier sweep's results go now, so one stopped from here on does not
    # leave them looking current (and a mistyped --data did not cost them)
    for stale in [*out.glob("latency_throughput_*.png"), out / "ratios.png", out / "bench.json", out / "bench.md",
                  out / "readme_performance.md"]:
        stale.unlink(missing_ok=True)

    # The one source of thread counts: the built cpu repository (served here, or the same
    # build as the --url server's when it was built with the same settings on this machine).
    repo = out / "repository"
    t0 = time.perf_counter()
    build(run_dir, "cpu", repo)
    build_s = time.perf_counter() - t0
    repo_threads = {m: intra_op_threads(repo / m) for m in (CMER_SCORER, CMLE_ENCODER, CMER_TEACHER)}
    repo_int8 = out / "repository_int8"
    if ORT_INT8 in wanted:
        build(run_dir, "cpu", repo_int8, precision="int8")
    served = served_graphs(repo)  # what `cmg` runs on: the fused graph, or the two steps at once
    served_threads = repo_threads[CMG] = max(t for _, t in served)  # every cmg-like mode runs this count
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    peak = flops.peak_gflops(cores, threads=min(cores, sum(t for _, t in served)))
    files = {k: v["file"] for k, v in meta["models"].items()}
    per_model = {m: flops.count_file(onnx_dir / files[m]) for m in (CMER_SCORER, CMLE_ENCODER, CMER_TEACHER)}
    enc = per_model[CMLE_ENCODER]["flops"]
    mode_flops = {SERVED_CMG: per_model[CMER_SCORER]["flops"] + enc,
                  SERVED_EXACT: per_model[CMER_TEACHER]["flops"] + enc}
    # int8 does the same multiply-adds (counted on the fp32 graphs), in int8
    mode_flops[TORCH_EAGER] = mode_flops[ORT_INPROCESS] = mode_flops[ORT_INT8] = mode_flops[SERVED_CMG]

    server = None
    loop = asyncio.new_event_loop()
    modes: dict = {}
    try:
        served_url = url
        if url is None and any(m in wanted for m in (SERVED_CMG, SERVED_EXACT)):
            t0 = time.perf_counter()
            server = TritonServer(repo, log_file=out / "tritonserver.log").start()
            served_url = server.grpc_url
            build_s += time.perf_counter() - t0
        threads: dict[str, int] = {}
        for name in wanted:
            if name in (SERVED_CMG, SERVED_EXACT):
                modes[name] = Served(name, served_url, frames, loop)
                threads[name] = (served_threads if name == SERVED_CMG  # per graph session
                                 else max(repo_threads[CMER_TEACHER], repo_threads[CMLE_ENCODER]))
            elif name == TORCH_EAGER:
                modes[name] = TorchEager(run_dir, frames, served_threads)
                threads[name] = modes[name].threads
            else:
                modes[name] = OrtInProcess(repo if name == ORT_INPROCESS else repo_int8, frames, name)
                threads[name] = modes[name].threads

        settings = fit_served_batches(settings, modes)
        total = len(modes) * len(settings.concurrency) * len(settings.batch) + len(modes)
        total += ratio_plan_size(settings, list(modes))
        bar = tqdm(total=total, desc="cmg bench", unit="point", disable=not progress)
        results: list[dict] = []
        scores: dict[str, np.ndarray] = {}
        for name, mode in modes.items():
            bar.set_postfix_str(f"{name} accuracy")
            scores[name] = mode.scores(frames)
            bar.update(1)
            points = measure_grid(name, mode, settings, bar)
            best = max(points, key=lambda p: p["throughput"])
            results.append({"name": name, "auroc": float(roc_auc_score(labels, scores[name])),
                            "points": points, "skipped": mode.skipped, "flops_per_frame": mode_flops[name],
                            "best": {"concurrency": best["concurrency"], "batch": best["batch"],
                                     "throughput": best["throughput"]},
                            "achieved_gflops": best["throughput"] * mode_flops[name] / 1e9,
                            "fraction_of_peak": best["throughput"] * mode_flops[name] / 1e9
                            / (peak["int8_gops"] if name == ORT_INT8 else peak["gflops"]),
                            "fraction_of_measured_gemm": best["throughput"] * mode_flops[name] / 1e9
                            / peak["measured_gemm"]["gflops"]})
        best_pts = {r["name"]: (r["best"]["concurrency"], r["best"]["batch"]) for r in results}
        bar.set_postfix_str("ratios")
        ratios, ratios_refused = measure_ratios(modes, settings, best_pts, bar)
        bar.close()
    finally:
        close_all(modes.values(), loop, [server])

    parity = {}
    ref = scores.get(ORT_INPROCESS, scores.get(TORCH_EAGER))
    for name, s in scores.items():
        if ref is not None and name != SERVED_EXACT:
            parity[name] = float(np.abs(s - ref).max())
    auroc = {r["name"]: r["auroc"] for r in results}
    accuracy = {}
    if SERVED_CMG in auroc and SERVED_EXACT in auroc:
        loss = auroc[SERVED_EXACT] - auroc[SERVED_CMG]
        accuracy = {"onepass_auroc_loss_vs_exact": loss, "max_loss": MAX_AUROC_LOSS,
                    "met": bool(loss < MAX_AUROC_LOSS)}
    if ORT_INT8 in auroc and ORT_INPROCESS in auroc:
        delta = auroc[ORT_INPROCESS] - auroc[ORT_INT8]
        accuracy |= {"int8_auroc_delta": delta, "int8_max_delta": MAX_INT8_AUROC_DELTA,
                     "int8_met": bool(abs(delta) <= MAX_INT8_AUROC_DELTA)}
    result = {
        "machine": machine_info(peak),
        "modes": results,
        "ratios": ratios,
        "ratio_pairs_not_measured": ratios_refused,
        "flops": {"per_model": per_model, "per_mode": mode_flops, "counted_ops": list(flops.COUNTED_OPS),
                  "note": "MatMul/Gemm/Conv multiply-adds x2 per frame at batch 1 (ONNX shape inference)"},
        "accuracy": {"test_images": int(len(labels)), "anomalous": int(labels.sum()), **accuracy},
        "parity_max_abs_score_diff": {"reference": ORT_INPROCESS if ORT_INPROCESS in scores else TORCH_EAGER,
                                      "modes": parity},
        "settings": {"concurrency": list(settings.concurrency), "batch": list(settings.batch),
                     "window": asdict(settings.window), "repeats": settings.repeats,
                     "exact_key": list(settings.exact_key), "ort_key": list(settings.ort_key),
                     "single": list(settings.single), "repository_intra_op_threads": repo_threads},
        "threads": threads,
        "goals": {k: f"{op} {v}" for k, (op, v) in GOALS.items()} | {
            "onepass_auroc_loss_vs_exact": f"< {MAX_AUROC_LOSS}",
            "int8_auroc_delta": f"|delta| <= {MAX_INT8_AUROC_DELTA}"},
        "run": str(run_dir.resolve()), "data": str(Path(data).resolve()),
        "server": {"url": served_url, "started_here": url is None, "build_and_start_s": build_s,
                   "repository": str(repo)},
        "seconds": time.time() - started,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    report.write_markdown(result, out / "bench.md")
    report.write_readme_section(result, out / "readme_performance.md")  # docs/results.md's tables
    report.write_plots(result, out)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "bench.json, bench.md, PNGs")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sweep (concurrency 1,4; batch 1,8; short windows) for smoke checks")
    add_settings_arguments(parser)
    parser.add_argument("--modes", default=None, help="comma-separated subset of the modes (default all)")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's overrides, read by `settings_from_args` (with a `quick` attribute beside them)."""
    parser.add_argument("--concurrency", default=None, help="override: comma-separated concurrency levels")
    parser.add_argument("--batch", default=None, help="override: comma-separated client batch sizes")
    parser.add_argument("--window", type=positive_float, default=None, help="override: measurement window, s")
    parser.add_argument("--warmup", type=nonnegative_float, default=None, help="override: warm-up per point, s")
    parser.add_argument("--repeats", type=positive_int, default=None, help="override: repeats of the ratio pairs (>= 1)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings.quick() if args.quick else Settings()
    win = s.window
    if args.window is not None:  # finite: an infinite window never closed (the cap is past the window)
        win = replace(win, window_s=args.window)
    if args.warmup is not None:
        win = replace(win, warmup_s=args.warmup)
    s = replace(s, window=win)
    if args.concurrency:
        s = replace(s, concurrency=parse_ints(args.concurrency))
    if args.batch:
        s = replace(s, batch=parse_ints(args.batch))
    # Key points follow an overridden sweep (a smaller sweep gets cheaper key points).
    if args.concurrency or args.batch:
        conc = 4 if 4 in s.concurrency else max(s.concurrency)
        batch = 8 if 8 in s.batch else max(s.batch)
        s = replace(s, exact_key=(conc, batch))
    if args.repeats is not None:
        s = replace(s, repeats=args.repeats)
    return s


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    modes = None if args.modes is None else tuple(m.strip() for m in args.modes.split(",") if m.strip())
    result = bench(args.run, args.out, settings, url=args.url, data=args.data, modes_wanted=modes)
    print(f"cmg bench sweep: wrote {args.out / 'bench.json'}, {args.out / 'bench.md'} "
          f"({result['seconds']:.0f} s, {result['machine']['cpus_usable']} cores)")
    for name, r in result["ratios"].items():
        print(f"  {name}: median {r['median']:.3g}" + (f" (goal {r['goal']})" if "goal" in r else ""))
    return 0
