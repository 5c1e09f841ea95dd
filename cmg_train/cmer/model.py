"""CMER's exported pieces: the keep rule and fill, the one-pass scorer, the exact-mode graph.

Everything here is a torch module or a pure tensor function made of export-friendly ops
(ReduceMax, Greater, MaxPool, TopK, ScatterElements, Resize-nearest, Mul), so the serving
graphs apply the keep-mask in-engine. Training lives in cmer/fit.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg.config import CMERConfig
from cmg_train.preprocess import Preprocess
from cmg_train.teacher.model import Teacher, conv_bn_relu, coord_channels

# ----------------------------------------------------------------------- keep-mask rule


def keep_mask(scores: Tensor, rule: str = "relative", alpha: float = 0.2, rho: float = 0.4,
              grow: bool = True) -> Tensor:
    """[B,G,G] relevance -> float {0,1} [B,G,G] keep mask.

    relative: r > alpha * max(r) per image (all kept when max <= 0: nothing is relevant, so
    nothing may be discarded), grown by one patch (3x3 max-pool) when `grow`.
    top_rho: exactly the top round(rho*P) patches (TopK indices scattered into a zero map,
    so ties at the noise floor cannot inflate it): a fixed fraction, never grown.
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


# ------------------------------------------------------------------ occlusion (exact mode)


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


class OcclusionTeacher(nn.Module):
    """Exact mode as ONE exportable graph: uint8 frames -> PATCH_SCORES [B,G,G].

    Builds the P+1 occluded copies in-graph (constant keep masks, one multiply), retrieves
    the best-matching training caption from a constant caption-embedding bank [C,E] (argmax
    of similarity with the unoccluded image) and scores all copies against it:
    r_i = s(x) - s(x with patch i filled).
    """

    def __init__(self, teacher: Teacher, caption_bank: Tensor, grid: int):
        super().__init__()
        if caption_bank.ndim != 2 or caption_bank.shape[0] < 1:
            raise ValueError(f"OcclusionTeacher: caption bank must be [C,E], got {list(caption_bank.shape)}")
        self.teacher = teacher
        self.grid = int(grid)
        self.register_buffer("masks", occlusion_masks(self.grid, teacher.image_size))
        self.register_buffer("bank", F.normalize(caption_bank.detach().float(), dim=-1))

    def forward(self, frames: Tensor) -> Tensor:
        emb = occluded_embeddings(self.teacher, self.teacher.preprocess(frames), self.masks,
                                  self.grid * self.grid + 1, int(self.bank.shape[1]))
        best = torch.argmax(emb[:, 0] @ self.bank.T, dim=1)
        return relevance_maps(emb, self.bank[best], self.grid)


def occluded_embeddings(teacher: Teacher, x: Tensor, masks: Tensor, per: int, dim: int) -> Tensor:
    """Teacher embeddings [B,per,dim] of normalised frames x [B,3,H,W] under each of the `per`
    masks [per,1,H,W] (the first keeps everything): the P+1 passes of occlusion relevance.
    Sizes are python ints, so a traced graph has static non-batch dims (TensorRT profiles)."""
    size = teacher.image_size
    copies = (x.unsqueeze(1) * masks.unsqueeze(0)).reshape(-1, 3, size, size)
    return teacher.encode_image(copies).reshape(-1, per, dim)


def relevance_maps(emb: Tensor, text: Tensor, grid: int) -> Tensor:
    """r_i = s(x) - s(x with patch i filled), s = embedding . text [B,E]: maps [B,G,G]."""
    s = (emb * text.unsqueeze(1)).sum(-1)                                # [B,P+1]
    return (s[:, :1] - s[:, 1:]).reshape(-1, grid, grid)


# --------------------------------------------------------------------------- the scorer


class CMERScorer(nn.Module):
    """One-pass student: normalised NCHW -> relevance logits [B,G,G] (higher = keep).

    A small CNN with coordinate channels (captions talk about position): stride-2 stages
    while the map stays a multiple of G, average-pooled to G x G, then two 3x3 convs at
    G x G for context, then a 1x1 head. No text: one repository serves one product line.
    """

    def __init__(self, channels: list[int], grid: int, image_size: int):
        super().__init__()
        if image_size % grid:
            raise ValueError(f"CMERScorer: image_size {image_size} not a multiple of grid {grid}")
        self.grid, self.image_size, self.channels = int(grid), int(image_size), list(channels)
        layers: list[nn.Module] = []
        cin, res = 5, image_size
        for cout in channels:
            stride = 2 if res // 2 >= grid and (res // 2) % grid == 0 else 1
            layers.append(conv_bn_relu(cin, cout, stride))
            cin, res = cout, res // stride
        self.features = nn.Sequential(*layers)
        self.pool = res // grid
        self.context = nn.Sequential(conv_bn_relu(cin, cin, dilation=2), conv_bn_relu(cin, cin))
        self.head = nn.Conv2d(2 * cin, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(coord_channels(x))
        if self.pool > 1:
            f = F.avg_pool2d(f, self.pool)
        return self.head(torch.cat([f, self.context(f)], dim=1)).squeeze(1)


class ScorerGraph(nn.Module):
    """uint8 frames -> PATCH_SCORES: the one normalisation + the scorer (what cmer_scorer serves).

    Scores are sigmoid(logits), i.e. the scorer's estimate of r / max r in [0, 1] (its
    training target): the keep rule `r > alpha * max r` then means the same on the
    scorer's maps as on the teacher's. (On raw logits it kept only patches whose
    estimate exceeded ~0.6 instead of 0.2 x the peak: a third of the image, and 42% of
    the defect pixels lost.)
    """

    def __init__(self, preprocess: Preprocess, scorer: CMERScorer):
        super().__init__()
        self.preprocess, self.scorer = preprocess, scorer

    def forward(self, frames: Tensor) -> Tensor:
        return torch.sigmoid(self.scorer(self.preprocess(frames)))


def scorer_state(scorer: CMERScorer) -> dict:
    return {"channels": scorer.channels, "grid": scorer.grid, "image_size": scorer.image_size,
            "state_dict": {k: v.detach().cpu() for k, v in scorer.state_dict().items()}}


def scorer_from_state(state: dict) -> CMERScorer:
    scorer = CMERScorer(state["channels"], state["grid"], state["image_size"])
    scorer.load_state_dict(state["state_dict"])
    return scorer.eval()
