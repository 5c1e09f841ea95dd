"""The CLIP teacher: an open_clip model plus the one frame normalisation.

The teacher scores image-caption agreement for CMER (occlusion relevance) and its
visual tower is the pretrained feature extractor of the CMLE encoder. Users bring any
open_clip architecture with pretrained weights; CI and the offline presets train a
small one here from synthetic image-caption pairs with open_clip's ClipLoss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmg.config import Config, TeacherConfig
from cmg.errors import CMGError
from cmg_train.runlog import append_jsonl

VOCAB_SIZE = 49408  # open_clip's BPE vocabulary (SimpleTokenizer)
# Occlusion augmentation while training from scratch: this share of each batch gets up
# to FILL_MAX_SHARE of its patches filled with the dataset mean. CMER then queries the
# teacher with filled patches; a teacher that never saw one reacts to any fill (noise
# everywhere) instead of to losing the caption's content.
FILL_PROB = 0.5
FILL_MAX_SHARE = 0.25


@contextlib.contextmanager
def _exportable_attention():
    """While tracing (ONNX export), keep nn.MultiheadAttention off its fused fast path.

    A frozen teacher in eval mode takes the fast path (aten::_native_multi_head_attention),
    which torch.onnx cannot export; eager inference keeps the faster kernel.
    """
    if not torch.jit.is_tracing():
        yield
        return
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class Preprocess(nn.Module):
    """uint8 NHWC frames -> normalised float NCHW.

    The ONE normalisation: training, eval and ONNX export all call it, so the exported
    graphs start from UINT8 frames. After it, 0 is the dataset mean, which makes 0 the
    fill value of CMER masking.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"Preprocess: mean/std need 3 channel values, got {mean} / {std}")
        if min(std) <= 0:
            raise ValueError(f"Preprocess: std must be positive, got {std}")
        # Folded into one multiply-add per channel on the 0..255 scale.
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1))

    @property
    def mean(self) -> list[float]:
        std = self.std
        return [float(-sh * sd) for sh, sd in zip(self.shift.flatten(), std, strict=True)]

    @property
    def std(self) -> list[float]:
        return [float(1.0 / (255.0 * s)) for s in self.scale.flatten()]

    def forward(self, frames: Tensor) -> Tensor:
        # Cast before permuting: TensorRT allows UINT8 only at the network boundary.
        x = frames.to(torch.float32).permute(0, 3, 1, 2)
        return x * self.scale + self.shift


class Teacher(nn.Module):
    """An open_clip CLIP model with its preprocessing, tokenizer and patch grid."""

    def __init__(self, clip: CLIP, preprocess: Preprocess, tokenizer: Any, cfg: TeacherConfig,
                 image_size: int):
        super().__init__()
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise CMGError(
                f"teacher: open_clip visual tower {type(visual).__name__} is not a ViT; "
                "CMER needs a patch grid (use a ViT architecture)"
            )
        if visual.attn_pool is not None:
            raise CMGError("teacher: attentional-pool ViTs (CoCa) are not supported; use a CLIP ViT")
        self.clip = clip
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_size = int(image_size)
        gh, gw = visual.grid_size
        if gh != gw:
            raise CMGError(f"teacher: non-square patch grid {gh}x{gw}")
        self.grid = int(gh)
        self.patch_size = self.image_size // self.grid
        self.embed_dim = int(visual.output_dim)
        self.width = int(visual.transformer.width)

    @property
    def device(self) -> torch.device:
        return self.preprocess.scale.device

    def encode_image(self, x: Tensor) -> Tensor:
        """Normalised NCHW -> [B, E] L2-normalised image embedding."""
        with _exportable_attention():
            return F.normalize(self.clip.encode_image(x), dim=-1)

    @torch.no_grad()
    def encode_text(self, captions: list[str], batch_size: int = 256) -> Tensor:
        """Captions -> [N, E] L2-normalised text embeddings (no grad, on the teacher's device)."""
        if not captions:
            return torch.zeros(0, self.embed_dim, device=self.device)
        out = []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(list(captions[i:i + batch_size])).to(self.device)
            out.append(F.normalize(self.clip.encode_text(tokens), dim=-1))
        return torch.cat(out)

    def visual_features(self, x: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
        """(image embedding [B, E] L2-normalised, identical to encode_image;
        patch tokens [B, G*G, width] taken after resblock `layer` (-1 = last, after ln_post)).

        Walks open_clip's VisionTransformer modules one by one (instead of calling it)
        so the intermediate tokens come out of the same pass and the graph stays
        traceable by torch.onnx.export with a dynamic batch.
        """
        v = self.clip.visual
        blocks = v.transformer.resblocks
        n = len(blocks)
        if not -n <= layer < n:
            raise ValueError(f"visual_features: layer {layer} out of range for {n} resblocks")
        take = layer % n
        h = v.conv1(x)                                   # [B, width, G, G]
        h = h.flatten(2).transpose(1, 2)                 # [B, G*G, width]
        cls = v.class_embedding.to(h.dtype).view(1, 1, -1).expand(h.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1) + v.positional_embedding.to(h.dtype)
        h = v.patch_dropout(h)
        h = v.ln_pre(h)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            h = h.transpose(0, 1)
        tokens = h
        with _exportable_attention():
            for i, blk in enumerate(blocks):
                h = blk(h)
                if i == take:
                    tokens = h
        if not batch_first:
            h = h.transpose(0, 1)
            tokens = tokens.transpose(0, 1)
        pooled, last_tokens = v._pool(h)
        # the last block's tokens come after ln_post (as the model applies it to tokens)
        tokens = last_tokens if take == n - 1 else tokens[:, 1:]
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1), tokens

    def forward(self, frames: Tensor) -> Tensor:
        """uint8 NHWC frames -> image embeddings (a convenience for callers and export)."""
        return self.encode_image(self.preprocess(frames))


