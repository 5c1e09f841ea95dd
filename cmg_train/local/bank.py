"""The local anomaly model by default: a memory bank of normal patch features (PatchCore).

Patch features are the frozen pretrained backbone's block outputs at the configured strides
(`backbone.strides`; 8 and 16 by default), each averaged over its 3 x 3 neighbourhood (a
patch sees its surroundings; zeros beyond the map's edge count, as in PatchCore, see
PatchFeatures), brought onto the stride-8 grid (coarser ones upsampled, a stride-4 one
averaged over 2 x 2) and concatenated. The bank is a greedy coreset of every
training patch; a patch's anomaly is its distance to the nearest bank rows (a MatMul +
TopK per block of bank rows, cmg_train/memory_bank.py). Nothing here is trained: it is fitted in one pass.

With `local.self_radius` the bank also returns the map a person reads: the bank distance
weighted by how unlike the rest of its own frame each patch is (SelfDistance). The image
score reads the bank distance alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg.config import Config
from cmg.config_check import CHOICES
from cmg_train.backbone import LITE_MEAN, LITE_STD, EfficientNetLite, backbone_taps, default_taps
from cmg_train.loop import batched
from cmg_train.memory_bank import KNNDistance, greedy_coreset, squared_distances
from cmg_train.preprocess import Preprocess

COLOURS = CHOICES["local.colour"]
# ITU-R BT.601 luma: the weights of a grey frame made from R, G, B.
LUMA = (0.299, 0.587, 0.114)
# The map's cell in pixels of the upsampled frame (Config.local_map_side says the same).
MAP_STRIDE = 8
# SelfDistance compares each patch with every SELF_STRIDE-th cell of its frame in each
# direction: a quarter of the work of every cell, the same pixel AUROC on the parts set
# (0.9658 against 0.9661 at radius 3, seed 0; docs/results.md).
SELF_STRIDE = 2


def score_channel(maps: Tensor) -> Tensor:
    """Local maps [B,C,h,w] -> [B,1,h,w], the channel the image score reads: the bank distance
    (C is 2 with `local.self_radius`, see `PatchBank._with_self`; 1 otherwise)."""
    return maps[:, :1]


def shown_channel(maps: Tensor) -> Tensor:
    """Local maps [B,C,h,w] -> [B,1,h,w], the map a person reads (ANOMALY_MAP): the last
    channel, the self-distance-weighted one when there is one."""
    return maps[:, -1:]


class SelfDistance(nn.Module):
    """Patch rows [B, side*side, D] -> each patch's distance to the nearest patch of its own
    frame more than `radius` cells away (Chebyshev), among every SELF_STRIDE-th cell [B, side*side].

    Why: a normal frame whose part, material or pose is rare in training lights up against
    the bank along the whole part, yet its patches are alike within the frame; a defect is
    unlike both the bank and the rest of its frame. The radius keeps a defect's own patches
    from vouching for each other (it should exceed the largest defect). One batched MatMul
    against a constant gather of the frame's own rows, a constant mask, a ReduceMin.
    """

    def __init__(self, side: int, radius: int):
        super().__init__()
        if radius < 1 or 2 * radius + 1 >= side:
            raise ValueError(f"SelfDistance: radius {radius} leaves no cell to compare with on a {side} x {side} map")
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        refs = ((ys % SELF_STRIDE == 0) & (xs % SELF_STRIDE == 0)).nonzero()[:, 0]
        near = torch.maximum((ys[:, None] - ys[refs][None]).abs(), (xs[:, None] - xs[refs][None]).abs()) <= radius
        self.radius = int(radius)
        self.register_buffer("refs", refs, persistent=False)
        self.register_buffer("near", near, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = x[:, self.refs]
        d2 = squared_distances(x, y.transpose(1, 2), (y**2).sum(-1).unsqueeze(1))
        return torch.sqrt(torch.clamp(d2.masked_fill(self.near, float("inf")).amin(-1), min=0.0))


class PatchFeatures(nn.Module):
    """uint8 frames [B,H,W,3] -> patch features [B,C,h,w], h = upsample * H / 8.

    A stride-4 tap (`backbone.strides: [4, 8, 16]`) is averaged over 2 x 2 after its 3 x 3
    pooling: the map keeps its stride-8 grid (and the kNN its cost) while a cell's feature
    carries the finer block's view of thin cracks and scratches.

    colour="grey" feeds the backbone the frame's luma in all three channels: where normal
    parts come in many colours and materials, colour is variation the bank must not call
    new; the price is that a defect visible only as a change of hue is missed.
    colour="grey+rgb" runs the backbone on both (one call, twice the batch) and returns the
    grey features then the colour ones along the channels ([B, 2C, h, w]; `views` = 2):
    PatchBank matches each view against its own bank.

    ensemble: more backbones (`backbone.ensemble`, variant and block indices each) on the same
    input, their features after the main one's along the channels, each a view with its own
    bank (PatchCore's backbone ensemble): Lite1 and Lite2 disagree on different normal
    frames, and the mean of their scaled distances ranked defects better on the parts set
    than either (docs/results.md). Not with grey+rgb.

    edge_zeros=True averages the map's outer ring with the zero padding counted (PatchCore's
    pooling): an edge patch averages 4 or 6 real cells, and dividing by those alone made the
    ring the noisiest place of every frame, where normal frames peaked (docs/design.md §5
    has the measurement). Checkpoints from before carry no flag and load with False, so
    their scores do not change.
    """

    def __init__(self, variant: str, image_size: int, upsample: int, taps: list[int] | None,
                 load_weights: bool = True, colour: str = "rgb", edge_zeros: bool = True,
                 ensemble: Sequence[tuple[str, Sequence[int]]] = ()):
        super().__init__()
        self.edge_zeros = bool(edge_zeros)
        if colour not in COLOURS:
            raise ValueError(f"PatchFeatures: colour must be one of {COLOURS}, got {colour!r}")
        self.colour = colour
        # One constant [3,3] channel mix (a MatMul in the graph): every output channel is the luma.
        self.register_buffer("mix", torch.tensor(LUMA).view(3, 1).expand(3, 3).contiguous(), persistent=False)
        self.image_size, self.upsample = int(image_size), int(upsample)
        self.size = self.image_size * self.upsample
        self.preprocess = Preprocess(LITE_MEAN, LITE_STD)
        if ensemble and colour == "grey+rgb":
            raise ValueError("PatchFeatures: a backbone ensemble with colour grey+rgb is not supported")
        self.backbone = EfficientNetLite(variant, self.size, taps or default_taps(variant))
        self.ensemble = nn.ModuleList(EfficientNetLite(v, self.size, t) for v, t in ensemble)
        for net in self.backbones:
            if load_weights:
                net.load_package_weights()
            net.requires_grad_(False).eval()
        dims = [sum(net.channels) for net in self.backbones]
        # Each view's channels, in the order forward concatenates them (PatchBank splits on these).
        self.view_dims = dims * 2 if colour == "grey+rgb" else dims
        self.views = len(self.view_dims)
        self.dim = sum(self.view_dims)
        self.side = self.size // MAP_STRIDE

    @property
    def backbones(self) -> list[EfficientNetLite]:
        return [self.backbone, *self.ensemble]

    def forward(self, frames: Tensor) -> Tensor:
        b = 0
        if self.colour == "grey":
            frames = frames.to(torch.float32) @ self.mix
        elif self.colour == "grey+rgb":
            frames = frames.to(torch.float32)
            b = frames.shape[0]  # after the cast: TensorRT takes a UINT8 tensor only as a graph input
            frames = torch.cat([frames @ self.mix, frames], 0)
        x = self.preprocess(frames)
        if self.upsample != 1:  # python ints: a constant Resize in the exported graph
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        parts = []
        for f in (f for net in self.backbones for f in net(x)):
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=self.edge_zeros)
            side = int(f.shape[-1])
            if side > self.side:  # a finer tap: its cells averaged onto the map's grid
                f = F.avg_pool2d(f, side // self.side)
            elif side < self.side:
                f = F.interpolate(f, size=(self.side, self.side), mode="bilinear", align_corners=False)
            parts.append(f)
        f = torch.cat(parts, 1)
        return torch.cat([f[:b], f[b:]], 1) if self.colour == "grey+rgb" else f  # slices: the batch is dynamic in the graph


class PatchBank(nn.Module):
    """uint8 frames -> per-patch distance to the normal bank [B,1,h,w] (the local anomaly map).

    With two or more feature views (`grey+rgb`, `backbone.ensemble`) each view has its own
    bank and nearest rows: a grey patch's match may come from a part of another colour,
    which is the point of the grey view; another backbone errs on other normal frames. Each view's distance is divided by its median on held-out normal patches
    (`scales`), so the two are in the same units, and the map is their mean. A single bank
    over both views concatenated was tried and lost the grey view's gain (docs/results.md).
    """

    def __init__(self, features: PatchFeatures, banks: Tensor | list[Tensor], k: int = 1,
                 scales: Tensor | None = None, self_radius: int = 0, self_median: float | Tensor = 1.0):
        super().__init__()
        banks = [banks] if isinstance(banks, Tensor) else list(banks)
        if len(banks) != features.views:
            raise ValueError(f"PatchBank: {features.views} feature view(s) need as many banks, got {len(banks)}")
        self.features = features
        self.knn = KNNDistance(banks[0], k)
        self.knn_views = nn.ModuleList(KNNDistance(b, k) for b in banks[1:])
        self.register_buffer("scales", torch.ones(len(banks)) if scales is None else scales.float().reshape(-1))
        # `local.self_radius`: a second channel, the map a person reads (see `_with_self`).
        self.self_distance = SelfDistance(features.side, self_radius) if self_radius else None
        self.register_buffer("self_median", torch.as_tensor(self_median, dtype=torch.float32).reshape(()))
        # Which fitted frame each bank row came from, per view (set by fit_patch_bank; not in
        # checkpoints or graphs): what `map_without_own_rows` leaves out.
        self.row_frames: list[Tensor] | None = None

    def view_distances(self, frames: Tensor) -> list[Tensor]:
        """Each view's unscaled distances [B, h*w] (what the scales are fitted on)."""
        return self._distances(self.features(frames))

    def _view_patches(self, f: Tensor) -> list[Tensor]:
        """Features [B, C, h, w] -> each view's patch rows [B, h*w, its view_dims entry], in bank order."""
        x = f.flatten(2).transpose(1, 2)
        return [x] if not len(self.knn_views) else list(x.split(self.features.view_dims, -1))

    def _distances(self, f: Tensor) -> list[Tensor]:
        return [knn(v) for knn, v in zip([self.knn, *self.knn_views], self._view_patches(f), strict=True)]

    def forward(self, frames: Tensor) -> Tensor:
        """frames -> [B, 1, h, w] bank distances, or [B, 2, h, w] with `self_radius`."""
        f = self.features(frames)
        return self._with_self(self._map(self._distances(f), f.shape), f)

    def _with_self(self, d: Tensor, f: Tensor) -> Tensor:
        """The bank distances d [B,1,h,w] and, with `self_radius`, the map a person reads:
        d x sqrt(self-distance / its median over the training patches). A patch as unlike
        its frame as a typical training patch keeps its bank distance; a rare part whose
        patches are alike within the frame is damped. On the parts set this took pixel
        AUROC from 0.950 to 0.966 and AUPRO from 0.870 to 0.906 (3 seeds, docs/results.md);
        the image score does not read it (it lost there: 0.759-0.772 against 0.774)."""
        if self.self_distance is None:
            return d
        s = self.self_distance(f.flatten(2).transpose(1, 2)).reshape(d.shape)
        return torch.cat([d, d * torch.sqrt(s / self.self_median)], 1)

    def _map(self, views: list[Tensor], shape: torch.Size) -> Tensor:
        b, _, h, w = shape
        d = views[0] if len(views) == 1 else sum(v / self.scales[i] for i, v in enumerate(views)) / len(views)
        return d.reshape(b, 1, int(h), int(w))

    def map_without_own_rows(self, frames: Tensor, frame_ids: Tensor) -> Tensor:
        """The map of fitted frames `frame_ids` (indices into the frames the bank was fitted
        on), each with its own rows left out of every view's bank: close to what the frame
        would score had it not been in training (the coreset was chosen with it there)."""
        if self.row_frames is None:
            raise ValueError("PatchBank: the bank does not know its rows' frames (only a freshly fitted one does)")
        f = self.features(frames)
        views = [knn.excluding(v, src[None, :] == frame_ids[:, None])
                 for knn, v, src in zip([self.knn, *self.knn_views], self._view_patches(f), self.row_frames, strict=True)]
        return self._with_self(self._map(views, f.shape), f)

    def train(self, mode: bool = True) -> PatchBank:
        return super().train(False)  # frozen backbone and a constant bank: always eval


