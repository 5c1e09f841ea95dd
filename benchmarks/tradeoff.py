"""`cmg bench tradeoff`: image AUROC against served frames per second, one point per config,
so a user picks the config for a line's frame rate on the line's own data.

Why: the shipped configs trade accuracy for speed (`small` two backbones at 384 px,
`small-single` one, `small-fast` the frame as it comes), and figures measured on other
days or machines do not compare. Here every config is trained (or its run reused) on the
same folder with the same seeds and scored as `cmg eval` scores it (median and range over
seeds); then the first seed's run of every config is built for the cpu target and served
by its own real `tritonserver`, all at once, each swept over concurrency x batch like
`cmg bench sweep`, and finally re-measured at its best point in interleaved rounds (the
order alternates per round), so the frame-rate ratio against the first config is a median
of pairs measured side by side, not of numbers minutes apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmg.argtypes import positive_float, seed_list
from cmg.errors import CMGError
from cmg_bench import flops
from cmg_bench.common import (
    FULL_WINDOW,
    add_out_argument,
    close_all,
    finish_plot,
    measure_grid,
    run_frames,
    start_local_server,
)
from cmg_bench.modes import SERVED_CMG, Served
from cmg_bench.sweep import add_settings_arguments, fit_served_batches, settings_from_args
from cmg_bench.trained import train_and_score
from cmg_train.metrics import kinds_over_seeds, over_seeds, range_cell

DEFAULT_CONFIGS = "small,small-single,small-fast"


def config_list(text: str) -> tuple[str, ...]:
    """`--configs` 'small,small-fast' -> ('small', 'small-fast'): names under configs/ or YAML paths."""
    vals = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated config names, got {text!r}")
    return vals


def run_name(config: str) -> str:
    """A config's folder name under OUT/runs: its name, or a YAML path's stem."""
    return Path(config).stem if config.endswith((".yaml", ".yml")) else config


def accuracy(config: str, data: Path, out: Path, seeds: tuple[int, ...], progress: bool) -> list[dict]:
    """Every seed of one config trained (or reused from OUT/runs/NAME_sSEED) and scored."""
    return [{"config": config} | train_and_score(config, data, out / "runs" / f"{run_name(config)}_s{s}", s,
                                                  progress=progress)
            for s in seeds]


def graph_flops(run_dir: Path) -> float:
    """Multiply-adds x 2 per frame at batch 1 of what `cmg` serves: the scorer and the encoder."""
    from cmg.contract import CMER_SCORER, CMLE_ENCODER
    from cmg_bench.common import ensure_export

    onnx_dir, meta = ensure_export(run_dir)
    return float(sum(flops.count_file(onnx_dir / meta["models"][m]["file"])["flops"] for m in (CMER_SCORER, CMLE_ENCODER)))


def speed(configs: tuple[str, ...], run_dirs: dict[str, Path], data: Path, out: Path, settings,
          progress: bool) -> dict[str, dict]:
    """Every config served at once by its own tritonserver: the grid, then interleaved rounds at
    each config's best point (ratios against the first config, one per round)."""
    from sklearn.metrics import roc_auc_score

    loop = asyncio.new_event_loop()
    servers, modes, labels = [], {}, {}
    try:
        for name in configs:
            bench_dir = out / "bench" / run_name(name)
            _, frames, labels[name] = run_frames(run_dirs[name], bench_dir, data)
            servers.append(start_local_server(run_dirs[name], bench_dir))
            modes[name] = Served(SERVED_CMG, servers[-1].grpc_url, frames, loop)
        settings = fit_served_batches(settings, modes)  # the smallest max_batch_size of them
        points_total = len(modes) * (len(settings.concurrency) * len(settings.batch) + settings.repeats)
        bar = tqdm(total=points_total, desc="cmg bench tradeoff", unit="point", disable=not progress)
        result: dict[str, dict] = {}
        for name, mode in modes.items():
            served_auroc = float(roc_auc_score(labels[name], mode.scores(mode.frames)))
            pts = measure_grid(name, mode, settings, bar)
            best = max(pts, key=lambda p: p["throughput"])
            single = next((p for p in pts if p["concurrency"] == 1 and p["batch"] == 1), None)
            result[name] = {"points": pts, "served_auroc": served_auroc, "flops_per_frame": graph_flops(run_dirs[name]),
                            "best": {k: best[k] for k in ("concurrency", "batch", "throughput")},
                            "batch1_p50_ms": None if single is None else single["p50_ms"], "rounds": [],
                            "url": mode.url}
        for r in range(settings.repeats):
            for name in (configs if r % 2 == 0 else configs[::-1]):
                b = result[name]["best"]
                bar.set_postfix_str(f"round {r + 1} {name}")
                result[name]["rounds"].append(modes[name].measure(b["concurrency"], b["batch"], settings.window).throughput)
                bar.update(1)
        bar.close()
    finally:
        close_all(modes.values(), loop, servers)
    base = result[configs[0]]["rounds"]
    for name in configs:
        rounds = result[name]["rounds"]
        result[name]["throughput"] = float(np.median(rounds))
        result[name]["vs_first"] = float(np.median([a / b for a, b in zip(rounds, base, strict=True)]))
    return result


