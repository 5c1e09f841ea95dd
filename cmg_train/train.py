"""`cmg train`: everything learns from the folder given, in this order:

teacher (projection over the frozen backbone vs frozen text) -> CMER occlusion relevance +
one-pass scorer -> local anomaly model (patch memory bank on the frozen backbone, or a U-Net
on synthetic anomalies) -> CMLE caption graph + head -> global memory bank -> score normalisation + threshold.

Everything lands in RUN/: checkpoint.pt (loadable without these code paths, see
checkpoint.py), metrics.json, train_log.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from cmg.argtypes import seed_int
from cmg.config import Config, load_config, resolve_config, unread_settings
from cmg.dataset import MVTecFolder, check_training_folder
from cmg.errors import CMGError
from cmg.locks import DATA_BEING_WRITTEN, reading
from cmg_train.backbone import check_backbones
from cmg_train.checkpoint import save_run
from cmg_train.cmer.fit import MIN_IMAGES as MIN_SCORER_IMAGES
from cmg_train.cmer.fit import attention_relevance, occlusion_relevance, train_scorer
from cmg_train.cmer.model import OcclusionTeacher, ScorerGraph, keep_mask_cfg
from cmg_train.cmer.report import cmer_metrics, speed_ratio
from cmg_train.cmle.fit import (
    CaptionGraph,
    build_caption_graph,
    check_captions,
    train_cmle_head,
    unique_captions_needed,
)
from cmg_train.cmle.model import CMLEHead
from cmg_train.detector import CMGDetector, spread
from cmg_train.local import anomalies
from cmg_train.local.bank import PatchBank, fit_patch_bank
from cmg_train.local.fit import synthetic_check, train_local
from cmg_train.local.model import LocalNet
from cmg_train.loop import batched
from cmg_train.masking import upsample_keep
from cmg_train.metrics import normal_threshold, paired_bootstrap
from cmg_train.preprocess import Preprocess
from cmg_train.runlog import append_jsonl, run_folder
from cmg_train.teacher.fit import train_teacher
from cmg_train.teacher.model import Teacher, teacher_weights


def held_out_count(n: int, fraction: float) -> int:
    """How many of n training images `split_train_val` holds out: at least 2 to calibrate on."""
    return max(2, int(round(n * fraction)))


def min_training_images(fraction: float) -> int:
    """The smallest train/good that leaves the CMER scorer its minimum after the held-out share.

    The folder check asks for this count, so a folder that passes it also trains.
    """
    n = MIN_SCORER_IMAGES
    while n - held_out_count(n, fraction) < MIN_SCORER_IMAGES:
        n += 1
    return n


def split_train_val(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic held-out normals (teacher retrieval, score normalisation, threshold)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = held_out_count(n, fraction)
    return torch.from_numpy(np.sort(perm[n_val:])), torch.from_numpy(np.sort(perm[:n_val]))


def caption_embedder(cfg: Config, teacher: Teacher):
    """CMLE's text encoder: the offline MiniLM (default) or the teacher's text side."""
    if cfg.cmle.text_encoder == "teacher":
        return lambda texts: teacher.encode_text(texts).cpu().numpy()
    return None  # build_caption_graph's default: MiniLM


def fit_detector(cfg: Config, teacher: Teacher, local: LocalNet | PatchBank, train_frames: torch.Tensor,
                 train_scores: torch.Tensor, val_frames: torch.Tensor, val_scores: torch.Tensor,
                 graph: CaptionGraph | None, use_mask: bool, lam: float, progress: bool = True,
                 log: Callable[[dict], None] | None = None,
                 val_maps: torch.Tensor | None = None,
                 features: dict[bool, torch.Tensor] | None = None,
                 train_frames_for_threshold: int = 0,
                 scorer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[CMGDetector, dict]:
    """Train the CMLE head on the teacher's embeddings of masked images, fill the global
    memory bank, normalise both scores and calibrate the threshold on held-out normals.

    One code path for the trained run and every ablation row: they differ in `use_mask`
    (CMER), `lam` (CMLE) and which local model they get. `features` (by `use_mask`) keeps
    the teacher's embeddings of the training frames for the next row with the same mask:
    the ablation's four rows need two, not four, passes of the teacher.
    `train_frames_for_threshold` (the trained run: `scoring.train_frames`) adds that many
    training frames, scored as if left out, to the threshold's normals (`left_out_scores`).
    `scorer`: the one-pass CMER scorer, which gives the fusion weight's synthetic anomalies
    their own keep-masks (`choose_global_weight`).
    """
    torch.manual_seed(cfg.seed)
    head = CMLEHead(teacher.embed_dim, cfg.cmle.embed_dim)
    det = CMGDetector(cfg, teacher, local, head, use_mask=use_mask).eval()
    embed = lambda f, s: det.embed(teacher.preprocess(f), det.keep(s))  # noqa: E731
    if features is not None and use_mask in features:
        pooled = features[use_mask]
    else:
        (pooled,) = batched(embed, train_frames, train_scores, progress=progress, desc="encoder features")
        if features is not None:
            features[use_mask] = pooled
    head_metrics = train_cmle_head(head, pooled, graph, cfg.cmle, lam, cfg.seed, progress, log)
    with torch.no_grad():
        det.set_bank(head(pooled))
    if det.score_blur is not None:  # `local.score_sigma`: the local score needs its views' statistics first
        if val_maps is None:
            (val_maps,) = batched(lambda f: det.local_map(f, teacher.preprocess(f)), val_frames)
        (val_keep,) = batched(det.keep, val_scores)
        det.fit_view_stats(val_maps, val_keep)
    if val_maps is None:
        g, lmax = batched(lambda f, s: det.raw(f, s)[:2], val_frames, val_scores)
    else:  # the local model's maps of these frames, computed once by the caller
        g, lmax = batched(lambda f, s, m: det.raw(f, s, m)[:2], val_frames, val_scores, val_maps)
    det.stats.copy_(torch.stack([g.mean(), spread(g, "global score"), lmax.mean(), spread(lmax, "local score")]))
    fusion = None
    if cfg.scoring.fusion == "auto":
        fusion = choose_global_weight(det, val_frames, val_scores, g, lmax, cfg.seed, scorer)
        det.global_weight.fill_(fusion["global_weight"])
    fused = det.fuse(g, lmax)
    left_out = torch.zeros(0)
    if train_frames_for_threshold and isinstance(local, PatchBank) and local.row_frames is not None:
        left_out = left_out_scores(det, train_frames, train_scores, train_frames_for_threshold, progress)
    threshold, bound = normal_threshold(torch.cat([fused, left_out]).numpy(), cfg.scoring.fpr)
    det.threshold.fill_(threshold)
    metrics = {
        "use_mask": use_mask,
        "lambda": lam,
        "global_bank": int(pooled.shape[0]),
        "threshold": float(det.threshold),
        "threshold_normals": {"held_out": len(fused), "training_left_out": len(left_out)},
        "val_false_positive_rate": float((fused > det.threshold).float().mean()),
        "false_positive_rate_bound": bound,
        "fusion": fusion,
        "head": head_metrics,
    }
    return det, metrics


@torch.no_grad()
def left_out_scores(det: CMGDetector, frames: torch.Tensor, patch_scores: torch.Tensor, limit: int,
                    progress: bool = False) -> torch.Tensor:
    """Fused scores of up to `limit` training frames (evenly spaced), each scored without its
    own rows in the patch bank and without its own embedding in the global bank.

    Why: thirty held-out normals (a 200-image folder's 15%) are few for a 5% tail: the
    threshold is then their largest score, and on the parts set one rare frame among them
    moved recall at the threshold from 0.63 to 0.10 between seeds (docs/results.md). Left-out
    training frames are near, not exactly, new normals (the coreset was chosen with them in
    it), so the split-conformal bound is a close estimate here, not a guarantee."""
    ids = torch.linspace(0, len(frames) - 1, min(limit, len(frames))).round().long().unique()

    def one(f: torch.Tensor, s: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = det.raw(f, s, local_map=det.local.map_without_own_rows(f, i))
        own = torch.nn.functional.one_hot(i, det.global_knn.bank_sq.shape[0]).bool()
        return det.global_knn.excluding(r.z, own), r.local_score

    g, lmax = batched(one, frames[ids], patch_scores[ids], ids, batch_size=4, progress=progress,
                      desc="threshold: left-out frames")
    return det.fuse(g, lmax)


FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic_anomaly_frames(frames: torch.Tensor, seed: int) -> torch.Tensor:
    """uint8 [N,H,W,3] normals -> the same frames, each with one synthetic anomaly pasted on
    (local/anomalies.py), seeded: what the fusion weight is chosen on."""
    gen = torch.Generator().manual_seed(seed + 7)
    unit = Preprocess.to_unit(frames)
    shapes = anomalies.random_shapes(len(unit), unit.shape[-1], gen)
    bad, _ = anomalies.synthesize(unit, shapes.float(), gen, prob=1.0)
    return (bad.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def choose_global_weight(det: CMGDetector, val_frames: torch.Tensor, val_scores: torch.Tensor, g: torch.Tensor,
                         lmax: torch.Tensor, seed: int,
                         scorer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """The fusion weight of the global score, from the user's own held-out normals: synthetic
    anomalies (local/anomalies.py, the U-Net's training task) are pasted onto them, and the
    weight whose fused score separates them best from the clean frames wins, but only when
    its gain over the local score alone is outside noise (the lower end of its paired 95%
    bootstrap interval above 0); otherwise the local score alone (weight 0).

    Why: which branch carries the signal depends on the product (the global score ranked
    below chance on a third-party parts set and best on a synthetic gear line), and no
    defect of the user's is known at training time. A few dozen held-out normals cannot tell
    weights a point or two apart, and the synthetic anomalies are not the user's defects, so
    the global branch is added only when it clearly helps. Nothing of the test split is used.
    Each anomalous frame is scored as served: with `scorer` (the one-pass CMER scorer) its
    keep-mask is its own, not its clean frame's (`val_scores`, only without a scorer)."""
    frames = synthetic_anomaly_frames(val_frames, seed)
    bad_scores = batched(scorer, frames)[0] if scorer is not None else val_scores
    gb, lb = batched(lambda f, s: det.raw(f, s)[:2], frames, bad_scores)
    labels = np.r_[np.zeros(len(g)), np.ones(len(gb))]
    g_all, l_all = torch.cat([g, gb]), torch.cat([lmax, lb])
    fused = {}
    for w in FUSION_WEIGHTS:  # the detector's own fusion (the served formula), at each candidate weight
        det.global_weight.fill_(w)
        fused[w] = det.fuse(g_all, l_all).numpy()
    return {**pick_weight(labels, fused, seed), "images": len(g)}


def pick_weight(labels: np.ndarray, fused: dict[float, np.ndarray], seed: int) -> dict:
    """The weight with the best AUROC (ties: the smaller), or 0 when its paired gain over
    weight 0 is within noise (95% bootstrap interval reaching 0)."""
    aurocs = {w: float(roc_auc_score(labels, s)) for w, s in fused.items()}
    best = max(aurocs, key=lambda w: (round(aurocs[w], 3), -w))
    gain_ci = None
    if best != 0.0:
        gain_ci = paired_bootstrap(labels, [(fused[best], fused[0.0])], seed=seed)
        if gain_ci[0] <= 0.0:
            best = 0.0
    return {"global_weight": best, "synthetic_auroc": aurocs, "best_gain_ci95": gain_ci}


def practice_regions(cfg: Config, relevance: torch.Tensor) -> torch.Tensor | None:
    """Pixel keep-masks [N,1,H,W] where the local model practises (CMER placement), or None."""
    if cfg.local.placement != "keep" or not cfg.cmer.enabled:
        return None
    size = cfg.data.image_size
    return upsample_keep(keep_mask_cfg(relevance, cfg.cmer), (size, size))


def fit_local(cfg: Config, teacher: Teacher, frames: torch.Tensor, relevance: torch.Tensor, tr: torch.Tensor,
              va: torch.Tensor, progress: bool = True, log=None) -> tuple[LocalNet | PatchBank, dict]:
    """The local model of `local.model`: the patch bank fitted on the training normals, or the
    U-Net trained on synthetic anomalies (and checked on held-out ones)."""
    if cfg.local.model == "bank":
        return fit_patch_bank(cfg, frames[tr], progress, held_out=frames[va])
    local, metrics = train_local(cfg, teacher.preprocess, frames[tr], practice_regions(cfg, relevance[tr]),
                                 progress, log)
    metrics["synthetic_val"] = synthetic_check(local, teacher.preprocess, frames[va], cfg.seed,
                                               cfg.local.pool, practice_regions(cfg, relevance[va]))
    return local, metrics


def train_run(cfg: Config, data: Path, out: Path, progress: bool = True) -> dict:
    """The whole training job; returns metrics (also written to RUN/metrics.json).

    RUN changes only when training succeeds (`run_folder`): a failed run keeps an existing
    run's files and log and leaves no new folder; a successful one removes the run's stale
    RUN/onnx (exported from the checkpoint it replaces). `progress=False` also silences
    the libraries' own bars ("Loading weights")."""
    if not progress:
        quiet_library_progress()
    with run_folder(Path(out)) as log_path:
        return _train_run(cfg, data, Path(out), progress, log_path)


def quiet_library_progress() -> None:
    """transformers and huggingface_hub draw their own bars when MiniLM loads."""
    with contextlib.suppress(ImportError):
        # heavy, and sentence-transformers' dependency rather than ours: silenced only if present
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars  # not our dependency: if present

        disable_progress_bars()


def _train_run(cfg: Config, data: Path, out: Path, progress: bool, log_path: Path) -> dict:
    t0 = time.perf_counter()
    data = Path(data).resolve()
    check_backbones(cfg.backbone)
    # Read under a reader's lock on DATA: a `cmg data synth` rewriting it meanwhile had given
    # this training one seed's captions and another's frames, exit 0.
    with reading(data, refusal=DATA_BEING_WRITTEN.format(data=data)):
        check_training_folder(data, cfg.data.image_size, need_captions=cfg.cmle.enabled,
                              min_unique_captions=unique_captions_needed(cfg.cmle),
                              min_images=min_training_images(cfg.data.val_fraction),
                              why_min=f"{MIN_SCORER_IMAGES} to train the CMER scorer on, the rest held out "
                                      f"by data.val_fraction {cfg.data.val_fraction}", progress=progress)
        ds = MVTecFolder(data)
        samples = ds.samples("train")
        captions = [s.caption for s in samples]
        tr, va = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
        tr_captions = [captions[i] for i in tr.tolist()]
        graph = None
        if cfg.cmle.enabled:
            # The folder check counted every training image; CMLE learns from the split without the
            # held-out normals, which can have fewer: fail on it now, not after minutes of training.
            check_captions(tr_captions, cfg.cmle, held_out=len(va))
            if cfg.cmle.text_encoder != "teacher":  # MiniLM's reading of them, checked now too
                graph = build_caption_graph(tr_captions, cfg.cmle)
        log = functools.partial(append_jsonl, log_path)
        torch.manual_seed(cfg.seed)
        size = (cfg.data.image_size, cfg.data.image_size)
        frames = torch.from_numpy(ds.frames(samples, size, progress=progress))
        parts = _part_clutter(ds, [samples[i] for i in va.tolist()], size)  # the metrics' masks: read now too
    timings: dict[str, float] = {}

    def stage(i: int, what: str) -> None:  # the stages in order, with the time so far: no bar spans them all
        if progress:
            tqdm.write(f"cmg train [{i}/4] {what} ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr)

    t = time.perf_counter()
    stage(1, "teacher: image and caption embeddings")
    teacher, teacher_metrics = train_teacher(cfg, frames, captions, tr, va, progress, log)
    timings["teacher_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(2, "CMER: relevance, the one-pass scorer, keep-mask checks")
    text = teacher.encode_text(captions)
    if cfg.cmer.relevance == "attention":
        relevance = attention_relevance(teacher, frames, cfg.grid)
    else:
        relevance = occlusion_relevance(teacher, frames, text, cfg.grid, cfg.cmer.occlusion_batch, progress)
    scorer, scorer_metrics = train_scorer(cfg, teacher, frames[tr], relevance[tr], progress, log)
    one_pass = ScorerGraph(teacher.preprocess, scorer).eval()
    (scores,) = batched(one_pass, frames, progress=progress, desc="keep-masks")
    unique = sorted(set(captions))
    caption_bank = teacher.encode_text(unique)
    exact = OcclusionTeacher(teacher, caption_bank, cfg.grid).eval()
    cmer_m = {**scorer_metrics, **cmer_metrics(relevance[va], cfg.cmer, *parts, scorer_scores=scores[va],
                                                seed=cfg.seed),
              **speed_ratio(exact, one_pass, frames[va[:8]])}
    timings["cmer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(3, f"local model: {cfg.local.model}")
    local, local_metrics = fit_local(cfg, teacher, frames, relevance, tr, va, progress, log)
    timings["local_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(4, "CMLE head, fusion weight and threshold")
    if cfg.cmle.enabled and graph is None:  # the teacher's own text side reads them
        graph = build_caption_graph(tr_captions, cfg.cmle, caption_embedder(cfg, teacher))
    det, det_metrics = fit_detector(
        cfg, teacher, local, frames[tr], scores[tr], frames[va], scores[va], graph,
        use_mask=cfg.cmer.enabled, lam=cfg.cmle.lam if graph is not None else 0.0, progress=progress, log=log,
        train_frames_for_threshold=cfg.scoring.train_frames, scorer=one_pass,
    )
    timings["cmle_s"] = time.perf_counter() - t

    metrics = {
        "config": cfg.name,
        "seed": cfg.seed,
        "data": str(data),
        "images": {"train": len(tr), "val": len(va)},
        "teacher": teacher_metrics,
        "cmer": cmer_m,
        "local": local_metrics,
        "cmle": {"graph": graph.summary() if graph else None, **det_metrics},
        "timings": {**timings, "total_s": time.perf_counter() - t0},
    }
    save_run(out, cfg, teacher, scorer, det, caption_bank, unique, metrics)  # with config.yaml and metrics.json
    return metrics


def _part_clutter(ds: MVTecFolder, samples: list, size: tuple[int, int]) -> tuple:
    """Part and clutter pixel masks of the synthetic generator's folders, else (None, None)."""
    parts, clutters = [], []
    for s in samples:
        p, c = ds.part_mask(s, size), ds.clutter_mask(s, size)
        if p is None or c is None:
            return None, None
        parts.append(p)
        clutters.append(c)
    return (np.stack(parts), np.stack(clutters)) if parts else (None, None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="small",
                   help="a shipped config's name (`cmg_configs`: tiny, small, ...) or a YAML path (default small, the accurate one; "
                        "tiny is sized for CI and the demo, not for accuracy)")
    p.add_argument("--data", required=True, type=Path, help="MVTec-style folder (train/good + captions.jsonl)")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--seed", type=seed_int, default=None, help="override the config's seed")
    p.add_argument("--teacher-weights", type=Path, default=None, metavar="FILE",
                   help="local open_clip checkpoint for the config's teacher.arch (sets teacher.checkpoint; "
                        "open_clip configs such as vit-b32 only)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_config(args.config))
    if args.seed is not None:
        cfg.seed = args.seed
    if args.teacher_weights is not None:
        if cfg.teacher.source != "open_clip":
            raise CMGError(f"--teacher-weights: config {cfg.name!r} has no open_clip teacher "
                           f"(teacher.source {cfg.teacher.source}); the weights are for open_clip configs such as vit-b32")
        cfg.teacher.checkpoint = str(args.teacher_weights.resolve())
    if cfg.teacher.source == "open_clip":
        teacher_weights(cfg.teacher)  # a missing or absent weights file stops here, before the data is read
    for line in unread_settings(cfg):
        print(f"note: {line}", file=sys.stderr)
    metrics = train_run(cfg, args.data, args.out, progress=not args.no_progress)
    print(json.dumps({"run": str(args.out), "threshold": metrics["cmle"]["threshold"],
                      "total_s": round(metrics["timings"]["total_s"], 1)}))
    print(next_steps(metrics, args.out), file=sys.stderr)
    return 0


def next_steps(metrics: dict, out: Path) -> str:
    """What the run promises and what comes next, in words (the JSON line above is for scripts)."""
    c = metrics["cmle"]
    normals = sum((c.get("threshold_normals") or {}).values())
    fused = {float(w): a for w, a in ((c.get("fusion") or {}).get("synthetic_auroc") or {}).items()}
    weight = float((c.get("fusion") or {}).get("global_weight") or 0.0)
    on_synthetic = f"; synthetic defects on held-out normals: AUROC {fused[weight]:.2f}" if weight in fused else ""
    q = shlex.quote(str(out))  # pasted into a shell as shown
    return (f"cmg train: threshold {c['threshold']:.4g}, set to flag at most {c['false_positive_rate_bound']:.1%} of "
            f"normal frames like the {normals} it was calibrated on (held-out normals flagged: "
            f"{c['val_false_positive_rate']:.1%}){on_synthetic}. Next: `cmg eval --run {q}` on a test split with "
            f"defects (how good it is), then `cmg export --run {q}` and `cmg build --run {q}`")
