"""`cmg demo`: the whole chain on the embedded default, as a user would run it.

synth data -> train -> export ONNX -> build the cpu repository -> start the real
tritonserver -> stream the test split over gRPC -> AUROC from the streamed scores and
latency percentiles. Every stage's output stays in WORKDIR for a closer look.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cmg.argtypes import seed_int
from cmg.config import Config, load_config, resolve_config
from cmg.dataset import SYNTH_INCOMPLETE
from cmg.errors import CMGError
from cmg_build.repository import build
from cmg_build.server import TritonServer
from cmg_clients.stream import StreamOptions, run_stream
from cmg_data.synth import synthesize
from cmg_train.checkpoint import load_run, run_mismatch
from cmg_train.export import export_run
from cmg_train.plots import roc_plot
from cmg_train.teacher.model import teacher_weights
from cmg_train.train import train_run


def _stage(name: str) -> float:
    print(f"== {name}", flush=True)
    return time.perf_counter()


def demo_config(config: str, seed: int | None = None) -> Config:
    """The config the demo trains: `seed` (the data's and the training's) when given, else the
    config's own (a YAML with `seed: 7` had trained with the flag's default, 0)."""
    cfg = load_config(resolve_config(config))
    if seed is not None:
        cfg.seed = seed
    if cfg.teacher.source == "open_clip":  # as `cmg train` checks, before the data is made
        if not (cfg.teacher.checkpoint or cfg.teacher.pretrained):
            raise CMGError(f"config {config}: its open_clip teacher {cfg.teacher.arch} needs weights: set "
                           "teacher.checkpoint FILE (a local open_clip checkpoint) or teacher.pretrained TAG in "
                           "a copy of the config (`cmg demo` has no --teacher-weights)")
        teacher_weights(cfg.teacher)
    return cfg


def demo(workdir: Path, config: str = "tiny", seed: int | None = None, fresh: bool = False,
         progress: bool = True) -> dict:
    cfg = demo_config(config, seed)
    seed = cfg.seed
    workdir.mkdir(parents=True, exist_ok=True)
    data, run, repo = workdir / "data", workdir / "run", workdir / "repo"
    timings: dict[str, float] = {}
    for old in (workdir / "demo_report.json", workdir / "demo_roc.png"):  # an interrupted demo leaves no report
        old.unlink(missing_ok=True)  # that describes an earlier run beside this run's stream.jsonl

    t = _stage(f"synthesize {cfg.data.preset} data -> {data}")
    made = json.loads((data / "synth.json").read_text()) if (data / "synth.json").is_file() else None
    wanted = {"preset": cfg.data.preset, "seed": seed, "category": cfg.data.category}
    new_data = (fresh or made is None or (data / SYNTH_INCOMPLETE).exists()  # a synth killed just before its end
                or any(made.get(k) != v for k, v in wanted.items()))
    if new_data:
        synthesize(data, preset=cfg.data.preset, seed=seed, category=cfg.data.category, progress=progress)
    else:
        print(f"   reusing {data} (--fresh makes it again)")
    timings["synth_s"] = time.perf_counter() - t

    t = _stage(f"train ({config}) -> {run}")
    reuse = (run / "checkpoint.pt").is_file() and not new_data  # a workdir may move: its data is checked above
    why = None
    if reuse:
        try:
            why = run_mismatch(load_run(run), cfg, None)
        except CMGError as exc:  # a run this version cannot read (an older checkpoint): the demo's own to redo
            why = str(exc)
    if reuse and why is None:
        print(f"   reusing {run} (--fresh trains again)")
    else:
        if why is not None:
            print(f"   {why}: training again")
        train_run(cfg, data, run, progress=progress)
    timings["train_s"] = time.perf_counter() - t

    t = _stage(f"export ONNX -> {run / 'onnx'}")
    export = export_run(run)
    timings["export_s"] = time.perf_counter() - t

    t = _stage(f"build cpu repository -> {repo}")
    build(run, "cpu", repo)
    timings["build_s"] = time.perf_counter() - t

    t = _stage("serve: tritonserver on free loopback ports")
    out = workdir / "stream.jsonl"
    with TritonServer(repo, log_file=workdir / "tritonserver.log") as server:
        server.start()
        print(f"   gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}")
        timings["serve_s"] = time.perf_counter() - t
        t = _stage(f"stream the test split over gRPC -> {out}")
        summary = run_stream(StreamOptions(url=server.grpc_url, source=str(data / "test"), out=out,
                                           overwrite=True, progress=progress))
        timings["stream_s"] = time.perf_counter() - t
    if summary.aborted:

        raise CMGError(f"stream aborted: {summary.aborted}")

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [r for r in lines if "error" not in r]
    labels = np.array([0 if Path(r["frame_id"]).parts[0] == "good" else 1 for r in ok])
    scores = np.array([r["score"] for r in ok])
    flagged = np.array([r["is_anomaly"] for r in ok])
    auroc = float(roc_auc_score(labels, scores))
    tpr, fpr = float(flagged[labels == 1].mean()), float(flagged[labels == 0].mean())
    roc = roc_plot(labels, {"cmg (served)": scores}, workdir / "demo_roc.png", "streamed test split",
                   point=(fpr, tpr, "served IS_ANOMALY"))
    report = {
        "frames": len(lines),
        "errors": len(lines) - len(ok),
        "image_auroc": auroc,
        "true_positive_rate": tpr,
        "false_positive_rate": fpr,
        "latency_p50_ms": summary.p50_ms,
        "latency_p99_ms": summary.p99_ms,
        "fps": summary.fps,
        "export_parity": {k: v for k, v in export["parity"].items()},
        "timings": timings,
        "outputs": {"data": str(data), "run": str(run), "repository": str(repo), "stream": str(out),
                    "roc_png": str(roc), "eval_hint": f"cmg eval --run {run} --ablation"},
    }
    (workdir / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(f"== result: {len(ok)} frames scored over gRPC, image AUROC {auroc:.3f}, "
          f"TPR {report['true_positive_rate']:.2f} at FPR {report['false_positive_rate']:.2f}, "
          f"latency p50 {summary.p50_ms:.1f} ms p99 {summary.p99_ms:.1f} ms, {summary.fps:.1f} fps")
    print(f"   report {workdir / 'demo_report.json'}, ROC {roc}, per-frame lines {out}")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("out/demo"), help="where every stage writes")
    p.add_argument("--config", default="tiny", help="tiny (default, sized for CI) or small")
    p.add_argument("--seed", type=seed_int, default=None, help="data and training seed (default: the config's)")
    p.add_argument("--fresh", action="store_true", help="redo data and training even if present")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:

    if args.workdir.exists() and not args.workdir.is_dir():
        raise CMGError(f"--workdir {args.workdir} is a file, not a folder")
    demo(args.workdir, args.config, args.seed, args.fresh, progress=not args.no_progress)
    return 0
