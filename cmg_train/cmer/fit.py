"""CMER training: the teacher's occlusion relevance (the paper's P+1 passes) and the
distillation of those maps into the one-pass scorer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from cmg.config import Config
from cmg.errors import CMGError
from cmg_train.augment import dihedral
from cmg_train.cmer.model import (
    CMERScorer,
    keep_mask_cfg,
    occluded_embeddings,
    occlusion_masks,
    relevance_maps,
)
from cmg_train.cmer.report import keep_iou
from cmg_train.loop import batched, fit
from cmg_train.teacher.model import AttentionTower, Teacher


@torch.no_grad()
def occlusion_relevance(teacher: Teacher, frames: Tensor, text_emb: Tensor, grid: int, batch: int = 512,
                        progress: bool = False) -> Tensor:
    """r_i = s(x) - s(x with patch i filled), P+1 teacher passes per image, batched.

    frames uint8 [N,H,W,3], text_emb [N,E] (each image's own caption) -> [N,G,G] on CPU.
    Filling = multiplying the normalised image by 0, i.e. the dataset mean.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"occlusion_relevance: frames must be [N,H,W,3], got {list(frames.shape)}")
    if len(text_emb) != len(frames):
        raise ValueError(f"occlusion_relevance: {len(frames)} frames but {len(text_emb)} text embeddings")
    device = teacher.device
    masks = occlusion_masks(grid, frames.shape[1]).to(device)
    per = masks.shape[0]
    chunk = max(1, batch // per)  # images per forward, so a forward holds ~`batch` copies
    text_emb = text_emb.to(device)
    out = []
    for i in tqdm(range(0, len(frames), chunk), desc="occlusion relevance", disable=not progress,
                  leave=False):
        x = teacher.preprocess(frames[i:i + chunk].to(device))
        emb = occluded_embeddings(teacher, x, masks, per, int(text_emb.shape[1]))
        out.append(relevance_maps(emb, text_emb[i:i + chunk], grid).cpu())
    return torch.cat(out) if out else torch.zeros(0, grid, grid)


@torch.no_grad()
def attention_relevance(teacher: Teacher, frames: Tensor, grid: int, batch: int = 256) -> Tensor:
    """The attention teacher's cell weights, [N,G,G] on CPU: which cells its caption-matched
    embedding draws on, in one pass per image. Why not occlusion on it: filling a cell also
    changes its neighbours' features and the softmax re-spreads the weight, so the maps were
    noisier (own gear line, seed 0: part recall 0.89 at 66% of the frame kept, against 1.00
    at 51% from the weights; docs/results.md)."""
    visual = teacher.visual
    if not isinstance(visual, AttentionTower):
        raise CMGError(f"cmer.relevance attention: the teacher's image side is {type(visual).__name__}, "
                       f"not the attention tower (teacher.pool: attention)")
    frames = torch.as_tensor(frames)
    if not len(frames):
        return torch.zeros(0, grid, grid)
    (weight,) = batched(lambda f: visual.cells(teacher.preprocess(f.to(teacher.device)))[1].cpu(), frames,
                        batch_size=batch)
    return weight.view(-1, grid, grid)


def normalised_target(relevance: Tensor) -> Tensor:
    """r / max r clipped to [0, 1] per image; all ones when max <= 0 (the keep rule keeps all)."""
    peak = relevance.amax(dim=(1, 2), keepdim=True)
    target = (relevance / peak.clamp_min(1e-12)).clamp(0, 1)
    return torch.where(peak > 0, target, torch.ones_like(target))


MIN_IMAGES = 8  # the scorer holds out max(4, 15%) of what it gets to judge keep-mask IoU


def train_scorer(cfg: Config, teacher: Teacher, frames: Tensor, relevance: Tensor, progress: bool = True,
                 log=None) -> tuple[CMERScorer, dict]:
    """Distil the occlusion maps into a one-pass scorer.

    Loss: BCE on per-image normalised maps (r / max r, clipped), weighted towards the
    meaningful patches (1 + 4 * target) so the few relevant patches are not drowned by the
    many near-zero ones. Rotations and flips of (image, map) pairs multiply the data: the
    relevance of a pixel moves with it, whatever the caption would then say. Judged by
    keep-mask IoU with the teacher on 15% of the images it did not train on.
    """
    sc = cfg.cmer.scorer
    frames = torch.as_tensor(frames)
    relevance = torch.as_tensor(relevance).float()
    if len(frames) != len(relevance):
        raise ValueError(f"train_scorer: {len(frames)} frames but {len(relevance)} relevance maps")
    if len(frames) < MIN_IMAGES:
        raise CMGError(f"train_scorer: need at least {MIN_IMAGES} images, got {len(frames)}")
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    order = torch.randperm(len(frames), generator=gen)
    n_val = max(4, int(round(0.15 * len(frames))))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    torch.manual_seed(cfg.seed + 7)
    scorer = CMERScorer(sc.channels, cfg.grid, cfg.data.image_size)
    with torch.no_grad():
        x_all = teacher.preprocess(frames)
    target = normalised_target(relevance)
    batch = min(sc.batch_size, len(tr_idx))

    def step_fn(step: int):
        idx = tr_idx[torch.randint(len(tr_idx), (batch,), generator=gen)]
        x, y = dihedral(gen, x_all[idx], target[idx])
        logits = scorer(x)
        return F.binary_cross_entropy_with_logits(logits, y, weight=1.0 + 4.0 * y)

    scorer.train()
    stats = fit(scorer.parameters(), sc.steps, sc.lr, step_fn, desc="cmer scorer", progress=progress, log=log)
    scorer.eval().requires_grad_(False)
    with torch.no_grad():
        pred = torch.sigmoid(scorer(x_all[val_idx]))  # as ScorerGraph serves it
    t_keep, s_keep = keep_mask_cfg(relevance[val_idx], cfg.cmer), keep_mask_cfg(pred, cfg.cmer)
    metrics = {
        "loss_first": stats["loss_first"],
        "loss_last": stats["loss_last"],
        "keep_iou": keep_iou(s_keep, t_keep),
        "keep_fraction_teacher": float(t_keep.mean()),
        "keep_fraction_scorer": float(s_keep.mean()),
        "train_images": len(tr_idx),
        "val_images": len(val_idx),
        "steps": stats["steps"],
    }
    return scorer, metrics
