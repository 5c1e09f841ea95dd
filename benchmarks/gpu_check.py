"""GPU checks run by benchmarks/gpu_check.sh (also usable on their own).

`torch`: the PyTorch path on a device (scorer graph + detector from RUN/checkpoint.pt,
moved to CUDA), timed at batch 1/8/32 with CUDA synchronisation; medians.
`trt`: the TensorRT engines of a `cmg build --target tensorrt` repository, run through
cmg_build.tensorrt.run_engine at batch 1/8/32; that call allocates device buffers and
copies inputs/outputs each time, so its latency includes transfers (stated in the output).
Results go to OUT/<check>.json; a failure exits non-zero with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 32)


def _stats(times_s: list[float], batch: int) -> dict:
    ms = np.array(times_s) * 1e3
    med = float(np.median(ms))
    return {"batch": batch, "iterations": len(ms), "median_ms": med, "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "throughput_fps": batch / med * 1e3}


def check_torch(run_dir: Path, device: str, iterations: int, warmup: int) -> dict:
    import torch

    from cmg_train.checkpoint import load_run

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__}: CUDA not available (torch.version.cuda={torch.version.cuda})")
    run = load_run(run_dir)
    scorer = run.scorer_graph().to(device)
    det = run.detector.to(device)
    c = run.contract
    threshold = det.threshold.detach().reshape(1, 1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        frames = torch.from_numpy(rng.integers(0, 256, (batch, c.height, c.width, 3), dtype=np.uint8)).to(device)
        thr = threshold.expand(batch, 1)
        times = []
        with torch.inference_mode():
            for i in range(warmup + iterations):
                sync()
                t = time.perf_counter()
                det(frames, scorer(frames), thr)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        rows.append(_stats(times, batch))
        print(f"torch {device} batch {batch}: median {rows[-1]['median_ms']:.3f} ms "
              f"({rows[-1]['throughput_fps']:.0f} frames/s)")
    info = {"device": device, "torch": torch.__version__, "what": "scorer_graph + detector, uint8 frames on device"}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return {**info, "results": rows}


def check_trt(repo: Path, iterations: int, warmup: int) -> dict:
    from cmg import contract as C
    from cmg.contract import CMER_SCORER, CMER_TEACHER, CMLE_ENCODER, Contract
    from cmg_build.tensorrt import run_engine

    report = json.loads((repo / "build_report.json").read_text())
    if report.get("engines_missing"):
        raise RuntimeError(f"{repo}: engines were not built: {report['engines_missing']}")
    c = Contract.from_dict(report["contract"])
    rng = np.random.default_rng(0)
    out: dict = {"tensorrt": next(iter(report.get("engines", {}).values()), {}).get("tensorrt"),
                 "what": "run_engine wall time per call, including device allocation and H2D/D2H copies",
                 "models": {}}
    for name in (CMER_SCORER, CMLE_ENCODER, CMER_TEACHER):
        plan = repo / name / "1" / "model.plan"
        if not plan.is_file():
            raise FileNotFoundError(f"engine {plan} not found")
        rows = []
        for batch in BATCHES:
            if batch > int(report["max_batch"]):
                continue
            feeds = {C.IMAGE: rng.integers(0, 256, (batch, c.height, c.width, 3), dtype=np.uint8)}
            if name == CMLE_ENCODER:
                feeds[C.PATCH_SCORES] = rng.random((batch, c.grid, c.grid), dtype=np.float32)
                feeds[C.THRESHOLD] = np.full((batch, 1), report["threshold"], np.float32)
            times = []
            for i in range(warmup + iterations):
                t = time.perf_counter()
                run_engine(plan, feeds)
                if i >= warmup:
                    times.append(time.perf_counter() - t)
            rows.append(_stats(times, batch))
            print(f"tensorrt {name} batch {batch}: median {rows[-1]['median_ms']:.3f} ms")
        out["models"][name] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=("torch", "trt"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run", type=Path, help="torch: trained run folder")
    p.add_argument("--repo", type=Path, help="trt: tensorrt-target repository")
    p.add_argument("--device", default="cuda", help="torch: device (cuda, cuda:1, cpu for a dry run)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.check == "torch":
            if args.run is None:
                raise ValueError("torch check needs --run")
            result = check_torch(args.run, args.device, args.iterations, args.warmup)
        else:
            if args.repo is None:
                raise ValueError("trt check needs --repo")
            result = check_trt(args.repo, args.iterations, args.warmup)
    except Exception as exc:  # noqa: BLE001 - one line for the shell script's step report
        print(f"gpu_check {args.check}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    path = args.out / f"{args.check}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"gpu_check {args.check}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
