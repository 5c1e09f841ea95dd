"""Training the local anomaly model on the user's normal images and their synthetic anomalies.

Each step: random normal images under a random rotation by 90 degrees and flip, a random
crop (centred on a pixel the CMER keep-mask kept when placement is `keep`, so practice
happens where the product is), a synthetic anomaly in half of them, and a loss that
segments it (BCE weighted towards the rare positive pixels, plus soft Dice, as in DRAEM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor

from cmg.config import Config
from cmg_train.augment import dihedral
from cmg_train.local import anomalies
from cmg_train.local.model import LocalNet, anomaly_probability
from cmg_train.loop import fit
from cmg_train.preprocess import Preprocess


def _crops(x: Tensor, size: int, centre_weight: Tensor | None, gen: torch.Generator) -> Tensor:
    """One size x size crop per image [B,C,H,W]; centres drawn from `centre_weight` [B,H*W]
    (uniform when None), jittered by a quarter crop."""
    b, _, h, w = x.shape
    if size >= h and size >= w:
        return x
    weight = torch.ones(b, h * w) if centre_weight is None else centre_weight + 1e-3
    c = torch.multinomial(weight, 1, generator=gen)[:, 0]
    jitter = torch.randint(-(size // 4), size // 4 + 1, (2, b), generator=gen)
    top = (c // w + jitter[0] - size // 2).clamp(0, h - size)
    left = (c % w + jitter[1] - size // 2).clamp(0, w - size)
    corners = zip(top.tolist(), left.tolist(), strict=True)
    return torch.stack([x[i, :, y:y + size, z:z + size] for i, (y, z) in enumerate(corners)])


def segmentation_loss(logits: Tensor, mask: Tensor, pos_weight: float = 4.0) -> Tensor:
    """BCE (positives weighted) + soft Dice over the batch; mask max-pooled to the logits' size."""
    mask = F.adaptive_max_pool2d(mask, logits.shape[-2:])
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, mask, pos_weight=torch.tensor(pos_weight))
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    return bce + dice


def train_local(cfg: Config, preprocess: Preprocess, frames: Tensor, allowed: Tensor | None = None,
                progress: bool = True, log=None) -> tuple[LocalNet, dict]:
    """frames uint8 [N,H,W,3] normal training images; allowed [N,1,H,W] float keep-masks (or None:
    anomalies and crops anywhere) -> the trained LocalNet and its training metrics."""
    lc = cfg.local
    torch.manual_seed(cfg.seed + 11)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    images = Preprocess.to_unit(frames)
    h = images.shape[-1]
    crop = min(lc.crop, h)
    stack = images if allowed is None else torch.cat([images, allowed.float()], 1)
    shapes = anomalies.random_shapes(lc.shapes, crop, gen)
    net = LocalNet(lc.channels)
    batch = lc.batch_size

    def step_fn(step: int):
        idx = torch.randint(len(stack), (batch,), generator=gen)
        (x,) = dihedral(gen, stack[idx])
        centres = None if allowed is None else x[:, 3].flatten(1)
        x = _crops(x, crop, centres, gen)
        where = None if allowed is None else x[:, 3:]
        x = x[:, :3]
        x = torch.where(torch.rand(batch, 1, 1, 1, generator=gen) < 0.3, anomalies.colour_jitter(x, gen, 0.5), x)
        xa, mask = anomalies.synthesize(x, anomalies.draw_shapes(shapes, batch, gen), gen, lc.anomaly_prob, where)
        return segmentation_loss(net(preprocess.from_unit(xa)), mask)

    net.train()
    stats = fit(net.parameters(), lc.steps, lc.lr, step_fn, desc="local model", progress=progress, log=log)
    net.eval().requires_grad_(False)
    return net, {"loss_first": stats["loss_first"], "loss_last": stats["loss_last"], "steps": stats["steps"],
                 "crop": crop, "placement": "keep" if allowed is not None else "uniform"}


@torch.no_grad()
def synthetic_check(net: LocalNet, preprocess: Preprocess, frames: Tensor, seed: int, pool: int,
                    allowed: Tensor | None = None) -> dict:
    """Pixel and image AUROC on synthetic anomalies pasted onto held-out normal images
    (inside `allowed` where given, as in training).

    Needs no labelled defects: a user sees whether the model learned its task at all.
    (It measures the training task, not real defects: read it as an upper bound.)
    """
    gen = torch.Generator().manual_seed(seed + 99)
    images = Preprocess.to_unit(frames)
    shapes = anomalies.random_shapes(len(images), images.shape[-1], gen)
    xa, mask = anomalies.synthesize(images, shapes.float(), gen, prob=1.0, allowed=allowed)
    both = torch.cat([images, xa])
    p = anomaly_probability(net, preprocess.from_unit(both), pool)
    labels = torch.cat([torch.zeros(len(images)), (mask.flatten(1).amax(1) > 0).float()])
    gt = F.adaptive_max_pool2d(torch.cat([torch.zeros_like(mask), mask]), p.shape[-2:])
    positive = gt.flatten().numpy() > 0.5
    out: dict = {"pixel_auroc": None, "image_auroc": None}  # None: no synthetic anomaly survived
    if 0 < positive.sum() < positive.size:
        out["pixel_auroc"] = float(roc_auc_score(positive, p.flatten().numpy()))
    if 0 < labels.sum() < len(labels):
        out["image_auroc"] = float(roc_auc_score(labels.numpy(), p.flatten(1).amax(1).numpy()))
    return out
