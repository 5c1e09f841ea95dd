"""`cmg infer`: score image files or folders on a running server; one JSON line per image.

A bad file gets an error line and the rest go on; the exit code says whether any failed,
so scripts can both read every answer and notice the failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cmg import contract as C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--url", default=None, help="HOST:PORT (default 127.0.0.1:8001, or :8000 with --http)")
    parser.add_argument("--http", action="store_true", help="use HTTP instead of gRPC")
    parser.add_argument("--model", default=C.CMG, choices=list(C.ENSEMBLES), help="ensemble to call")
    parser.add_argument("--batch", type=int, default=None, help="images per request (default: model's max batch)")
    parser.add_argument("--shm", action="store_true", help="send tensors through system shared memory")
    parser.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    parser.add_argument("--overlays", type=Path, default=None, help="write an overlay PNG per flagged image here")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")


def run(args: argparse.Namespace) -> int:
    from cmg.errors import CMGError
    from cmg.frames import FrameError
    from cmg_clients.client import CMGClient, iter_image_paths, results_from_arrays

    if args.batch is not None and args.batch < 1:
        raise CMGError(f"--batch must be >= 1, got {args.batch}")
    protocol = "http" if args.http else "grpc"
    url = args.url or f"127.0.0.1:{8000 if args.http else 8001}"
    paths = iter_image_paths(args.inputs)
    if not paths:
        raise CMGError(f"no images found in {' '.join(map(str, args.inputs))}")
    failed = 0
    with CMGClient(url, protocol, model=args.model, shm=args.shm, timeout_s=args.timeout) as client:
        step = min(args.batch or client.max_batch, client.max_batch)
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            lines: list[dict] = []
            good: list[tuple[int, object]] = []
            for i, p in enumerate(chunk):
                try:
                    good.append((i, client.frame(p)))
                    lines.append({})
                except (FrameError, OSError) as exc:
                    lines.append({"file": str(p), "error": str(exc)})
                    failed += 1
            if good:
                import numpy as np

                frames = np.stack([f for _, f in good])
                t0 = time.perf_counter()
                try:
                    arrays = client.infer_arrays(frames, args.threshold, batch_size=step)
                    results = results_from_arrays(arrays)
                    latency = (time.perf_counter() - t0) * 1000.0
                    for (i, frame), res in zip(good, results, strict=True):
                        line = {"file": str(chunk[i]), **res.to_json(), "latency_ms": round(latency, 3),
                                "batch": len(good)}
                        if args.overlays is not None and res.is_anomaly:
                            from cmg_clients.overlay import save_overlay

                            line["overlay"] = str(save_overlay(frame, res, _overlay_path(args.overlays, chunk[i])))
                        lines[i] = line
                except CMGError as exc:
                    if getattr(exc, "status", None) == "UNAVAILABLE" or "unreachable" in str(exc):
                        raise  # the server is gone: every remaining image would fail the same way
                    for i, _ in good:
                        lines[i] = {"file": str(chunk[i]), "error": str(exc)}
                        failed += 1
            for line in lines:
                print(json.dumps(line), flush=True)
    if failed:
        print(f"cmg infer: {failed} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _overlay_path(folder: Path, image: Path) -> Path:
    """Flat overlay name that stays unique for same-named files in different folders."""
    parts = [p for p in image.with_suffix("").parts if p not in ("/", "..", ".")][-3:]
    return folder / ("__".join(parts) + ".png")