def summarise(configs: tuple[str, ...], rows: list[dict], served: dict[str, dict]) -> list[dict]:
    """Per config, in the order given: medians and ranges over seeds, and the served speed."""
    out = []
    for name in configs:
        per = [r for r in rows if r["config"] == name]
        row: dict = {"config": name, "seeds": len(per)} | over_seeds(per, ("image_auroc", "pixel_auroc", "train_s"))
        row["per_defect"] = kinds_over_seeds(per)
        row |= {k: served[name][k] for k in ("throughput", "vs_first", "best", "batch1_p50_ms", "flops_per_frame",
                                             "served_auroc")}
        out.append(row)
    return out


def markdown(summary: list[dict], data: str, seeds: tuple[int, ...], target_fps: float | None) -> str:
    first = summary[0]["config"]
    lines = [f"On {data}: image and pixel AUROC, medians over seeds {','.join(map(str, seeds))} (range); served "
             f"frames/s of seed {seeds[0]}'s run (the cpu target, one tritonserver per config, best concurrency x "
             f"batch, median of the interleaved rounds); ratio: frames/s against `{first}` in the same rounds", "",
             "| config | image AUROC | pixel AUROC | served frames/s (c x b) | vs " + first + " | p50 ms at c1 b1 | "
             "MFLOP/frame | training s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        b = r["best"]
        p50 = "-" if r["batch1_p50_ms"] is None else f"{r['batch1_p50_ms']:.1f}"
        lines.append(f"| `{r['config']}` | {range_cell(r, 'image_auroc')} | {range_cell(r, 'pixel_auroc')} | "
                     f"{r['throughput']:.1f} (c{b['concurrency']} x b{b['batch']}) | {r['vs_first']:.2f}x | {p50} | "
                     f"{r['flops_per_frame'] / 1e6:,.0f} | {range_cell(r, 'train_s', 0)} |")
    if target_fps:
        met = [r["config"] for r in summary if r["throughput"] >= target_fps]
        lines += ["", f"At {target_fps:g} frames/s or more: {', '.join(f'`{m}`' for m in met) if met else 'none'}."]
    kinds = list(summary[0]["per_defect"])
    lines += ["", "Image AUROC per kind (medians over seeds):", "",
              "| config | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    lines += [f"| `{r['config']}` | " + " | ".join(f"{r['per_defect'][k]:.3f}" for k in kinds) + " |" for r in summary]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str, target_fps: float | None) -> None:
    import matplotlib  # heavy: only the picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary:
        lo, hi = r["image_auroc_range"]
        ax.errorbar([r["throughput"]], [r["image_auroc"]], yerr=[[r["image_auroc"] - lo], [hi - r["image_auroc"]]],
                    marker="o", capsize=3, label=r["config"])
        ax.annotate(r["config"], (r["throughput"], r["image_auroc"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    if target_fps:
        ax.axvline(target_fps, color="grey", linestyle="--", linewidth=1, label=f"{target_fps:g} frames/s")
    ax.set_xscale("log")
    finish_plot(fig, ax, path, "served frames/s (cpu target, best concurrency x batch; log scale)",
                "image AUROC (median, range over seeds)", title, "lower left")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="MVTec-style folder (train/good, test/, captions.jsonl)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, type=config_list,
                   help="configs to compare, comma-separated (shipped configs' names or YAML paths); the first is "
                        "the one the frame-rate ratios are against (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", type=seed_list,
                   help="training seeds, comma-separated; the first one's run is served (default %(default)s)")
    p.add_argument("--target-fps", type=positive_float, default=None,
                   help="a line's frame rate: drawn on the plot, and the table says which configs reach it")
    add_settings_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    add_out_argument(p, "the runs, bench/ (repositories, server logs), tradeoff.json, tradeoff.md and tradeoff.png")
    # The sweep's reduced grid (concurrency 1,4; batch 1,8) with its full 1 s warm-up and 3 s
    # window: `small` answers about 5 frames in the quick 0.8 s window, too few to rank.
    p.set_defaults(quick=True, window=FULL_WINDOW.window_s, warmup=FULL_WINDOW.warmup_s)


def run(args: argparse.Namespace) -> int:
    if not (args.data / "train" / "good").is_dir():
        raise CMGError(f"--data {args.data}: no train/good folder")
    from cmg.config import load_config, resolve_config

    for name in args.configs:  # a misspelt config fails now, not after the others trained
        load_config(resolve_config(name))
    names = [run_name(c) for c in args.configs]
    if len(set(names)) < len(names):
        raise CMGError(f"--configs {','.join(args.configs)}: two of them would share a run folder ({names})")
    settings = settings_from_args(args)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tqdm(args.configs, desc="configs", unit="config", disable=args.no_progress):
        rows += accuracy(name, args.data, args.out, args.seeds, progress=not args.no_progress)
    run_dirs = {name: args.out / "runs" / f"{run_name(name)}_s{args.seeds[0]}" for name in args.configs}
    served = speed(args.configs, run_dirs, args.data, args.out, settings, progress=not args.no_progress)
    summary = summarise(args.configs, rows, served)
    (args.out / "tradeoff.json").write_text(json.dumps(
        {"data": str(args.data.resolve()), "configs": list(args.configs), "seeds": list(args.seeds),
         "settings": {"concurrency": list(settings.concurrency), "batch": list(settings.batch),
                      "repeats": settings.repeats},
         "rows": rows, "served": served, "summary": summary, "seconds": time.time() - started}, indent=2))
    table = markdown(summary, str(args.data), args.seeds, args.target_fps)
    (args.out / "tradeoff.md").write_text(table)
    plot(summary, args.out / "tradeoff.png", f"{args.data.resolve().name}: image AUROC against served frames/s",
         args.target_fps)
    print(table, end="")
    return 0