def _scratch_clip(cfg: TeacherConfig, image_size: int) -> CLIP:
    if cfg.width % cfg.heads or cfg.text_width % cfg.text_heads:
        raise CMGError(
            f"teacher: width {cfg.width}/{cfg.text_width} not divisible by heads "
            f"{cfg.heads}/{cfg.text_heads}"
        )
    vision = CLIPVisionCfg(
        layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
        patch_size=cfg.patch_size, image_size=image_size,
    )
    text = CLIPTextCfg(
        context_length=cfg.context_length, vocab_size=VOCAB_SIZE, width=cfg.text_width,
        heads=cfg.text_heads, layers=cfg.text_layers,
    )
    return CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)


def _open_clip_model(cfg: TeacherConfig, image_size: int, load_weights: bool) -> tuple[CLIP, Any, Any]:
    if not cfg.arch:
        raise CMGError("teacher: source open_clip needs teacher.arch (e.g. ViT-B-32)")
    weights = None
    if load_weights:
        weights = cfg.checkpoint or cfg.pretrained
        if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {cfg.checkpoint}")
    try:
        model = open_clip.create_model(cfg.arch, pretrained=weights, force_image_size=image_size)
    except RuntimeError as exc:  # unknown tag, missing cache without network, ...
        raise CMGError(f"teacher: cannot create open_clip {cfg.arch} ({weights}): {exc}") from exc
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    return model, pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD)


def build_teacher(cfg: TeacherConfig, image_size: int, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, load_weights: bool = True) -> Teacher:
    """Build (untrained scratch, or open_clip with weights) without any training."""
    if image_size % cfg.patch_size and cfg.source == "scratch":
        raise CMGError(f"teacher: image_size {image_size} not a multiple of patch_size {cfg.patch_size}")
    if cfg.source == "scratch":
        clip = _scratch_clip(cfg, image_size)
        tokenizer = SimpleTokenizer(context_length=cfg.context_length)
        if mean is None or std is None:
            mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    elif cfg.source == "open_clip":
        clip, m, s = _open_clip_model(cfg, image_size, load_weights)
        tokenizer = open_clip.get_tokenizer(cfg.arch)
        mean = m if mean is None else mean
        std = s if std is None else std
    else:
        raise CMGError(f"teacher: unknown source {cfg.source!r} (scratch | open_clip)")
    teacher = Teacher(clip, Preprocess(mean, std), tokenizer, cfg, image_size)
    return teacher.eval()


def teacher_state(teacher: Teacher) -> dict:
    """Everything needed to rebuild the teacher from RUN/checkpoint.pt (no network)."""
    return {
        "config": dataclasses.asdict(teacher.cfg),
        "image_size": teacher.image_size,
        "mean": teacher.preprocess.mean,
        "std": teacher.preprocess.std,
        "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
    }


def teacher_from_state(state: dict) -> Teacher:
    """Inverse of teacher_state: the architecture from the config, then the saved weights."""
    try:
        cfg = TeacherConfig(**state["config"])
        teacher = build_teacher(cfg, int(state["image_size"]), state["mean"], state["std"],
                                load_weights=False)
        teacher.load_state_dict(state["state_dict"])
    except KeyError as exc:
        raise CMGError(f"teacher state: missing key {exc}") from exc
    return teacher.eval()


# ---------------------------------------------------------------- training from scratch


def _scenes(n: int, size: int, seed: int, progress: bool, desc: str) -> tuple[np.ndarray, list[str]]:
    from cmg import synth  # numpy/PIL only; imported here so loading a teacher never needs it

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    it = synth.random_scenes(n, size, seed, clutter=True)
    for i, scene in enumerate(tqdm(it, total=n, desc=desc, disable=not progress, leave=False)):
        images[i] = scene.image
        captions.append(scene.caption)
    return images, captions


