"""Training the offline teacher's image side (the projection over the frozen backbone, or the
scratch CNN) on the user's image-caption pairs.

The text side is frozen (a pretrained sentence encoder), so the image tower learns to
land each image next to its own caption (open_clip's ClipLoss over the batch). The
augmentations keep what captions state true: small shifts and brightness changes, no
flips or rotations (captions name pose and position). Occlusion practice fills random
grid patches with the mean (0 after normalisation): CMER later asks the teacher about
filled patches, and a teacher that never saw one reacts to any fill instead of to the
loss of what the caption describes.
"""

from __future__ import annotations

import math
import sys

import torch
from open_clip.loss import ClipLoss
from torch import Tensor

from cmg.config import Config
from cmg_train.loop import fit
from cmg_train.masking import apply_mask
from cmg_train.preprocess import Preprocess
from cmg_train.teacher.model import Teacher, build_teacher, retrieval_top1


def random_keep(batch: int, grid: int, share: float, prob: float, gen: torch.Generator) -> Tensor:
    """[B,G,G] keep masks: in a `prob` share of images, up to `share` of the patches dropped."""
    p = grid * grid
    count = torch.randint(1, max(2, int(share * p) + 1), (batch, 1), generator=gen)
    count = count * (torch.rand(batch, 1, generator=gen) < prob)
    ranks = torch.rand(batch, p, generator=gen).argsort(1).argsort(1)
    return (ranks >= count).float().view(batch, grid, grid)


def train_teacher(cfg: Config, frames: Tensor, captions: list[str], train_idx: Tensor, val_idx: Tensor,
                  progress: bool = True, log=None) -> tuple[Teacher, dict]:
    """A scratch teacher trained on frames[train_idx] (or an open_clip one, used as is);
    metrics include image->caption retrieval on the held-out val_idx pairs."""
    tc = cfg.teacher
    size = cfg.data.image_size
    frames = torch.as_tensor(frames)
    if tc.source == "open_clip":
        teacher = build_teacher(tc, size)
        text = teacher.encode_text([captions[i] for i in val_idx.tolist()])
        return teacher, {"source": tc.source, "retrieval_top1": retrieval_top1(teacher, frames[val_idx], text)}

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pp = Preprocess.fit(frames[train_idx])
    teacher = build_teacher(tc, size, pp.mean, pp.std, backbone=cfg.backbone, grid=cfg.grid)
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    text_bank = teacher.encode_text(unique)
    text = text_bank[torch.tensor([row[c] for c in captions])]
    x_all = teacher.preprocess(frames)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    loss_fn = ClipLoss()
    n = len(train_idx)
    batch = min(tc.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    order: list[Tensor] = []

    def step_fn(step: int):
        if step % steps_per_epoch == 0:
            order[:] = [train_idx[torch.randperm(n, generator=gen)]]
        idx = order[0][(step % steps_per_epoch) * batch:(step % steps_per_epoch + 1) * batch]
        x = x_all[idx]
        dy, dx = (int(v) for v in torch.randint(-tc.shift, tc.shift + 1, (2,), generator=gen))
        x = torch.roll(x, (dy, dx), (2, 3))
        x = x * (1 + tc.brightness * (2 * torch.rand(len(idx), 1, 1, 1, generator=gen) - 1))
        x = apply_mask(x, random_keep(len(idx), cfg.grid, tc.fill_max_share, tc.fill_prob, gen))
        img = teacher.encode_image(x)
        return loss_fn(img, text[idx], logit_scale.exp())

    def clamp_scale() -> None:  # as in CLIP: keep the temperature bounded
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))

    teacher.train()
    trainable = [p for p in teacher.visual.parameters() if p.requires_grad]  # a backbone stays frozen
    stats = fit(trainable + [logit_scale], tc.steps, tc.lr,
                step_fn, desc="teacher", progress=progress, log=log, weight_decay=0.05,
                after_step=clamp_scale)
    teacher.eval().requires_grad_(False)
    val_text = text[val_idx]
    metrics = {
        "source": tc.source,
        "retrieval_top1": retrieval_top1(teacher, frames[val_idx], val_text),
        "retrieval_top1_train": retrieval_top1(teacher, frames[train_idx[:len(val_idx)]],
                                               text[train_idx[:len(val_idx)]]),
        "retrieval_chance": 1.0 / max(1, min(32, len(val_idx))),
        "unique_captions": len(unique),
        "loss_first": stats["loss_first"],
        "loss_last": stats["loss_last"],
        "loss_chance": math.log(batch),
        "learned_from_captions": learned_from_captions(stats["loss_last"], batch),
        "steps": stats["steps"],
        "mean": pp.mean,
        "std": pp.std,
    }
    if batch < 2:
        print("warning: the teacher trained on batches of 1 image, where a caption has no other to be told "
              "apart from: it learned nothing from the captions (teacher.batch_size, or more training images)",
              file=sys.stderr)
    elif not metrics["learned_from_captions"]:
        print(f"warning: the teacher learned nothing from the captions: its contrastive loss ended at "
              f"{stats['loss_last']:.3f}, chance is log(batch) = {math.log(batch):.3f} ({len(unique)} distinct "
              "captions). The keep-mask and CMLE then carry no language: give captions that say what differs "
              "between the training images (`cmg captions`, docs/guide.md)", file=sys.stderr)
    return teacher, metrics


def learned_from_captions(loss_last: float, batch: int) -> bool:
    """Whether the contrastive loss left chance (log(batch): every caption as likely as any
    other). Captions that do not tell the images apart (one product prompt for every image)
    keep it there, and the attention weights the keep-mask is distilled from are then shaped
    by no caption at all; 10% below chance is well inside what any real caption set reaches
    (the tiny run ends near a third of chance)."""
    return batch > 1 and loss_last < 0.9 * math.log(batch)
