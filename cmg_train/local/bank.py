"""The local anomaly model by default: a memory bank of normal patch features (PatchCore).

Patch features are the frozen pretrained backbone's block outputs at the configured strides
(`backbone.strides`; 8 and 16 by default), each averaged over its 3 x 3 neighbourhood (a
patch sees its surroundings; zeros beyond the map's edge count, as in PatchCore, see
PatchFeatures), brought onto the stride-8 grid (coarser ones upsampled, a stride-4 one
averaged over 2 x 2) and concatenated. The bank is a greedy coreset of every
training patch; a patch's anomaly is its distance to the nearest bank rows (one MatMul +
TopK, cmg_train/memory_bank.py). Nothing here is trained: it is fitted in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmg.config import Config
from cmg.config_check import CHOICES
from cmg_train.backbone import LITE_MEAN, LITE_STD, EfficientNetLite, backbone_taps, default_taps
from cmg_train.memory_bank import KNNDistance, greedy_coreset
from cmg_train.preprocess import Preprocess

COLOURS = CHOICES["local.colour"]
# ITU-R BT.601 luma: the weights of a grey frame made from R, G, B.
LUMA = (0.299, 0.587, 0.114)
# The map's cell in pixels of the upsampled frame (Config.local_map_side says the same).
MAP_STRIDE = 8


class PatchFeatures(nn.Module):
    """uint8 frames [B,H,W,3] -> patch features [B,C,h,w], h = upsample * H / 8.

    A stride-4 tap (`backbone.strides: [4, 8, 16]`) is averaged over 2 x 2 after its 3 x 3
    pooling: the map keeps its stride-8 grid (and the kNN its cost) while a cell's feature
    carries the finer block's view of thin cracks and scratches.

    colour="grey" feeds the backbone the frame's luma in all three channels: where normal
    parts come in many colours and materials, colour is variation the bank must not call
    new; the price is that a defect visible only as a change of hue is missed.

    edge_zeros=True averages the map's outer ring with the zero padding counted (PatchCore's
    pooling): an edge patch averages 4 or 6 real cells, and dividing by those alone made the
    ring the noisiest place of every frame, where normal frames peaked (docs/design.md §5
    has the measurement). Checkpoints from before carry no flag and load with False, so
    their scores do not change.
    """

    def __init__(self, variant: str, image_size: int, upsample: int, taps: list[int] | None,
                 load_weights: bool = True, colour: str = "rgb", edge_zeros: bool = True):
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
        self.backbone = EfficientNetLite(variant, self.size, taps or default_taps(variant))
        if load_weights:
            self.backbone.load_package_weights()
        self.backbone.requires_grad_(False).eval()
        self.dim = sum(self.backbone.channels)
        self.side = self.size // MAP_STRIDE

    def forward(self, frames: Tensor) -> Tensor:
        if self.colour == "grey":
            frames = frames.to(torch.float32) @ self.mix
        x = self.preprocess(frames)
        if self.upsample != 1:  # python ints: a constant Resize in the exported graph
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        parts = []
        for f in self.backbone(x):
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=self.edge_zeros)
            side = int(f.shape[-1])
            if side > self.side:  # a finer tap: its cells averaged onto the map's grid
                f = F.avg_pool2d(f, side // self.side)
            elif side < self.side:
                f = F.interpolate(f, size=(self.side, self.side), mode="bilinear", align_corners=False)
            parts.append(f)
        return torch.cat(parts, 1)


class PatchBank(nn.Module):
    """uint8 frames -> per-patch distance to the normal bank [B,1,h,w] (the local anomaly map)."""

    def __init__(self, features: PatchFeatures, bank: Tensor, k: int = 1):
        super().__init__()
        self.features = features
        self.knn = KNNDistance(bank, k)

    def forward(self, frames: Tensor) -> Tensor:
        f = self.features(frames)
        b, c, h, w = f.shape
        d = self.knn(f.flatten(2).transpose(1, 2))  # [B, h*w]
        return d.reshape(b, 1, int(h), int(w))

    def train(self, mode: bool = True) -> PatchBank:
        return super().train(False)  # frozen backbone and a constant bank: always eval


def bank_state(net: PatchBank) -> dict:
    f = net.features
    return {"kind": "bank", "variant": f.backbone.variant, "image_size": f.image_size, "upsample": f.upsample,
            "colour": f.colour, "edge_zeros": f.edge_zeros,
            "taps": list(f.backbone.taps), "k": net.knn.k,
            "bank": net.knn.bank_t.t().contiguous(),
            "state_dict": {k: v.detach().cpu() for k, v in f.state_dict().items()}}


def bank_from_state(state: dict) -> PatchBank:
    features = PatchFeatures(state["variant"], state["image_size"], state["upsample"], state["taps"],
                             load_weights=False, colour=state.get("colour", "rgb"),
                             edge_zeros=state.get("edge_zeros", False))
    features.load_state_dict(state["state_dict"])
    return PatchBank(features, state["bank"], state["k"]).eval()


@torch.no_grad()
def fit_patch_bank(cfg: Config, frames: Tensor, progress: bool = True, batch: int = 32) -> tuple[PatchBank, dict]:
    """frames uint8 [N,H,W,3] normal training images -> the fitted bank and its metrics."""
    bb = cfg.backbone
    features = PatchFeatures(bb.variant, cfg.data.image_size, bb.upsample, backbone_taps(bb),
                             colour=cfg.local.colour).eval()
    rows = []
    for i in tqdm(range(0, len(frames), batch), desc="patch features", disable=not progress, leave=False):
        f = features(torch.as_tensor(frames[i:i + batch]))
        rows.append(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]))
    flat = torch.cat(rows)
    idx = greedy_coreset(flat, cfg.local.bank_size, seed=cfg.seed, progress=progress)
    net = PatchBank(features, flat[idx], cfg.local.k).eval()
    return net, {"model": "bank", "backbone": bb.variant, "colour": cfg.local.colour, "patches": int(flat.shape[0]),
                 "bank_rows": int(len(idx)), "feature_dim": int(flat.shape[1]), "map_side": features.side}
