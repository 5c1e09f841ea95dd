"""The teacher: an image side and a text side in one embedding space, s(x, t) = cos.

CMER reads it through occlusion (how much does hiding a patch lower the similarity of
the image with its caption?), CMLE's global branch embeds masked images with its image
side. Three sources:
- `backbone` (offline default): the text side is a real pretrained sentence encoder
  (MiniLM, frozen); the image side is the frozen ImageNet backbone (cmg_train/backbone.py)
  with a projection trained here on the user's image-caption pairs against it
  (teacher/fit.py). Its features are pooled on a coarse grid, so the projection can see
  where things are, which captions talk about.
- `scratch`: the same, with a small CNN (coordinate channels) trained from scratch as the
  image side; kept for comparison (it cannot tell defects from 200 images).
- `open_clip`: any open_clip CLIP with pretrained weights (tag or local file), as is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg.config import BackboneConfig, TeacherConfig
from cmg.errors import CMGError
from cmg.quiet import quiet_logs
from cmg_train.backbone import LITE_MEAN, LITE_STD, EfficientNetLite, backbone_taps, default_taps
from cmg_train.preprocess import Preprocess
from cmg_train.text import MINILM_DIM, minilm_embeddings


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """The one conv block of the project's small CNNs (teacher, scorer, local model)."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def coord_channels(x: Tensor) -> Tensor:
    """x [B,C,H,W] -> [B,C+2,H,W] with y and x coordinates in [-1, 1] (CoordConv).

    Built from static sizes (H, W are fixed by the contract), so the graph exports with
    constant tensors.
    """
    b, _, h, w = x.shape
    # made on x's device: a host-to-device copy here would refuse CUDA graph capture
    ys = torch.linspace(-1.0, 1.0, int(h), dtype=x.dtype, device=x.device).view(1, 1, int(h), 1)
    xs = torch.linspace(-1.0, 1.0, int(w), dtype=x.dtype, device=x.device).view(1, 1, 1, int(w))
    coords = torch.cat([ys.expand(1, 1, int(h), int(w)), xs.expand(1, 1, int(h), int(w))], dim=1)
    return torch.cat([x, coords.expand(b, -1, -1, -1)], dim=1)


class ImageTower(nn.Module):
    """Normalised NCHW -> [B, embed_dim] (not normalised): a stride-2 CNN, mean-pooled.

    `downsample` > 1 average-pools the frame first: what captions describe (part, material,
    pose, position, background) is visible at a fraction of the resolution, and the P+1
    occlusion passes of CMER cost the square of it less.
    """

    def __init__(self, channels: Sequence[int], embed_dim: int, downsample: int = 1):
        super().__init__()
        self.downsample = int(downsample)
        layers: list[nn.Module] = []
        cin = 5  # RGB + 2 coordinate channels
        for i, cout in enumerate(channels):
            layers.append(conv_bn_relu(cin, cout, stride=2))
            if i:  # one extra block per stage after the stem
                layers.append(conv_bn_relu(cout, cout))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cin, 2 * embed_dim), nn.ReLU(inplace=True),
                                  nn.Linear(2 * embed_dim, embed_dim))
        self.width = cin

    def pooled(self, x: Tensor) -> Tensor:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return self.features(coord_channels(x)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pooled(x))


