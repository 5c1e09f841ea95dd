"""CMER, cross-modal entropy reduction: which patches does the caption care about?

(a) `occlusion_relevance`: the paper's procedure, r_i = s(x) - s(x with patch i filled),
    P+1 teacher passes per image. `OcclusionTeacher` is the same as one exportable graph
    (the `cmer_teacher` exact mode).
(b) `keep_mask` / `apply_mask`: the keep rule and the fill, written with export-friendly
    ops only so the serving graph applies them in-engine.
(c) `CMERScorer`: a one-pass student distilled from (a) (`train_scorer`), no text needed.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmg.config import CMERConfig, Config
from cmg.errors import CMGError
from cmg_train.runlog import append_jsonl

from .teacher import Preprocess, Teacher

# ------------------------------------------------------------------ occlusion relevance


def occlusion_masks(grid: int, image_size: int) -> Tensor:
    """[P+1, 1, H, W] keep masks: copy 0 is the whole image, copy i+1 has patch i filled.

    Patches are numbered row-major, matching a [G, G] reshape of the scores.
    """
    patch = image_size // grid
    masks = torch.ones(grid * grid + 1, 1, image_size, image_size)
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        masks[i + 1, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0.0
    return masks


@torch.no_grad()
def occlusion_relevance(teacher: Teacher, frames: Tensor, text_emb: Tensor, batch: int = 512,
                        progress: bool = False) -> Tensor:
    """Paper-faithful: r_i = s(x) - s(x with patch i filled), P+1 teacher passes per image, batched.

    frames uint8 [N,H,W,3], text_emb [N,E] (each image's own caption) -> [N,G,G] on CPU.
    Filling = multiplying the normalised image by 0, i.e. the dataset mean.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"occlusion_relevance: frames must be [N,H,W,3], got {list(frames.shape)}")
    if len(text_emb) != len(frames):
        raise ValueError(f"occlusion_relevance: {len(frames)} frames but {len(text_emb)} text embeddings")
    g = teacher.grid
    device = teacher.device
    masks = occlusion_masks(g, frames.shape[1]).to(device)
    per = masks.shape[0]
    chunk = max(1, batch // per)  # images per forward, so a forward holds ~`batch` copies
    text_emb = text_emb.to(device)
    out = []
    for i in tqdm(range(0, len(frames), chunk), desc="occlusion relevance", disable=not progress,
                  leave=False):
        x = teacher.preprocess(frames[i:i + chunk].to(device))             # [b,3,H,W]
        copies = (x.unsqueeze(1) * masks.unsqueeze(0)).flatten(0, 1)     # [b*(P+1),3,H,W]
        emb = teacher.encode_image(copies).view(x.shape[0], per, -1)     # [b,P+1,E]
        s = (emb * text_emb[i:i + chunk].unsqueeze(1)).sum(-1)           # [b,P+1]
        out.append((s[:, :1] - s[:, 1:]).view(-1, g, g).cpu())
    return torch.cat(out) if out else torch.zeros(0, g, g)


class OcclusionTeacher(nn.Module):
    """Exact mode as ONE exportable graph: uint8 frames -> PATCH_SCORES [B,G,G].

    Builds the P+1 occluded copies in-graph (constant keep masks, one multiply),
    retrieves the best-matching caption from a constant caption-embedding bank [C,E]
    (argmax of similarity with the unoccluded image), scores all copies against it.
    """

    def __init__(self, teacher: Teacher, caption_bank: Tensor):
        super().__init__()
        if caption_bank.ndim != 2 or caption_bank.shape[0] < 1:
            raise ValueError(f"OcclusionTeacher: caption bank must be [C,E], got {list(caption_bank.shape)}")
        self.teacher = teacher
        self.grid = teacher.grid
        self.register_buffer("masks", occlusion_masks(teacher.grid, teacher.image_size))
        self.register_buffer("bank", F.normalize(caption_bank.detach().float(), dim=-1))

    def forward(self, frames: Tensor) -> Tensor:
        # python ints, so the traced graph has static non-batch dims (TensorRT profiles)
        per, size, dim = self.grid * self.grid + 1, self.teacher.image_size, int(self.bank.shape[1])
        x = self.teacher.preprocess(frames)
        copies = (x.unsqueeze(1) * self.masks.unsqueeze(0)).reshape(-1, 3, size, size)
        emb = self.teacher.encode_image(copies).reshape(-1, per, dim)
        best = torch.argmax(emb[:, 0] @ self.bank.T, dim=1)
        text = self.bank[best]                                           # [B,E]
        s = (emb * text.unsqueeze(1)).sum(-1)                            # [B,P+1]
        return (s[:, :1] - s[:, 1:]).reshape(-1, self.grid, self.grid)


# ----------------------------------------------------------------------- keep-mask rule


def keep_mask(scores: Tensor, rule: str = "relative", alpha: float = 0.2, rho: float = 0.4,
              grow: bool = True) -> Tensor:
    """[B,G,G] -> float {0,1} [B,G,G].

    relative: r > alpha * max(r) per image (all kept when max <= 0: nothing is relevant, so
    nothing may be discarded), grown by one patch (3x3 max-pool) when `grow`.
    top_rho: exactly the top round(rho*P) patches (TopK indices scattered into a zero
    map, so ties at the noise floor cannot inflate it): a fixed fraction, never grown.
    Only ReduceMax/Greater/MaxPool/TopK/ScatterElements ops, no python branching on
    values, so the rule exports into the serving graph.
    """
    if scores.ndim != 3:
        raise ValueError(f"keep_mask: scores must be [B,G,G], got {list(scores.shape)}")
    if rule == "relative":
        peak = scores.amax(dim=(1, 2), keepdim=True)
        keep = (scores > alpha * peak).float()
        keep = torch.maximum(keep, (peak <= 0).float().expand_as(keep))
        if grow:
            keep = F.max_pool2d(keep.unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1)
        return keep
    if rule == "top_rho":
        p = int(scores.shape[1]) * int(scores.shape[2])  # static G*G, also when traced
        k = min(p, max(1, round(rho * p)))
        flat = scores.flatten(1)
        idx = torch.topk(flat, k, dim=1).indices
        return torch.zeros_like(flat).scatter(1, idx, 1.0).reshape(scores.shape)
    raise ValueError(f"keep_mask: unknown rule {rule!r} (relative | top_rho)")


def keep_mask_cfg(scores: Tensor, cfg: CMERConfig) -> Tensor:
    """keep_mask with the run's configured rule."""
    return keep_mask(scores, cfg.rule, cfg.alpha, cfg.rho, cfg.grow)


def upsample_keep(keep: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """[B,G,G] -> [B,1,H,W] by nearest upsampling (each patch covers its pixels exactly)."""
    # python ints: constant Resize sizes in the traced graph (H, W are static in the contract)
    return F.interpolate(keep.unsqueeze(1).float(), size=(int(size[0]), int(size[1])), mode="nearest")


def apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """x normalised NCHW, keep [B,G,G] -> x * nearest-upsampled keep (fill 0 = dataset mean)."""
    return x * upsample_keep(keep, x.shape[-2:])


# --------------------------------------------------------------------------- the scorer


class CMERScorer(nn.Module):
    """One-pass student: normalised NCHW -> relevance map [B,G,G] (logits; higher = keep).

    A small CNN: one conv stage per entry of `channels`, stride 2 while the map stays a
    multiple of G (each stage when image_size is not given), average-pooled to G x G, then two 3x3 convs at G x G for context (whether a patch matters
    depends on where the part is), then a 1x1 head. No text: one product line.
    """

    def __init__(self, channels: list[int], grid: int, image_size: int | None = None):
        super().__init__()
        if image_size is not None and image_size % grid:
            raise ValueError(f"CMERScorer: image_size {image_size} not a multiple of grid {grid}")
        self.grid, self.image_size = grid, image_size
        self.channels = list(channels)
        layers: list[nn.Module] = []
        cin, res = 3, image_size
        for cout in channels:
            # halve while that stays a multiple of G; without image_size every stage halves
            stride = 2 if res is None or (res // 2 >= grid and (res // 2) % grid == 0) else 1
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
            res = None if res is None else res // stride
        self.features = nn.Sequential(*layers)
        self.context = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 1, 2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cin, 3, 1, 1), nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(2 * cin, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if f.shape[-1] != self.grid:  # fewer stages than halvings: pool the rest (static shapes)
            if f.shape[-1] < self.grid or f.shape[-1] % self.grid:
                raise ValueError(
                    f"CMERScorer: feature map {f.shape[-1]} px cannot be pooled to grid {self.grid}; "
                    "pass image_size or change cmer.scorer.channels"
                )
            k = int(f.shape[-1]) // self.grid
            f = F.avg_pool2d(f, k)
        return self.head(torch.cat([f, self.context(f)], dim=1)).squeeze(1)


class ScorerGraph(nn.Module):
    """uint8 frames -> PATCH_SCORES: the one normalisation + the scorer (what cmer_scorer serves)."""

    def __init__(self, preprocess: Preprocess, scorer: CMERScorer):
        super().__init__()
        self.preprocess, self.scorer = preprocess, scorer

    def forward(self, frames: Tensor) -> Tensor:
        return self.scorer(self.preprocess(frames))


def scorer_state(scorer: CMERScorer) -> dict:
    return {"channels": scorer.channels, "grid": scorer.grid, "image_size": scorer.image_size,
            "state_dict": {k: v.detach().cpu() for k, v in scorer.state_dict().items()}}


def scorer_from_state(state: dict) -> CMERScorer:
    scorer = CMERScorer(state["channels"], state["grid"], state["image_size"])
    scorer.load_state_dict(state["state_dict"])
    return scorer.eval()


def normalised_target(relevance: Tensor) -> Tensor:
    """r / max r clipped to [0, 1] per image; all ones when max <= 0 (the keep rule keeps all)."""
    peak = relevance.amax(dim=(1, 2), keepdim=True)
    target = (relevance / peak.clamp_min(1e-12)).clamp(0, 1)
    return torch.where(peak > 0, target, torch.ones_like(target))


def keep_iou(a: Tensor, b: Tensor) -> float:
    """Mean per-image IoU of two keep masks [N,G,G] (an image where both keep nothing counts 1)."""
    a, b = a.flatten(1) > 0.5, b.flatten(1) > 0.5
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return float(iou.mean()) if len(iou) else float("nan")


@torch.no_grad()
def scorer_relevance(scorer: CMERScorer, preprocess: Preprocess, frames: Tensor, batch: int = 256) -> Tensor:
    """Scorer maps for uint8 frames [N,H,W,3] -> [N,G,G] (CPU)."""
    scorer.eval()
    device = next(scorer.parameters()).device
    out = [scorer(preprocess(frames[i:i + batch].to(device))).cpu() for i in range(0, len(frames), batch)]
    return torch.cat(out) if out else torch.zeros(0, scorer.grid, scorer.grid)


@torch.no_grad()
def speed_ratio(teacher: Teacher, scorer: CMERScorer, frames: Tensor, repeats: int = 5) -> dict:
    """Median seconds for teacher P+1 passes vs one scorer pass on the same batch."""
    text = teacher.encode_image(teacher.preprocess(frames))  # any embedding: cost is the same
    tt, ts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        occlusion_relevance(teacher, frames, text, batch=len(frames) * (teacher.grid ** 2 + 1))
        tt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scorer(teacher.preprocess(frames))
        ts.append(time.perf_counter() - t0)
    t_med, s_med = statistics.median(tt), statistics.median(ts)
    return {"teacher_s": t_med, "scorer_s": s_med, "speed_ratio": t_med / max(s_med, 1e-9),
            "batch": len(frames)}


def train_scorer(cfg: Config, teacher: Teacher, frames: Tensor, relevance: Tensor, out_dir: Path,
                 progress: bool = True) -> tuple[CMERScorer, dict]:
    """Distil the occlusion maps into a one-pass scorer.

    Loss: BCE on per-image normalised maps (r / max r, clipped), weighted towards the
    meaningful patches (1 + 4 * target) so the few relevant patches are not drowned by
    the many near-zero background ones. Horizontal flips double the data (relevance is
    flip-equivariant). Judged by keep-mask IoU with the teacher on held-out images.
    """
    sc = cfg.cmer.scorer
    frames = torch.as_tensor(frames)
    relevance = torch.as_tensor(relevance).float()
    if len(frames) != len(relevance):
        raise ValueError(f"train_scorer: {len(frames)} frames but {len(relevance)} relevance maps")
    if len(frames) < 8:
        raise CMGError(f"train_scorer: need at least 8 images, got {len(frames)}")
    if sc.extra_scenes > 0:
        frames, relevance = _with_extra_scenes(cfg, teacher, frames, relevance, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    t_start = time.perf_counter()

    gen = torch.Generator().manual_seed(cfg.seed + 7)
    order = torch.randperm(len(frames), generator=gen)
    n_val = max(4, int(round(0.15 * len(frames))))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    torch.manual_seed(cfg.seed + 7)
    scorer = CMERScorer(sc.channels, teacher.grid, teacher.image_size)
    with torch.no_grad():
        x_all = teacher.preprocess(frames)
    target_all = normalised_target(relevance)
    x_tr, y_tr = x_all[tr_idx], target_all[tr_idx]
    opt = torch.optim.AdamW(scorer.parameters(), lr=sc.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(tr_idx) / sc.batch_size))
    total = steps_per_epoch * sc.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sc.lr, total_steps=total, pct_start=0.1)
    losses: list[float] = []
    bar = tqdm(total=total, desc="cmer scorer", disable=not progress)
    step = 0
    for epoch in range(sc.epochs):
        scorer.train()
        perm = torch.randperm(len(tr_idx), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * sc.batch_size:(b + 1) * sc.batch_size]
            x, y = x_tr[idx], y_tr[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
            logits = scorer(x)
            loss = F.binary_cross_entropy_with_logits(logits, y, weight=1.0 + 4.0 * y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = loss.detach().item()
            losses.append(value)
            append_jsonl(log_path, {"stage": "cmer_scorer", "epoch": epoch, "step": step, "loss": value})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    scorer.eval()
    with torch.no_grad():
        pred_val = scorer(x_all[val_idx])
    t_keep = keep_mask_cfg(relevance[val_idx], cfg.cmer)
    s_keep = keep_mask_cfg(pred_val, cfg.cmer)
    k = max(1, steps_per_epoch)
    speed = speed_ratio(teacher, scorer, frames[val_idx[:16]])
    metrics = {
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "keep_iou": keep_iou(s_keep, t_keep),
        "keep_fraction_teacher": float(t_keep.mean()),
        "keep_fraction_scorer": float(s_keep.mean()),
        "train_images": len(tr_idx),
        "val_images": len(val_idx),
        "steps": step,
        "seconds": time.perf_counter() - t_start,
        **speed,
    }
    return scorer, metrics


def _with_extra_scenes(cfg: Config, teacher: Teacher, frames: Tensor, relevance: Tensor,
                       progress: bool) -> tuple[Tensor, Tensor]:
    """Append `scorer.extra_scenes` synthetic scenes of the product, labelled by the teacher."""
    from cmg import synth

    n = cfg.cmer.scorer.extra_scenes
    scenes = list(synth.random_scenes(n, cfg.data.image_size, cfg.seed + 3000,
                                      categories=(cfg.data.category,), clutter=True))
    extra = torch.from_numpy(np.stack([s.image for s in scenes]))
    text = teacher.encode_text([s.caption for s in scenes])
    rel = occlusion_relevance(teacher, extra, text, cfg.cmer.occlusion_batch, progress)
    return torch.cat([frames, extra]), torch.cat([relevance, rel])


# ---------------------------------------------------------------------------- metrics


def mask_quality(keep: Tensor, part: Tensor, clutter: Tensor, grid: int) -> dict:
    """Part pixel recall and share of clutter pixels removed.

    keep [N,G,G] grid masks; part, clutter [N,H,W] bool pixel masks (from the generator).
    Pooled over all pixels of all images.
    """
    part = torch.as_tensor(part).bool()
    clutter = torch.as_tensor(clutter).bool()
    if keep.shape[-1] != grid:
        raise ValueError(f"mask_quality: keep grid {keep.shape[-1]} != {grid}")
    kp = upsample_keep(keep, part.shape[-2:]).squeeze(1) > 0.5
    n_part, n_clutter = int(part.sum()), int(clutter.sum())
    return {
        "part_recall": float((kp & part).sum()) / n_part if n_part else None,  # no part pixels: undefined (JSON null)
        "clutter_removed": float((~kp & clutter).sum()) / n_clutter if n_clutter else None,  # clean data: no clutter to remove
        "keep_fraction": float(keep.float().mean()),
    }


def random_keep_like(keep: Tensor, seed: int = 0) -> Tensor:
    """Random masks keeping the same number of patches per image as `keep` (the control)."""
    gen = torch.Generator().manual_seed(seed)
    flat = keep.flatten(1) > 0.5
    counts = flat.sum(1)
    ranks = torch.rand(flat.shape, generator=gen).argsort(1).argsort(1)
    return (ranks < counts.unsqueeze(1)).float().reshape(keep.shape)


def cmer_metrics(teacher_scores: Tensor, part: Tensor, clutter: Tensor, cfg: CMERConfig,
                 scorer_scores: Tensor | None = None, seed: int = 0) -> dict:
    """What train.py reports for CMER on images with part/clutter masks.

    For the teacher's maps (and the scorer's when given): the relative rule with growth,
    top-rho, and a random mask with the relative mask's keep count; plus keep-mask IoU
    scorer vs teacher under the configured rule.
    """
    grid = teacher_scores.shape[-1]

    def rows(scores: Tensor) -> dict:
        rel = keep_mask(scores, "relative", cfg.alpha, cfg.rho, grow=True)
        return {
            "relative": mask_quality(rel, part, clutter, grid),
            "top_rho": mask_quality(keep_mask(scores, "top_rho", cfg.alpha, cfg.rho), part, clutter, grid),
            "random": mask_quality(random_keep_like(rel, seed), part, clutter, grid),
        }

    out = {"teacher": rows(teacher_scores), "alpha": cfg.alpha, "rho": cfg.rho, "images": len(teacher_scores)}
    if scorer_scores is not None:
        out["scorer"] = rows(scorer_scores)
        out["keep_iou"] = keep_iou(keep_mask_cfg(scorer_scores, cfg), keep_mask_cfg(teacher_scores, cfg))
    return out


def cmer_report(cfg: Config, ds, samples: list, frames: Tensor, relevance: Tensor,
                scores: Tensor | None = None) -> dict:
    """cmer_metrics on dataset samples, reading their part/clutter masks from the folder.

    Returns {} (with a reason) when the folder has no part/clutter masks (real data).
    """
    size = (int(frames.shape[1]), int(frames.shape[2]))
    parts, clutters = [], []
    for s in samples:
        p, c = ds.part_mask(s, size), ds.clutter_mask(s, size)
        if p is None or c is None:
            return {"mask_quality": "skipped: no part/clutter masks in the data folder"}
        parts.append(np.asarray(p, dtype=bool))
        clutters.append(np.asarray(c, dtype=bool))
    if not parts:
        return {"mask_quality": "skipped: no images"}
    part = torch.from_numpy(np.stack(parts))
    clutter = torch.from_numpy(np.stack(clutters))
    return cmer_metrics(torch.as_tensor(relevance), part, clutter, cfg.cmer,
                        None if scores is None else torch.as_tensor(scores), seed=cfg.seed)
