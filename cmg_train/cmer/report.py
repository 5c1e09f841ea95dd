"""How good is a keep-mask? Metrics that need no training code (train and eval report them).

- keep IoU of the scorer's masks with the teacher's (the distillation's fidelity);
- on folders with part/clutter masks (the synthetic generator writes them): share of part
  pixels kept and of clutter pixels removed, against a random mask keeping as much;
- on any test split with ground truth: share of defect pixels the mask keeps (a mask
  that hides defects would hide them from the detector too) and of the image it drops.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import Tensor

from cmg.config import CMERConfig
from cmg_train.cmer.model import keep_mask, keep_mask_cfg
from cmg_train.local.bank import score_channel
from cmg_train.masking import upsample_keep


def keep_iou(a: Tensor, b: Tensor) -> float:
    """Mean per-image IoU of two keep masks [N,G,G] (an image where both keep nothing counts 1)."""
    a, b = a.flatten(1) > 0.5, b.flatten(1) > 0.5
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return float(iou.mean()) if len(iou) else float("nan")


def random_keep_like(keep: Tensor, seed: int = 0) -> Tensor:
    """Random masks keeping the same number of patches per image as `keep` (the control)."""
    gen = torch.Generator().manual_seed(seed)
    flat = keep.flatten(1) > 0.5
    counts = flat.sum(1)
    ranks = torch.rand(flat.shape, generator=gen).argsort(1).argsort(1)
    return (ranks < counts.unsqueeze(1)).float().reshape(keep.shape)


def _pixels(keep: Tensor, size: tuple[int, int]) -> np.ndarray:
    return (upsample_keep(keep, size).squeeze(1) > 0.5).numpy()


def mask_quality(keep: Tensor, part: np.ndarray, clutter: np.ndarray) -> dict:
    """Part pixel recall and share of clutter pixels removed, pooled over all images."""
    kp = _pixels(keep, part.shape[-2:])
    n_part, n_clutter = int(part.sum()), int(clutter.sum())
    return {
        "part_recall": float((kp & part).sum()) / n_part if n_part else None,
        "clutter_removed": float((~kp & clutter).sum()) / n_clutter if n_clutter else None,
        "keep_fraction": float(keep.float().mean()),
    }


def defect_coverage(keep: Tensor, gt: np.ndarray) -> dict:
    """Share of ground-truth defect pixels inside the keep-mask, and of all pixels dropped."""
    kp = _pixels(keep, gt.shape[-2:])
    n = int(gt.sum())
    return {"defect_pixels_kept": float((kp & gt).sum()) / n if n else None,
            "pixels_dropped": float(1.0 - kp.mean())}


def false_alarm_peaks(ungated: Tensor, keep: Tensor) -> dict:
    """What the keep-mask does to the false alarms of normal frames: the share of frames whose
    local-map peak (ungated [B,C,h,w]; channel 0, the map the score reads) lies where the
    keep-mask [B,G,G] discards, and the median drop of the peak once the map is gated (the
    alarms CMER removes)."""
    if len(ungated) == 0:
        return {"normal_frames": 0}
    ungated = score_channel(ungated)
    kp = upsample_keep(keep, ungated.shape[-2:]).flatten(1)
    flat = ungated.flatten(1)
    outside = 1.0 - kp.gather(1, flat.argmax(1, keepdim=True))
    before, after = flat.amax(1), (flat * kp).amax(1)
    return {"normal_frames": len(flat), "peak_outside_keep": float(outside.mean()),
            # the median as numpy and the reports take it (torch's .median() is the lower middle value)
            "median_peak_drop": float(np.median(((before - after) / before.clamp_min(1e-12)).numpy()))}


def cmer_metrics(teacher_scores: Tensor, cfg: CMERConfig, part: np.ndarray | None = None,
                 clutter: np.ndarray | None = None, scorer_scores: Tensor | None = None,
                 seed: int = 0) -> dict:
    """Teacher (and scorer) keep-masks under the relative rule, top-rho and a random control,
    plus scorer-vs-teacher keep IoU under the configured rule."""
    out: dict = {"alpha": cfg.alpha, "rho": cfg.rho, "images": len(teacher_scores)}

    def rows(scores: Tensor) -> dict:
        rel = keep_mask(scores, "relative", cfg.alpha, cfg.rho, grow=True)
        if part is None or clutter is None:
            return {"keep_fraction": float(rel.mean())}
        return {"relative": mask_quality(rel, part, clutter),
                "top_rho": mask_quality(keep_mask(scores, "top_rho", cfg.alpha, cfg.rho), part, clutter),
                "random": mask_quality(random_keep_like(rel, seed), part, clutter)}

    out["teacher"] = rows(teacher_scores)
    if scorer_scores is not None:
        out["scorer"] = rows(scorer_scores)
        out["keep_iou"] = keep_iou(keep_mask_cfg(scorer_scores, cfg), keep_mask_cfg(teacher_scores, cfg))
    return out


@torch.no_grad()
def speed_ratio(exact, one_pass, frames: Tensor, repeats: int = 3) -> dict:
    """Median seconds of the P+1-pass exact graph vs the one-pass scorer graph on one batch."""
    te, ts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        exact(frames)
        te.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        one_pass(frames)
        ts.append(time.perf_counter() - t0)
    e, s = statistics.median(te), statistics.median(ts)
    return {"exact_s": e, "scorer_s": s, "speed_ratio": e / max(s, 1e-9), "batch": len(frames)}