class FrozenBackboneTower(nn.Module):
    """A trained head on the frozen packaged backbone: the one place that attaches it, with
    the buffers `scale`, `shift` that convert the teacher's (dataset-normalised) input to the
    backbone's own scaling in one multiply-add, and keeps it in eval mode while training."""

    def _attach_backbone(self, variant: str, size: int, taps: list[int], mean: Sequence[float],
                         std: Sequence[float], load_weights: bool) -> None:
        self.backbone = EfficientNetLite(variant, size, taps)
        if load_weights:
            self.backbone.load_package_weights()
        self.backbone.requires_grad_(False)
        scale = torch.tensor(std) / torch.tensor(LITE_STD)
        shift = (torch.tensor(mean) - torch.tensor(LITE_MEAN)) / torch.tensor(LITE_STD)
        self.register_buffer("scale", scale.float().view(1, 3, 1, 1))
        self.register_buffer("shift", shift.float().view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> FrozenBackboneTower:
        super().train(mode)
        self.backbone.eval()  # frozen: its batch-norm statistics are ImageNet's, never the batch's
        return self


class BackboneTower(FrozenBackboneTower):
    """Normalised NCHW -> [B, embed_dim]: frozen pretrained backbone, its deepest tap pooled to a
    4 x 4 grid (position survives: captions name it), then a trained two-layer projection.

    Input is normalised with the teacher's (dataset) statistics, so CMER's fill value 0 is the
    dataset mean; one per-channel multiply-add converts it to the backbone's own scaling.
    """

    GRID = 4

    def __init__(self, backbone: BackboneConfig, image_size: int, embed_dim: int, hidden: int,
                 mean: Sequence[float], std: Sequence[float], downsample: int = 1, load_weights: bool = True):
        super().__init__()
        taps = backbone_taps(backbone)
        self.downsample = int(downsample)
        self._attach_backbone(backbone.variant, image_size // self.downsample, [max(taps)], mean, std, load_weights)
        side = self.backbone.blocks[-1].out_size
        self.grid = min(self.GRID, side)
        # Static pooling (ONNX cannot export adaptive pooling here): windows of `step`, as many as
        # the grid. Where side // step is more than the grid (a 96 px frame's side 6: a shape
        # error in the first step), the windows widen to reach the edge and overlap; elsewhere
        # they are what runs trained before were (a 224 px frame's side 14: 3 wide, 3 apart).
        self.step = side // self.grid
        self.pool = self.step if side // self.step == self.grid else side - (self.grid - 1) * self.step
        width = self.backbone.channels[-1] * self.grid * self.grid
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))

    def pooled(self, x: Tensor) -> Tensor:
        if self.downsample > 1:  # what captions describe is visible at a fraction of the resolution
            x = F.avg_pool2d(x, self.downsample)
        (f,) = self.backbone(x * self.scale + self.shift)
        return F.avg_pool2d(f, self.pool, self.step).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pooled(x))


