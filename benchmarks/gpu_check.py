"""GPU checks run by benchmarks/gpu_check.sh (also usable on their own).

`torch`: the PyTorch path of the served one-pass graphs (scorer graph + detector from
RUN/checkpoint.pt) at batch 1/8/32: fp32, fp16 autocast and CUDA graphs
(torch.cuda.CUDAGraph, static input buffer, warm-up on a side stream before capture) on
the device, plus the fp32 CPU baseline in the same run; p50/p99 per call and frames/s.
`accuracy`: the same graphs' scores over a test folder (MVTec layout) at fp32 on the CPU (the
reference), fp32 and fp16 autocast on the device: AUROC of each, the largest score change,
and how many frames change side of the calibrated threshold (the `tensorrt` target builds
FP16 engines; the patch kNN's ab - |b|^2/2 is a difference of large numbers).
`trt`: the TensorRT engine chain of a `cmg build --target tensorrt` repository through
cmg_build.engine_runner (buffers once, one stream, plain enqueue and CUDA graphs).
Results go to OUT/<check>.json; a failure exits non-zero with the reason.
Works with torch 2.11 (the GPU machine's) and 2.14 (the project's pin).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cmg.errors import CMGError
from cmg_build.engine_runner import latency_stats, open_repository

BATCHES = (1, 8, 32)


def _stats(times_s: list[float], batch: int) -> dict:

    return latency_stats(times_s, batch)


def _time(fn: Callable, x, batch: int, iterations: int, warmup: int, sync: Callable[[], None]) -> dict:
    times = []
    for i in range(warmup + iterations):
        sync()
        t = time.perf_counter()
        fn(x)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return _stats(times, batch)


def capture_blockers(fn: Callable, example) -> list[str]:
    """What in one call of fn CUDA-graph capture would refuse, found on any device (a CPU run
    catches it before a lent GPU does): tensors made from host data (torch.tensor of Python
    numbers: a host-to-device copy on CUDA) and reads back to the host (.item(), nonzero: a
    sync). Each as 'op at file:line', the first frame of this project's code that called it."""
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    blocking = {torch.ops.aten.lift_fresh.default, torch.ops.aten.item.default,
                torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
    found: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in blocking:
                ours = [f for f in traceback.extract_stack() if "/cmg" in f.filename and "gpu_check" not in f.filename]
                where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
                found.append(f"{func} at {where}")
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Recorder():
        fn(example)
    return sorted(set(found))


def _cuda_graphed(fn: Callable, example):
    """fn captured as a CUDA graph over a static input buffer (replay copies the new frames in)."""
    import torch  # heavy: only the PyTorch check needs it (the trt check runs without)

    static = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: lazy allocations and cuDNN choices happen outside the capture
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)

    def replay(x):
        static.copy_(x)
        graph.replay()
        return out

    return replay


def served_pipeline(run, dev: str) -> Callable:
    """uint8 frames on `dev` -> the served one-pass graphs' output (scorer graph, then the
    detector at the run's calibrated threshold), as `cmg` serves them."""
    scorer = run.scorer_graph().to(dev).eval()
    det = run.detector.to(dev).eval()
    thr = det.threshold.detach().reshape(1, 1)
    return lambda x: det(x, scorer(x), thr.expand(x.shape[0], 1))


