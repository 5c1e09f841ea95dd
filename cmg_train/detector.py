"""The CMLE encoder with its scoring: one module from UINT8 frame + patch scores to scores.

This module *is* the `cmle_encoder` graph: training-time evaluation and the ONNX export
run the same code, so the served scores are the evaluated ones (parity tested).
"""

from __future__ import annotations

import torch
from torch import nn

from cmg.config import Config
from cmg_train.cmer import apply_mask, keep_mask_cfg
from cmg_train.cmle import CMLEHead
from cmg_train.memory_bank import KNNDistance
from cmg_train.teacher import Teacher


class CMGDetector(nn.Module):
    """frames uint8 [B,H,W,3], patch scores [B,G,G], threshold [B,1] ->
    (ANOMALY_SCORE [B,1], IS_ANOMALY [B,1], ANOMALY_MAP [B,G,G], KEEP_MASK uint8 [B,G,G],
    EMBEDDING [B,D])."""

    def __init__(self, cfg: Config, teacher: Teacher, head: CMLEHead | None, use_mask: bool = True):
        super().__init__()
        self.teacher = teacher
        self.head = head
        self.use_mask = use_mask
        self.grid = teacher.grid
        self.cmer_cfg = cfg.cmer
        if cfg.cmle.patch_source not in ("embedding", "tokens"):
            raise ValueError(f"cmle.patch_source {cfg.cmle.patch_source!r}: expected embedding or tokens")
        self.patch_source = cfg.cmle.patch_source
        self.patch_layer = cfg.cmle.patch_layer
        self.k_global = cfg.scoring.k_global
        self.fusion = cfg.scoring.fusion
        self.global_knn: KNNDistance | None = None
        self.patch_knn: KNNDistance | None = None
        # Normalisation of both scores on held-out normals, and the calibrated threshold.
        self.register_buffer("stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("threshold", torch.tensor(0.0))

    def keep(self, patch_scores: torch.Tensor) -> torch.Tensor:
        if not self.use_mask:
            return torch.ones_like(patch_scores)
        return keep_mask_cfg(patch_scores, self.cmer_cfg)

    def features(self, frames: torch.Tensor, patch_scores: torch.Tensor):
        """(keep [B,G,G], pooled teacher embedding [B,E], patch tokens [B,P,W]): the frozen part."""
        keep = self.keep(patch_scores)
        x = self.teacher.preprocess(frames)
        x = apply_mask(x, keep)
        pooled, tokens = self.teacher.visual_features(x, layer=self.patch_layer)
        if self.patch_source == "embedding":
            # The teacher's patch embedding, before position embeddings and attention: it is
            # translation-equivariant like PatchCore's CNN features, so a part's patch matches
            # normal patches seen at other positions. Transformer tokens carry absolute position,
            # which made a part that moved score as anomalous (local AUROC below chance).
            tokens = self.teacher.clip.visual.conv1(x).flatten(2).transpose(1, 2)
        return keep, pooled, tokens

    def set_banks(self, global_bank: torch.Tensor, patch_bank: torch.Tensor) -> None:
        self.global_knn = KNNDistance(global_bank, self.k_global)
        self.patch_knn = KNNDistance(patch_bank, 1)

    def raw_scores(self, keep, pooled, tokens):
        """(global kNN score [B], local map [B,G,G] zero outside the keep-mask, embedding z)."""
        z, patches = self.head(pooled, tokens)
        g = self.global_knn(z)
        local = self.patch_knn(patches).view(-1, self.grid, self.grid) * keep
        return g, local, z

    def fuse(self, g: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        lmax = local.flatten(1).max(1).values
        gn = (g - self.stats[0]) / self.stats[1]
        ln = (lmax - self.stats[2]) / self.stats[3]
        if self.fusion == "max":
            return torch.maximum(gn, ln)
        return 0.5 * (gn + ln)

    def forward(self, frames: torch.Tensor, patch_scores: torch.Tensor, threshold: torch.Tensor):
        keep, pooled, tokens = self.features(frames, patch_scores)
        g, local, z = self.raw_scores(keep, pooled, tokens)
        score = self.fuse(g, local).unsqueeze(-1)
        is_anomaly = score > threshold
        return score, is_anomaly, local, keep.to(torch.uint8), z
