"""`cmg train`: teacher -> CMER relevance + scorer -> CMLE encoder -> memory banks -> threshold.

Everything lands in RUN/: checkpoint.pt (loadable without these code paths, see
checkpoint.py), metrics.json, train_log.jsonl and plots.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cmg.config import Config, load_config, resolve_config
from cmg.dataset import MVTecFolder, check_training_folder
from cmg.errors import CMGError
from cmg_train import cmer
from cmg_train.checkpoint import save_run
from cmg_train.cmle import CaptionGraph, CMLEHead, build_caption_graph, train_cmle_head
from cmg_train.detector import CMGDetector
from cmg_train.memory_bank import greedy_coreset
from cmg_train.runlog import append_jsonl
from cmg_train.teacher import Teacher, train_teacher


def batched(fn: Callable, *tensors: torch.Tensor, batch_size: int = 128, progress: bool = False,
            desc: str = "") -> tuple:
    """Run `fn` over aligned tensors in chunks without grad; concatenate each output."""
    outs: list[tuple] = []
    n = tensors[0].shape[0]
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
            res = fn(*(t[i:i + batch_size] for t in tensors))
            outs.append(res if isinstance(res, tuple) else (res,))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def split_train_val(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out normals (score normalisation and threshold calibration)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(2, int(round(n * fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_detector(
    cfg: Config,
    teacher: Teacher,
    train_frames: torch.Tensor,
    train_scores: torch.Tensor,
    val_frames: torch.Tensor,
    val_scores: torch.Tensor,
    graph: CaptionGraph | None,
    use_mask: bool,
    lam: float,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> tuple[CMGDetector, dict]:
    """Train the CMLE head on frozen teacher features, fill the memory banks, calibrate.

    One code path for the trained run and every ablation row: they differ only in
    `use_mask` (CMER) and `lam` (CMLE).
    """
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        probe = CMGDetector(cfg, teacher, None, use_mask).features(train_frames[:1], train_scores[:1])
    head = CMLEHead(probe[1].shape[-1], probe[2].shape[-1], cfg.cmle.embed_dim, cfg.cmle.patch_dim)
    det = CMGDetector(cfg, teacher, head, use_mask=use_mask).eval()
    keep, pooled, tokens = batched(det.features, train_frames, train_scores, progress=progress,
                                   desc="encoder features")
    head_metrics = train_cmle_head(head, pooled, graph, cfg.cmle, lam, cfg.seed, progress, log)
    with torch.no_grad():
        z, patches = head(pooled, tokens)
    kept = patches[keep.flatten(1) > 0.5]
    if kept.shape[0] == 0:
        raise CMGError("no patch was kept on any training image: check the CMER keep-mask settings")
    rows = greedy_coreset(kept, cfg.scoring.coreset, cfg.seed, progress)
    det.set_banks(z, kept[rows])
    g, local, _ = batched(lambda f, s: det.raw_scores(*det.features(f, s)), val_frames, val_scores)
    lmax = local.flatten(1).max(1).values
    det.stats.copy_(torch.stack([g.mean(), g.std().clamp_min(1e-6), lmax.mean(), lmax.std().clamp_min(1e-6)]))
    fused = det.fuse(g, local)
    det.threshold.fill_(float(torch.quantile(fused, 1.0 - cfg.scoring.fpr)))
    metrics = {
        "use_mask": use_mask,
        "lambda": lam,
        "kept_fraction_train": float(keep.mean()),
        "patch_features": int(kept.shape[0]),
        "patch_bank": int(rows.numel()),
        "global_bank": int(z.shape[0]),
        "threshold": float(det.threshold),
        "val_false_positive_rate": float((fused > det.threshold).float().mean()),
        "head": {k: v for k, v in head_metrics.items() if k != "history"},
        "head_loss_first_last": [head_metrics["history"][0]["loss"], head_metrics["history"][-1]["loss"]],
    }
    return det, metrics


def train_run(cfg: Config, data: Path, out: Path, progress: bool = True) -> dict:
    """The whole training job; returns metrics (also written to RUN/metrics.json)."""
    t0 = time.perf_counter()
    check_training_folder(data, cfg.data.image_size, need_captions=cfg.cmle.enabled,
                          min_unique_captions=max(cfg.cmle.min_unique_captions, cfg.cmle.k + 1))
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")

    log = functools.partial(append_jsonl, log_path)

    torch.manual_seed(cfg.seed)
    size = (cfg.data.image_size, cfg.data.image_size)
    ds = MVTecFolder(data)
    samples = ds.samples("train")
    frames = torch.from_numpy(ds.frames(samples, size, progress=progress))
    captions = [s.caption for s in samples]
    tr, va = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    teacher, teacher_metrics = train_teacher(cfg, out, progress)
    teacher.eval().requires_grad_(False)
    timings["teacher_s"] = time.perf_counter() - t

    t = time.perf_counter()
    text = teacher.encode_text(captions)
    relevance = cmer.occlusion_relevance(teacher, frames, text, cfg.cmer.occlusion_batch, progress)
    scorer, scorer_metrics = cmer.train_scorer(cfg, teacher, frames[tr], relevance[tr], out, progress)
    scorer.eval().requires_grad_(False)
    (scores,) = batched(cmer.ScorerGraph(teacher.preprocess, scorer), frames)
    cmer_metrics = cmer.cmer_report(cfg, ds, [samples[i] for i in va], frames[va], relevance[va], scores[va])
    timings["cmer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    graph = build_caption_graph([captions[i] for i in tr], cfg.cmle) if cfg.cmle.enabled else None
    det, det_metrics = fit_detector(
        cfg, teacher, frames[tr], scores[tr], frames[va], scores[va], graph,
        use_mask=cfg.cmer.enabled, lam=cfg.cmle.lam if graph is not None else 0.0,
        progress=progress, log=log,
    )
    timings["cmle_s"] = time.perf_counter() - t

    unique = sorted(set(captions))
    caption_bank = teacher.encode_text(unique)
    metrics = {
        "config": cfg.name,
        "data": str(Path(data).resolve()),
        "images": {"train": len(tr), "val": len(va)},
        "teacher": teacher_metrics,
        "cmer": {**scorer_metrics, **cmer_metrics},
        "cmle": {"graph": graph.summary() if graph else None, **det_metrics},
        "timings": {**timings, "total_s": time.perf_counter() - t0},
    }
    save_run(out, cfg, teacher, scorer, det, caption_bank, unique, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="config name under configs/ or a YAML path")
    p.add_argument("--data", required=True, type=Path, help="MVTec-style folder (see `cmg data synth`)")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_config(args.config))
    if args.seed is not None:
        cfg.seed = args.seed
    metrics = train_run(cfg, args.data, args.out, progress=not args.no_progress)
    print(json.dumps({"run": str(args.out), "threshold": metrics["cmle"]["threshold"],
                      "total_s": round(metrics["timings"]["total_s"], 1)}))
    return 0