def check_torch(run_dir: Path, device: str, iterations: int, warmup: int,
                batches: tuple[int, ...] = BATCHES) -> dict:
    import torch  # heavy: only the PyTorch check needs it (the trt check runs without)

    from cmg_train.checkpoint import load_run  # torch: only the PyTorch check needs it

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__}: CUDA not available (torch.version.cuda={torch.version.cuda})")
    run = load_run(run_dir)
    c = run.contract
    rng = np.random.default_rng(0)
    result: dict = {"device": device, "torch": torch.__version__, "run": str(run_dir),
                    "what": "scorer_graph + detector (the one-pass served graphs), uint8 frames already on the device; "
                            "p50/p99 per call", "modes": {}, "skipped": {}}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)

    def frames(batch: int, dev: str):
        return torch.from_numpy(rng.integers(0, 256, (batch, c.height, c.width, 3), dtype=np.uint8)).to(dev)

    def sweep(label: str, dev: str, wrap: Callable | None = None, autocast: bool = False) -> None:
        fn = served_pipeline(run, dev)
        sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
        rows = []
        for batch in batches:
            x = frames(batch, dev)
            with torch.inference_mode(), torch.autocast(dev.split(":")[0], dtype=torch.float16, enabled=autocast):
                call = wrap(fn, x) if wrap else fn
                rows.append(_time(call, x, batch, iterations, warmup, sync))
            print(f"torch {label} batch {batch}: p50 {rows[-1]['p50_ms']:.3f} ms, p99 {rows[-1]['p99_ms']:.3f} ms "
                  f"({rows[-1]['frames_per_s']:.0f} frames/s)", flush=True)
        result["modes"][label] = rows

    result["capture_blockers"] = capture_blockers(served_pipeline(run, "cpu"), frames(1, "cpu"))
    sweep("cpu_fp32", "cpu")  # the baseline, same run
    if cuda:
        sweep("cuda_fp32", device)
        sweep("cuda_fp16_autocast", device, autocast=True)
        try:
            sweep("cuda_graphs_fp32", device, wrap=_cuda_graphed)
        except RuntimeError as exc:  # capture refused (an op that syncs): recorded, not fatal
            result["skipped"]["cuda_graphs_fp32"] = f"{type(exc).__name__}: {exc}"
    else:
        for label in ("cuda_fp32", "cuda_fp16_autocast", "cuda_graphs_fp32"):
            result["skipped"][label] = f"device {device} is not CUDA"
    base = {r["batch"]: r["frames_per_s"] for r in result["modes"]["cpu_fp32"]}
    result["ratios_vs_cpu_fp32"] = {f"{label}_b{r['batch']}": r["frames_per_s"] / base[r["batch"]]
                                    for label, rows in result["modes"].items() if label != "cpu_fp32" for r in rows}
    return result


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties at half): sklearn's roc_auc_score, for the
    GPU machine that does not have sklearn (tests/test_engine_runner.py checks the two agree)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not (n1 and n0):
        raise CMGError("the test split needs normal and anomalous images to measure AUROC")
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def check_accuracy(run_dir: Path, data: Path, device: str, batch: int = 16) -> dict:
    """Scores of the test split per precision against CPU fp32 (see the module docstring)."""
    import torch

    from cmg.dataset import MVTecFolder
    from cmg_train.checkpoint import load_run

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__}: CUDA not available")
    run = load_run(run_dir)
    # Frames and labels only, read as `cmg eval` reads them: the GPU machine has no sklearn,
    # scipy or matplotlib (what cmg_train.evaluate imports), and the carry has no room for them
    folder = MVTecFolder(data, need_train=False)  # gpu_prepare.sh carries test/ and ground_truth/ only
    samples = folder.samples("test")
    size = (run.contract.height, run.contract.width)
    test = SimpleNamespace(frames=torch.from_numpy(folder.frames(samples, size, progress=False)),
                           labels=np.array([s.label for s in samples]))
    result: dict = {"device": device, "run": str(run_dir), "data": str(data), "frames": len(test.labels),
                    "what": "scorer_graph + detector scores of the test split; changes against CPU fp32",
                    "modes": {}, "skipped": {}}

    def scores(dev: str, autocast: bool) -> np.ndarray:
        fn = served_pipeline(run, dev)
        out = []
        with torch.inference_mode(), torch.autocast(dev.split(":")[0], dtype=torch.float16, enabled=autocast):
            for i in range(0, len(test.frames), batch):
                out.append(fn(test.frames[i:i + batch].to(dev)).anomaly_score[:, 0].float().cpu())
        return torch.cat(out).numpy()

    ref = scores("cpu", False)
    threshold = float(run.detector.threshold)
    spread = float(np.std(ref[test.labels == 0])) or 1.0
    modes = {"cpu_fp32": ("cpu", False)}
    if cuda:
        modes |= {"cuda_fp32": (device, False), "cuda_fp16_autocast": (device, True)}
    else:
        result["skipped"] = {m: f"device {device} is not CUDA" for m in ("cuda_fp32", "cuda_fp16_autocast")}
    for label, (dev, autocast) in modes.items():
        s = ref if label == "cpu_fp32" else scores(dev, autocast)
        result["modes"][label] = {
            "auroc": rank_auroc(test.labels, s),
            "max_abs_change": float(np.abs(s - ref).max()),
            "max_change_in_normal_std": float(np.abs(s - ref).max() / spread),
            "flag_changes": int(((s > threshold) != (ref > threshold)).sum())}
        print(f"accuracy {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in result["modes"][label].items()), flush=True)
    return result


def check_trt(repo: Path, iterations: int, warmup: int, batches: tuple[int, ...] = BATCHES) -> dict:
    """The engine chain via the standalone runner: plain enqueues, then CUDA graphs."""

    out: dict = {"repository": str(repo), "what": "engine_runner: pinned host in/out, one stream, "
                 "scorer -> encoder on the device; p50/p99 per call", "modes": {}}
    for label, graphs in (("enqueue", False), ("cuda_graphs", True)):
        with open_repository(repo, cuda_graphs=graphs) as chain:
            out["modes"][label] = chain.time(batches, iterations=iterations, warmup=warmup)
        for r in out["modes"][label]:
            print(f"tensorrt {label} batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=("torch", "accuracy", "trt"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run", type=Path, help="torch: trained run folder")
    p.add_argument("--data", type=Path, help="accuracy: a folder with test/ (and ground_truth/)")
    p.add_argument("--repo", type=Path, help="trt: tensorrt-target repository")
    p.add_argument("--device", default="cuda", help="torch: device (cuda, cuda:1, cpu for a dry run)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    args = p.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.check == "torch":
            if args.run is None:
                raise ValueError("torch check needs --run")
            result = check_torch(args.run, args.device, args.iterations, args.warmup, batches)
        elif args.check == "accuracy":
            if args.run is None or args.data is None:
                raise ValueError("accuracy check needs --run and --data")
            result = check_accuracy(args.run, args.data, args.device)
        else:
            if args.repo is None:
                raise ValueError("trt check needs --repo")
            result = check_trt(args.repo, args.iterations, args.warmup, batches)
    except Exception as exc:  # noqa: BLE001 - one line for the shell script's step report
        print(f"gpu_check {args.check}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    path = args.out / f"{args.check}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"gpu_check {args.check}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
