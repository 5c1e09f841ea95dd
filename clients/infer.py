"""`cmg infer`: score image files or folders on a running server; one JSON line per image.

A bad file (unreadable, truncated, not an image, empty, over the pixel limit) gets an
error line and the rest go on; the exit code says whether any failed, so scripts can
both read every answer and notice the failures. A server that does not answer at all
(unreachable, deadline) stops the run with one line and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from cmg import contract as C
from cmg.argtypes import positive_float, positive_int, threshold_float
from cmg.errors import CMGError
from cmg.frames import DEFAULT_MAX_PIXELS, FrameError
from cmg.locks import writing
from cmg_clients import core
from cmg_clients.client import CMGClient, InferError, iter_image_paths, results_from_arrays
from cmg_clients.overlay import check_overlay_dir, overlay_into


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--url", default=None,
                        help=f"HOST:PORT (default {core.default_url('grpc')}, or {core.default_url('http')} with --http)")
    parser.add_argument("--http", action="store_true", help="use HTTP instead of gRPC")
    parser.add_argument("--model", default=C.CMG, choices=list(C.ENSEMBLES), help="ensemble to call")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="images per request (default: model's max batch)")
    parser.add_argument("--shm", action="store_true", help="send tensors through system shared memory")
    parser.add_argument("--threshold", type=threshold_float, default=None, help="override the calibrated threshold")
    parser.add_argument("--overlays", type=Path, default=None, help="write an overlay PNG per flagged image here")
    parser.add_argument("--overlays-for", choices=("flagged", "all"), default="flagged",
                        help="with --overlays: the flagged images (default), or every image (a missed defect's "
                             "map is the one to look at)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of a request the server answered 'not now' (model reloading, busy); default 3")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse image files declaring more pixels (default {DEFAULT_MAX_PIXELS})")


def run(args: argparse.Namespace) -> int:

    if args.retries < 0:
        raise CMGError(f"--retries must be >= 0, got {args.retries}")
    check_overlay_dir(args.overlays)
    protocol = "http" if args.http else "grpc"
    url = args.url or core.default_url(protocol)
    paths = iter_image_paths(args.inputs)
    if not paths:
        raise CMGError(f"no images found in {' '.join(map(str, args.inputs))}")
    if args.overlays is None:
        return _infer(args, url, protocol, paths)
    # Two at once into one --overlays had left each line naming the other run's picture.
    with writing(args.overlays, refusal=f"--overlays {args.overlays} is being written by another `cmg infer` (pid "
                 "{pid}, lock {lock}): one at a time, or another --overlays folder"):
        return _infer(args, url, protocol, paths)


def _infer(args: argparse.Namespace, url: str, protocol: str, paths: list[Path]) -> int:
    failed = 0
    overlays = overlay_paths(args.overlays, paths) if args.overlays is not None else {}
    retry = core.RetryPolicy(max_retries=args.retries, backoff_s=0.2, backoff_max_s=2.0)
    with CMGClient(url, protocol, model=args.model, shm=args.shm, timeout_s=args.timeout, retry=retry,
                   max_pixels=args.max_pixels) as client:
        step = min(args.batch or client.max_batch, client.max_batch)
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            lines: list[dict] = []
            good: list[tuple[int, np.ndarray]] = []
            for i, p in enumerate(chunk):
                try:
                    good.append((i, client.frame(p)))
                    lines.append({})
                except Exception as exc:  # noqa: BLE001 - every image problem is this image's error line
                    lines.append({"file": str(p), "error": _frame_error(exc)})
                    failed += 1
            if good:
                frames = np.stack([f for _, f in good])
                t0 = time.perf_counter()
                try:
                    arrays = client.infer_arrays(frames, args.threshold, batch_size=step)
                except InferError as exc:
                    if exc.kind != core.PERMANENT:
                        raise  # not about these images: every further request would fail the same way
                    for i, _ in good:
                        lines[i] = {"file": str(chunk[i]), "error": str(exc)}
                        failed += 1
                else:
                    latency = (time.perf_counter() - t0) * 1000.0
                    for (i, frame), res in zip(good, results_from_arrays(arrays), strict=True):
                        line = {"file": str(chunk[i]), **res.to_json(), "latency_ms": round(latency, 3),
                                "batch": len(good)}
                        if args.overlays is not None and (res.is_anomaly or args.overlays_for == "all"):
                            failed += not overlay_into(line, frame, res, overlays[chunk[i]])
                        lines[i] = line
            for line in lines:
                print(json.dumps(line), flush=True)
    if failed:
        print(f"cmg infer: {failed} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _frame_error(exc: BaseException) -> str:

    return str(exc) if isinstance(exc, FrameError) else f"{type(exc).__name__}: {exc}"


def _within_name_limit(stem: str, limit: int = 255) -> str:
    """`stem`.png, cut to the file system's name limit (bytes) with a hash of the whole kept,
    so long folder names still give one distinct file each."""
    if len(stem.encode()) + 4 <= limit:
        return stem + ".png"
    digest = hashlib.sha1(stem.encode()).hexdigest()[:12]
    cut = stem.encode()[: limit - 4 - 13].decode(errors="ignore")
    return f"{cut}_{digest}.png"


def overlay_paths(folder: Path, images: list[Path]) -> dict[Path, Path]:
    """One flat overlay file per image: its last three path parts (`test__hole__000.png`),
    more of its folders where two images would share that name, and its extension where
    only that tells them apart (`a.png` and `a.jpg`)."""
    parts = {p: [x for x in p.resolve().parts if x != "/"] for p in images}
    depth = dict.fromkeys(images, 3)

    def name(p: Path, ext: bool = False) -> str:
        tail = parts[p][-depth[p]:]
        stem = Path(tail[-1]).stem + (f"_{Path(tail[-1]).suffix.lstrip('.')}" if ext else "")
        return _within_name_limit("__".join([*tail[:-1], stem]))

    while True:
        seen: dict[str, list[Path]] = {}
        for p in images:
            seen.setdefault(name(p), []).append(p)
        grow = [p for group in seen.values() if len(group) > 1 for p in group if depth[p] < len(parts[p])]
        if not grow:
            break
        for p in grow:
            depth[p] += 1
    clash = {p for group in seen.values() if len(group) > 1 for p in group}
    return {p: folder / name(p, ext=p in clash) for p in images}