@torch.no_grad()
def retrieval_metrics(teacher: Teacher, frames: np.ndarray | Tensor, captions: list[str],
                      batch: int = 64) -> dict:
    """Image->text top-1 retrieval within held-out batches of `batch` (default 64).

    `top1` counts only the image's own caption; `top1_dup` also accepts any caption with
    the same text (synthetic captions repeat, and the model cannot tell those apart).
    """
    teacher.eval()
    frames = torch.as_tensor(frames)
    hits = dup_hits = total = 0
    for i in range(0, len(captions) - batch + 1, batch):
        caps = captions[i:i + batch]
        img = teacher.encode_image(teacher.preprocess(frames[i:i + batch].to(teacher.device)))
        txt = teacher.encode_text(caps)
        best = (img @ txt.T).argmax(dim=1).tolist()
        hits += sum(int(b == j) for j, b in enumerate(best))
        dup_hits += sum(int(caps[b] == caps[j]) for j, b in enumerate(best))
        total += len(caps)
    if total == 0:
        raise CMGError(f"retrieval: need at least {batch} held-out pairs, got {len(captions)}")
    return {"top1": hits / total, "top1_dup": dup_hits / total, "pairs": total, "batch": batch}


def _random_fill(x: Tensor, grid: int, gen: torch.Generator) -> Tensor:
    """Fill random patches (value 0 = dataset mean) in a random FILL_PROB share of the images."""
    b, p = x.shape[0], grid * grid
    count = torch.randint(1, max(2, int(FILL_MAX_SHARE * p) + 1), (b, 1), generator=gen)
    count = count * (torch.rand(b, 1, generator=gen) < FILL_PROB)
    ranks = torch.rand(b, p, generator=gen).argsort(1).argsort(1)
    keep = (ranks >= count).float().view(b, 1, grid, grid)
    return x * F.interpolate(keep, size=x.shape[-2:], mode="nearest")


def train_teacher(cfg: Config, out_dir: Path, progress: bool = True) -> tuple[Teacher, dict]:
    """Train a scratch teacher on synthetic scenes of ALL categories (or build an open_clip one).

    All categories rather than the product's normal set: a more varied caption space
    teaches the text tower which words matter, which is what occlusion relevance reads.
    """
    tc = cfg.teacher
    size = cfg.data.image_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tc.source != "scratch":
        return build_teacher(tc, size), {}

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    n_eval = min(640, max(64, tc.scenes // 4 // 64 * 64))  # up to ten held-out batches of 64
    images, captions = _scenes(tc.scenes, size, cfg.seed + 1000, progress, "teacher scenes")
    ev_images, ev_captions = _scenes(n_eval, size, cfg.seed + 2000, progress, "held-out scenes")
    pix = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pix.mean(0).tolist(), np.maximum(pix.std(0), 1e-3).tolist()
    teacher = build_teacher(tc, size, mean, std)
    tokens = teacher.tokenizer(captions)
    frames = torch.from_numpy(images)

    params_decay = [p for n, p in teacher.clip.named_parameters() if p.ndim >= 2]
    params_other = [p for n, p in teacher.clip.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([
        {"params": params_decay, "weight_decay": 0.1},
        {"params": params_other, "weight_decay": 0.0},
    ], lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = max(1, tc.scenes // tc.batch_size)
    total = steps_per_epoch * tc.epochs
    warmup = max(1, total // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    loss_fn = ClipLoss()
    log_path = out_dir / "train_log.jsonl"
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    epoch_losses: list[float] = []
    bar = tqdm(total=total, desc="teacher", disable=not progress)
    teacher.train()
    step = 0
    for epoch in range(tc.epochs):
        order = torch.randperm(len(captions), generator=gen)
        ep = []
        for b in range(steps_per_epoch):
            idx = order[b * tc.batch_size:(b + 1) * tc.batch_size]
            x = _random_fill(teacher.preprocess(frames[idx]), teacher.grid, gen)
            img = F.normalize(teacher.clip.encode_image(x), dim=-1)
            txt = F.normalize(teacher.clip.encode_text(tokens[idx]), dim=-1)
            loss = loss_fn(img, txt, teacher.clip.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(teacher.clip.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():  # as in CLIP: keep the temperature bounded
                teacher.clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            value = loss.detach().item()
            losses.append(value)
            ep.append(value)
            append_jsonl(log_path, {"stage": "teacher", "epoch": epoch, "step": step, "loss": value})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        epoch_losses.append(float(np.mean(ep)))
    bar.close()
    teacher.eval()
    retrieval = retrieval_metrics(teacher, ev_images, ev_captions)
    metrics = {
        "retrieval_top1": retrieval["top1"],
        "retrieval_top1_dup": retrieval["top1_dup"],
        "retrieval_pairs": retrieval["pairs"],
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-max(1, steps_per_epoch // 5):])),
        "loss_epochs": epoch_losses,
        "scenes": tc.scenes,
        "unique_captions": len(set(captions)),
        "epochs": tc.epochs,
        "steps": step,
        "mean": mean,
        "std": std,
        "seconds": time.perf_counter() - t0,
    }
    return teacher, metrics