class AttentionTower(FrozenBackboneTower):
    """Normalised NCHW -> [B, embed_dim]: each cell of the CMER grid embedded, attention-pooled.

    The frozen backbone's last block whose map is the G x G grid and the next coarser one
    (stride 8 and 16 on a 64 px frame, G = 8) are brought onto the grid, with the cell's
    coordinates (captions name positions); a 1x1 two-layer head gives every cell an
    embedding and an attention logit, and the image embedding is the softmax-weighted sum.
    Why: the `grid` tower's one MLP over a pooled grid spreads what a caption describes over
    the whole frame, so filling one cell barely moved it and occlusion relevance was no
    better than a random mask at finding the part (docs/results.md, "The keep-mask, swept");
    here a cell the caption does not describe can only lose weight, so filling a part cell
    moves the embedding and filling clutter does not.
    """

    def __init__(self, backbone: BackboneConfig, image_size: int, embed_dim: int, hidden: int,
                 mean: Sequence[float], std: Sequence[float], grid: int, downsample: int = 1,
                 load_weights: bool = True):
        super().__init__()
        self.downsample, self.grid = int(downsample), int(grid)
        size = image_size // self.downsample
        stride = size // self.grid
        probe = EfficientNetLite(backbone.variant, 64, [0])
        if size % self.grid or stride not in probe.strides:
            raise CMGError(f"teacher: a {size} px frame (after teacher.downsample {self.downsample}) on the "
                           f"{self.grid} x {self.grid} CMER grid needs a stride-{size / self.grid:g} block; "
                           f"{backbone.variant} has strides {sorted(set(probe.strides))}")
        strides = [s for s in (stride, 2 * stride) if s in probe.strides]
        self._attach_backbone(backbone.variant, size, default_taps(backbone.variant, strides), mean, std,
                              load_weights)
        width = sum(self.backbone.channels)
        # one per block, before the grid (their scales differ by 10x)
        self.norm = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for c in self.backbone.channels)
        self.body = nn.Sequential(nn.Conv2d(width + 2, hidden, 1), nn.ReLU(inplace=True))
        self.embed = nn.Conv2d(hidden, embed_dim, 1)
        self.attend = nn.Conv2d(hidden, 1, 1)

    def _on_grid(self, f: Tensor) -> Tensor:
        if int(f.shape[-1]) < self.grid:  # the coarser block: each of its cells covers 2 x 2 grid cells
            return F.interpolate(f, size=(self.grid, self.grid), mode="nearest")
        return f

    def cells(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> cell embeddings [B, E, G*G] and attention weights [B, G*G] (sum 1 per image)."""
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        feats = self.backbone(x * self.scale + self.shift)
        h = self.body(coord_channels(torch.cat([self._on_grid(n(f)) for n, f in zip(self.norm, feats, strict=True)], 1)))
        return self.embed(h).flatten(2), self.attend(h).flatten(1).softmax(1)

    def forward(self, x: Tensor) -> Tensor:
        emb, weight = self.cells(x)
        return (emb * weight.unsqueeze(1)).sum(-1)


class Teacher(nn.Module):
    """Image side (trainable module), text side (a function of captions), preprocessing."""

    def __init__(self, cfg: TeacherConfig, image_size: int, preprocess: Preprocess, visual: nn.Module,
                 encode_text: Callable[[list[str]], Tensor], embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.image_size = int(image_size)
        self.preprocess = preprocess
        self.visual = visual
        self._encode_text = encode_text
        self.embed_dim = int(embed_dim)

    @property
    def device(self) -> torch.device:
        return self.preprocess.scale.device

    def encode_image(self, x: Tensor) -> Tensor:
        """Normalised NCHW -> [B, E] L2-normalised image embedding."""
        return F.normalize(self.visual(x), dim=-1)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """Captions -> [N, E] L2-normalised text embeddings (frozen text side, no grad)."""
        if not captions:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return F.normalize(self._encode_text(list(captions)).float(), dim=-1).to(self.device)

    def forward(self, frames: Tensor) -> Tensor:
        """uint8 NHWC frames -> image embeddings."""
        return self.encode_image(self.preprocess(frames))


def _minilm_text(captions: list[str]) -> Tensor:
    return torch.from_numpy(minilm_embeddings(captions))


def open_clip_error(what: str, weights: str | None, arch: str, exc: BaseException) -> CMGError:
    """One line for weights open_clip could not load. A file that fits another architecture
    (state-dict mismatch) reads differently from one that is no checkpoint at all (truncated,
    another format), and a pretrained tag that cannot be fetched differently again."""
    text = " ".join(str(exc).split())
    if not weights:
        return CMGError(f"{what}: cannot create open_clip {arch}: {text[:240]}")
    if not Path(weights).is_file():
        # a pretrained tag: the end of the message holds the last failure (the start, the tag)
        tail = text if len(text) <= 240 else "... " + text[-240:]
        return CMGError(f"{what}: cannot create open_clip {arch} with the pretrained tag {weights!r} (no network "
                        f"here? download the weights once where there is and give the file): {tail}")
    if isinstance(exc, RuntimeError) and "Error(s) in loading state_dict" in text:
        detail = ", ".join(label for label, there in (
            (f"{text.count('size mismatch for')} tensor(s) of another shape", "size mismatch for" in text),
            ("keys missing", "Missing key(s)" in text),
            ("unexpected keys", "Unexpected key(s)" in text)) if there)
        return CMGError(f"{what} weights {weights}: not an open_clip {arch} checkpoint ({detail or text[:160]}); "
                        f"is it the file of another architecture?")
    reason = text.split(". ")[0][:160]
    return CMGError(f"{what} weights {weights}: not an open_clip weights file (truncated, or not a state "
                    f"dict saved with torch.save or safetensors): {type(exc).__name__}: {reason}")


def teacher_weights(cfg: TeacherConfig) -> str:
    """What open_clip loads: the local file (checked here, so a typo is one clear line) or the
    pretrained tag the user asked for (downloaded once into open_clip's cache). Neither is an
    error: a teacher of random weights would train and serve silently useless models."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.exists():
            raise CMGError(f"teacher weights not found: {path}")
        if not path.is_file():
            raise CMGError(f"teacher weights {path}: not a file")
        return str(path)
    if cfg.pretrained:
        return cfg.pretrained
    raise CMGError(f"teacher: open_clip {cfg.arch} needs weights: give --teacher-weights FILE (a local "
                   "open_clip checkpoint, or set teacher.checkpoint), or teacher.pretrained TAG to let "
                   "open_clip download it once")


def _open_clip(cfg: TeacherConfig, image_size: int, load_weights: bool):
    if not cfg.arch:
        raise CMGError("teacher: source open_clip needs teacher.arch (e.g. ViT-B-32)")
    weights = teacher_weights(cfg) if load_weights else None
    import open_clip  # heavy: only the open_clip teacher source needs it (default: backbone)

    if ":" not in cfg.arch and cfg.arch not in open_clip.list_models():  # hf-hub:, local-dir: schemas pass
        raise CMGError(f"teacher: unknown open_clip architecture {cfg.arch!r} (e.g. ViT-B-32, ViT-B-16)")
    try:
        # open_clip's own loading: a file goes through open_clip.load_checkpoint (state-dict
        # conversions, position-embedding resize), exactly as a user's downloaded file would.
        with quiet_logs(logging.WARNING, on=not load_weights):  # weights follow from the run's state dict: "initialized randomly" misleads
            model = open_clip.create_model(cfg.arch, pretrained=weights, force_image_size=image_size)
    except Exception as exc:  # noqa: BLE001 - torch.load, pickle, zip and safetensors all raise their own
        raise open_clip_error("teacher", weights, cfg.arch, exc) from exc
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)

    def encode_text(captions: list[str], batch: int = 256) -> Tensor:
        device = next(model.parameters()).device
        return torch.cat([model.encode_text(tokenizer(captions[i:i + batch]).to(device))
                          for i in range(0, len(captions), batch)])

    return model, encode_text, mean, std


def build_teacher(cfg: TeacherConfig, image_size: int, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, load_weights: bool = True,
                  backbone: BackboneConfig | None = None, grid: int = 8) -> Teacher:
    """An untrained backbone or scratch teacher, or an open_clip one with its weights; no training.
    `grid`: the CMER grid G (the attention tower embeds its cells)."""
    if cfg.source == "backbone":
        pp = Preprocess(mean or (0.5, 0.5, 0.5), std or (0.25, 0.25, 0.25))
        if cfg.pool == "attention":
            visual = AttentionTower(backbone or BackboneConfig(), image_size, MINILM_DIM, cfg.hidden, pp.mean,
                                    pp.std, grid, cfg.downsample, load_weights)
        else:
            visual = BackboneTower(backbone or BackboneConfig(), image_size, MINILM_DIM, cfg.hidden, pp.mean,
                                   pp.std, cfg.downsample, load_weights)
        return Teacher(cfg, image_size, pp, visual, _minilm_text, MINILM_DIM).eval()
    if cfg.source == "scratch":
        visual = ImageTower(cfg.channels, MINILM_DIM, cfg.downsample)
        pp = Preprocess(mean or (0.5, 0.5, 0.5), std or (0.25, 0.25, 0.25))
        return Teacher(cfg, image_size, pp, visual, _minilm_text, MINILM_DIM).eval()
    if cfg.source == "open_clip":
        model, encode_text, m, s = _open_clip(cfg, image_size, load_weights)
        model.requires_grad_(False)
        teacher = Teacher(cfg, image_size, Preprocess(mean or m, std or s), model.visual, encode_text,
                          int(model.visual.output_dim))
        teacher.clip = model  # keeps the text tower (and its device moves) with the teacher
        return teacher.eval()
    raise CMGError(f"teacher: unknown source {cfg.source!r} (backbone | scratch | open_clip)")


def teacher_state(teacher: Teacher) -> dict:
    """The checkpoint convention: config + state dict (+ what the constructor needs)."""
    backbone = getattr(teacher.visual, "backbone", None)
    return {
        "config": dataclasses.asdict(teacher.cfg),
        "backbone": {"variant": backbone.variant, "taps": list(backbone.taps)} if backbone is not None else None,
        "image_size": teacher.image_size,
        "grid": teacher.visual.grid if isinstance(teacher.visual, AttentionTower) else None,  # the CMER grid it embeds
        "mean": teacher.preprocess.mean,
        "std": teacher.preprocess.std,
        "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
    }


def teacher_from_state(state: dict) -> Teacher:
    """Inverse of teacher_state: the architecture from the config, then the saved weights."""
    try:
        cfg = TeacherConfig(**state["config"])
        bb = state.get("backbone")
        teacher = build_teacher(cfg, int(state["image_size"]), state["mean"], state["std"],
                                load_weights=False, backbone=BackboneConfig(**bb) if bb else None,
                                grid=int(state.get("grid") or 8))
        teacher.load_state_dict(state["state_dict"])
    except KeyError as exc:
        raise CMGError(f"teacher state: missing key {exc}") from exc
    return teacher.eval()


@torch.no_grad()
def retrieval_top1(teacher: Teacher, frames: Tensor, text: Tensor, batch: int = 32) -> float:
    """Image -> caption top-1 within groups of `batch` held-out pairs (chance: 1/batch).

    Identical captions count as hits (the model cannot tell them apart).
    """
    teacher.eval()
    hits = total = 0
    for i in range(0, len(frames), batch):
        img = teacher(frames[i:i + batch].to(teacher.device))
        txt = text[i:i + batch].to(teacher.device)
        best = (img @ txt.T).argmax(dim=1)
        same = (txt[best] * txt).sum(-1) > 1 - 1e-6
        hits += int(same.sum())
        total += len(img)
    return hits / total if total else float("nan")

