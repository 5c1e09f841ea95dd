"""The CMLE encoder with its scoring: one module from UINT8 frame + patch scores to scores.

This module *is* the `cmle_encoder` graph: training-time evaluation and the ONNX export run
the same code, so the served scores are the evaluated ones (parity tested). Steps:
1. CMER keep-mask from PATCH_SCORES (relative rule + growth), or keep-all without CMER;
2. local: the local model's map on the whole frame (default: each patch's distance to the
   normal patch bank; or the U-Net's mean-filtered anomaly probability), zero where the
   keep-mask discarded the pixels (clutter off the product cannot raise an alarm); its
   maximum (minus the map's 90th percentile, `local.score`) is the local score; with
   `local.score_sigma` also read off the blurred map, the larger of the two standardised;
3. global: the teacher's embedding of the masked frame (discarded pixels filled with the
   mean) through the CMLE head -> z, and the mean distance to its k nearest normal z;
4. both z-normalised on held-out normals and fused (`scoring.fusion`; `auto`: the weighted
   sum whose weight separated held-out normals from synthetic anomalies made on them
   best); IS_ANOMALY = score > THRESHOLD.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg.config import Config
from cmg_train.cmer.model import keep_mask_cfg
from cmg_train.cmle.model import CMLEHead
from cmg_train.filters import GaussianBlur
from cmg_train.local.bank import PatchBank, score_channel, shown_channel
from cmg_train.local.model import LocalNet, anomaly_probability
from cmg_train.masking import apply_mask, upsample_keep
from cmg_train.memory_bank import KNNDistance
from cmg_train.teacher.model import Teacher


class DetectorOutput(NamedTuple):
    """The cmle_encoder outputs, in the contract's order (cmg.contract.ENCODER_OUTPUTS)."""

    anomaly_score: Tensor  # [B,1]
    is_anomaly: Tensor     # [B,1] bool
    anomaly_map: Tensor    # [B,M,M]
    keep_mask: Tensor      # [B,G,G] uint8
    embedding: Tensor      # [B,D]


class RawScores(NamedTuple):
    """Before normalisation and fusion (what calibration and the ablation read)."""

    global_score: Tensor  # [B]
    local_score: Tensor   # [B]
    local_map: Tensor     # [B,C,h,w] gated (C = 2 with local.self_radius: score channel, shown channel)
    keep: Tensor          # [B,G,G] float
    z: Tensor             # [B,D]


def spread(values: Tensor, what: str) -> Tensor:
    """The held-out normals' standard deviation of a score: its unit in the fused score. Where
    they do not vary (identical or constant training images; two held-out frames that tie),
    1, said: a unit clamped to 1e-6 had made every score a million times its distance and the
    threshold about 1e13, so the run flagged nothing and said nothing."""
    sd = values.std() if values.numel() > 1 else values.new_zeros(())
    if not torch.isfinite(sd) or float(sd) <= 1e-6 * max(1.0, float(values.abs().mean())):
        print(f"warning: the {values.numel()} held-out normal frames' {what} does not vary (spread "
              f"{float(sd):.2g}), so it is used unscaled: the training images are identical or nearly so, "
              "or too few are held out to calibrate on. Train on more, and more varied, normal images",
              file=sys.stderr)
        return values.new_ones(())
    return sd