def bank_state(net: PatchBank) -> dict:
    f = net.features
    state = {"kind": "bank", "variant": f.backbone.variant, "image_size": f.image_size, "upsample": f.upsample,
             "colour": f.colour, "edge_zeros": f.edge_zeros,
             "taps": list(f.backbone.taps), "k": net.knn.k,
             "bank": net.knn.bank_t.t().contiguous(),
             "state_dict": {k: v.detach().cpu() for k, v in f.state_dict().items()}}
    if net.self_distance is not None:
        state["self_radius"], state["self_median"] = net.self_distance.radius, net.self_median.detach().cpu()
    if len(f.ensemble):
        state["ensemble"] = [[e.variant, list(e.taps)] for e in f.ensemble]
    if len(net.knn_views):
        state["view_banks"] = [knn.bank_t.t().contiguous() for knn in net.knn_views]
        state["scales"] = net.scales.detach().cpu()
    return state


def bank_from_state(state: dict) -> PatchBank:
    features = PatchFeatures(state["variant"], state["image_size"], state["upsample"], state["taps"],
                             load_weights=False, colour=state.get("colour", "rgb"),
                             edge_zeros=state.get("edge_zeros", False), ensemble=state.get("ensemble", ()))
    features.load_state_dict(state["state_dict"])
    return PatchBank(features, [state["bank"], *state.get("view_banks", [])], state["k"],
                     state.get("scales"), state.get("self_radius", 0), state.get("self_median", 1.0)).eval()