class CMGDetector(nn.Module):
    """frames uint8 [B,H,W,3], patch scores [B,G,G], threshold [B,1] -> DetectorOutput."""

    def __init__(self, cfg: Config, teacher: Teacher, local: LocalNet | PatchBank, head: CMLEHead,
                 use_mask: bool = True):
        super().__init__()
        self.teacher, self.local, self.head = teacher, local, head
        self.use_mask = bool(use_mask)
        self.cmer_cfg = cfg.cmer
        self.pool = int(cfg.local.pool)
        self.local_score = cfg.local.score
        self.map_size = int(cfg.scoring.map_size)
        self.map_blur = GaussianBlur(float(cfg.scoring.map_sigma)) if cfg.scoring.map_sigma > 0 else None
        # `local.score_sigma`: the image score also read off the blurred map; each view's score is
        # standardised on held-out normals (mean, std of the plain view, then of the blurred one).
        self.score_blur = GaussianBlur(float(cfg.local.score_sigma)) if cfg.local.score_sigma > 0 else None
        if self.score_blur is not None:
            self.register_buffer("view_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.fusion = cfg.scoring.fusion
        self.k_global = int(cfg.scoring.k_global)
        self.global_knn: KNNDistance | None = None
        # Normalisation of both scores on held-out normals (g mean, g std, l mean, l std),
        # and the calibrated threshold (the default of the THRESHOLD input).
        self.register_buffer("stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("threshold", torch.tensor(0.0))
        # fusion `auto`: the global score's weight in w * g + (1 - w) * l, chosen at calibration.
        self.register_buffer("global_weight", torch.tensor(0.5))

    def keep(self, patch_scores: Tensor) -> Tensor:
        if not self.use_mask:
            return torch.ones_like(patch_scores)
        return keep_mask_cfg(patch_scores, self.cmer_cfg)

    def embed(self, x: Tensor, keep: Tensor) -> Tensor:
        """The CMLE head's input: the teacher embedding of the masked, normalised frame."""
        return self.teacher.encode_image(apply_mask(x, keep))

    def local_map(self, frames: Tensor, x: Tensor) -> Tensor:
        """The local model's ungated map [B,1,h,w] (the bank reads frames, the U-Net x); [B,2,h,w]
        with the bank's `local.self_radius` (the score's channel, then the one shown)."""
        if isinstance(self.local, PatchBank):
            return self.local(frames)
        return anomaly_probability(self.local, x, self.pool)

    def local_peaks(self, amap: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Gated map and the image's local score of each view [B,V] from the ungated map [B,C,h,w]
        (V is 2 with `local.score_sigma`: the map as is, then blurred; else 1).

        C is 1, or 2 with `local.self_radius`: channel 0 is what the score reads (the bank
        distance), the last channel the map a person reads (`outputs`)."""
        kept = upsample_keep(keep, amap.shape[-2:])
        d = score_channel(amap)
        peaks = []
        for view in (d,) if self.score_blur is None else (d, self.score_blur(d)):
            peak = (view * kept).flatten(1).amax(1)
            if self.local_score == "max_minus_p90":
                flat = view.flatten(1)
                k = max(1, int(flat.shape[1]) // 10)  # static: the 90th percentile is the k-th largest
                peak = peak - torch.topk(flat, k, dim=1).values[:, -1]
            peaks.append(peak)
        return amap * kept, torch.stack(peaks, 1)

    def local_scores(self, amap: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Gated map and the image's local score: the one view's, or with `local.score_sigma`
        the larger of the two views' scores, each standardised on the held-out normals (a crack
        peaks in one cell of the plain map, a faint tint over many cells only once blurred)."""
        gated, peaks = self.local_peaks(amap, keep)
        if self.score_blur is None:
            return gated, peaks[:, 0]
        s = self.view_stats
        return gated, torch.maximum((peaks[:, 0] - s[0]) / s[1], (peaks[:, 1] - s[2]) / s[3])

    @torch.no_grad()
    def fit_view_stats(self, amap: Tensor, keep: Tensor) -> None:
        """With `local.score_sigma`: each view's score mean and spread over held-out normals'
        ungated maps, so that neither view's scale decides the larger of the two."""
        if self.score_blur is None:
            return
        _, p = self.local_peaks(amap, keep)
        self.view_stats.copy_(torch.stack([p[:, 0].mean(), spread(p[:, 0], "plain-map local score"),
                                           p[:, 1].mean(), spread(p[:, 1], "smoothed-map local score")]))

    def set_bank(self, global_bank: Tensor) -> None:
        self.global_knn = KNNDistance(global_bank, self.k_global)

    def raw(self, frames: Tensor, patch_scores: Tensor, local_map: Tensor | None = None) -> RawScores:
        """`local_map`: the ungated map when already computed (evaluation rows that share the
        local model pass it instead of running the backbone and bank again)."""
        x = self.teacher.preprocess(frames)
        keep = self.keep(patch_scores)
        z = self.head(self.embed(x, keep))
        amap, local = self.local_scores(self.local_map(frames, x) if local_map is None else local_map, keep)
        return RawScores(self.global_knn(z), local, amap, keep, z)

    def fuse(self, g: Tensor, lmax: Tensor) -> Tensor:
        gn = (g - self.stats[0]) / self.stats[1]
        ln = (lmax - self.stats[2]) / self.stats[3]
        if self.fusion == "local":
            return ln
        if self.fusion == "max":
            return torch.maximum(gn, ln)
        if self.fusion == "auto":
            return self.global_weight * gn + (1.0 - self.global_weight) * ln
        return 0.5 * (gn + ln)

    def outputs(self, r: RawScores, threshold: Tensor) -> DetectorOutput:
        """The served outputs from raw scores (evaluation keeps both without a second pass)."""
        score = self.fuse(r.global_score, r.local_score).unsqueeze(-1)
        shown = shown_channel(r.local_map)
        k = int(shown.shape[-1]) // self.map_size
        amap = F.avg_pool2d(shown, k) if k > 1 else shown
        if self.map_blur is not None:  # the map a person reads: smoothed, as PatchCore's is (the score
            # is not), and still zero where the keep-mask discarded the pixels
            amap = self.map_blur(amap) * upsample_keep(r.keep, amap.shape[-2:])
        # [:, 0], not squeeze(1): the exporter writes squeeze of a dim it cannot prove is 1 as an If
        # whose branches return rank 3 and rank 4, which TensorRT's parser refuses
        amap = amap[:, 0]
        return DetectorOutput(score, score > threshold, amap, r.keep.to(torch.uint8), r.z)

    def forward(self, frames: Tensor, patch_scores: Tensor, threshold: Tensor) -> DetectorOutput:
        return self.outputs(self.raw(frames, patch_scores), threshold)