def kept_patches(frames: int, cells: int, limit: int, seed: int) -> Tensor | None:
    """[frames, cells] bool: which training patches the coreset is chosen among, at most
    `limit` (0: all, then None), the same share of every frame so that no frame's rare parts
    are dropped whole; seeded."""
    if not limit or frames * cells <= limit:
        return None
    per_frame = max(1, limit // frames)
    gen = torch.Generator().manual_seed(seed + 11)
    ranks = torch.rand(frames, cells, generator=gen).argsort(1)
    return ranks < per_frame


@torch.no_grad()
def fit_patch_bank(cfg: Config, frames: Tensor, progress: bool = True, batch: int = 32,
                   held_out: Tensor | None = None) -> tuple[PatchBank, dict]:
    """frames uint8 [N,H,W,3] normal training images -> the fitted bank and its metrics.

    `held_out` normals (the validation split) set each view's scale when there are two
    views (their median patch distance); without them the scales stay 1. With
    `local.self_radius` the training patches' median SelfDistance is taken in the same pass."""
    bb = cfg.backbone
    features = PatchFeatures(bb.variant, cfg.data.image_size, bb.upsample, backbone_taps(bb),
                             colour=cfg.local.colour,
                             ensemble=[(v, default_taps(v, bb.strides)) for v in bb.ensemble or ()]).eval()
    self_distance = SelfDistance(features.side, cfg.local.self_radius) if cfg.local.self_radius else None
    frames = torch.as_tensor(frames)
    cells = features.side ** 2
    keep = kept_patches(len(frames), cells, cfg.local.max_patches, cfg.seed)
    if keep is not None:  # said once: what the coreset could not see is the user's to know
        print(f"patch bank: the coreset is chosen among {int(keep.sum()):,} of {len(frames) * cells:,} training "
              f"patches (local.max_patches {cfg.local.max_patches:,}; the same share of every frame)",
              file=sys.stderr)

    # The rows go straight into one tensor of their final size: chunks concatenated at the end
    # had held every patch's features twice at the peak (5.9 GB at the 2,000,000-patch cap).
    total = int(keep.sum()) if keep is not None else len(frames) * cells
    flat = torch.empty(total, sum(features.view_dims))
    frame_of_row = torch.empty(total, dtype=torch.long)
    filled = 0

    def patch_rows(chunk: Tensor, ids: Tensor) -> Tensor:
        nonlocal filled
        f = features(chunk).flatten(2).transpose(1, 2)
        s = self_distance(f).flatten() if self_distance is not None else f.new_zeros(0)
        rows = f.reshape(-1, f.shape[-1])
        frames_of = ids.repeat_interleave(cells)
        if keep is not None:  # a frame's own share, chosen before its features exist: memory stays bounded
            mask = keep[ids].flatten()
            rows, frames_of = rows[mask], frames_of[mask]
        flat[filled:filled + len(rows)] = rows
        frame_of_row[filled:filled + len(rows)] = frames_of
        filled += len(rows)
        return s

    (self_d,) = batched(patch_rows, frames, torch.arange(len(frames)), batch_size=batch,
                        progress=progress, desc="patch features")
    assert filled == total, (filled, total)
    views = flat.split(features.view_dims, 1)
    chosen = [greedy_coreset(view, cfg.local.bank_size, seed=cfg.seed, progress=progress) for view in views]
    banks = [view[idx] for view, idx in zip(views, chosen, strict=True)]
    net = PatchBank(features, banks, cfg.local.k, self_radius=cfg.local.self_radius).eval()
    net.row_frames = [frame_of_row[idx] for idx in chosen]
    metrics = {"model": "bank", "backbone": "+".join(b.variant for b in features.backbones), "colour": cfg.local.colour,
               "patches": int(flat.shape[0]), "training_patches": len(frames) * cells,
               "bank_rows": int(banks[0].shape[0]), "feature_dim": int(flat.shape[1]), "map_side": features.side}
    if features.views > 1 and held_out is not None and len(held_out):
        views = batched(net.view_distances, torch.as_tensor(held_out), batch_size=batch)
        medians = [view.median() for view in views]
        net.scales.copy_(torch.stack(medians).clamp_min(1e-6))
        metrics["view_scales"] = [round(float(s), 4) for s in net.scales]
    if self_distance is not None:  # a property of each frame alone: training frames are as fair as new ones
        net.self_median.copy_(self_d.median().clamp_min(1e-6))
        metrics["self_median"] = round(float(net.self_median), 4)
    return net, metrics
