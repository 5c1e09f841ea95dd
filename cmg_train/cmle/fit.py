"""CMLE training: caption structure -> vision latent space.

1. Embed the *unique* training captions (offline MiniLM, or the teacher's text side).
   Images sharing a caption share its row: a kNN graph over images would only link
   same-caption images and W would degenerate to uniform weights.
2. Correlation structure matrix W (locally linear embedding): each caption is
   reconstructed from its k nearest captions, rows summing to one.
3. The head is trained with a one-class objective plus lambda * mean_i ||z_i - sum_j W_ij z_j||^2,
   each batch carrying, for every anchor, one image per caption neighbour.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors

from cmg.config import CMLEConfig
from cmg.errors import CMGError
from cmg_train.cmle.model import CMLEHead, cmle_loss, oneclass_loss
from cmg_train.loop import fit
from cmg_train.text import minilm_embeddings


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
    # sklearn's neighbour search works in row blocks: a U x U distance matrix had needed
    # 1 GB at 5,000 distinct captions and 20 GB at 50,000 (kneighbors() leaves each row out).
    idx = NearestNeighbors(n_neighbors=k).fit(emb).kneighbors(return_distance=False)
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


def unique_captions_needed(cfg: CMLEConfig) -> int:
    """The fewest distinct captions CMLE accepts: the configured minimum, and k neighbours + 1."""
    return max(cfg.min_unique_captions, cfg.k + 1)


def check_captions(image_captions: Sequence[str], cfg: CMLEConfig, held_out: int = 0) -> None:
    """Too few unique captions is an error, never a silently degenerate W. `held_out`: the
    images set aside for calibration before CMLE sees the rest (their captions are not here),
    named in the error when they are what leaves too few."""
    unique = len(set(image_captions))
    need = unique_captions_needed(cfg)
    if unique < need:
        fix = ("Provide more varied captions" if unique < len(image_captions) or not held_out
               else f"{held_out} images are held out for calibration (data.val_fraction) and every caption "
                    "of the rest is distinct already: add training images")
        raise CMGError(
            f"CMLE: only {unique} unique captions among {len(image_captions)} images"
            f"{f' (after {held_out} held out)' if held_out else ''} (minimum {need}); {fix}, "
            "or set cmle.enabled: false."
        )


def read_as_one(emb: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """A group per row, in first-seen order: rows within `tol` of each other, directly or through
    others (captions the text encoder reads as one: past its 256 tokens, emoji it has no word
    for), share one. CMLE takes each group as one caption: identical rows would be each
    other's neighbours and their locally linear weights no structure at all."""
    if not len(emb):
        return np.zeros(0, dtype=np.int64)
    near = NearestNeighbors(radius=tol).fit(np.asarray(emb, np.float64)).radius_neighbors_graph()
    return connected_components(near, directed=False)[1]


def build_caption_graph(image_captions: Sequence[str], cfg: CMLEConfig,
                        embed: Callable[[list[str]], np.ndarray] | None = None) -> CaptionGraph:
    """Embed the unique captions and solve W. `embed(texts) -> [U, d]` defaults to offline MiniLM."""
    check_captions(image_captions, cfg)
    unique = sorted(set(image_captions))
    lookup = {c: i for i, c in enumerate(unique)}
    emb = np.asarray((embed or minilm_embeddings)(unique))
    group, need = read_as_one(emb), unique_captions_needed(cfg)
    distinct = int(group.max()) + 1 if len(group) else 0
    if distinct < need:  # distinct as text, one to the encoder: W would be uniform, silently
        raise CMGError(
            f"CMLE: the text encoder reads the {len(unique)} distinct captions as only {distinct} different "
            f"ones (minimum {need}). It reads a caption's first 256 tokens and has no word for emoji and "
            "most non-Latin characters: say what differs between the images early in each caption, in "
            "words, or set cmle.enabled: false.")
    first = np.unique(group, return_index=True)[1]  # each group's first caption stands for it
    if distinct < len(unique):
        merged = np.flatnonzero(group == np.flatnonzero(np.bincount(group) > 1)[0])
        print(f"CMLE: the text encoder reads {len(unique)} distinct captions as {distinct} (for one, "
              f"{len(merged)} captions such as {unique[merged[0]][:60]!r}): each is one caption to CMLE",
              file=sys.stderr)
    nbr, w = lle_weights(emb[first], cfg.k, cfg.reg)
    return CaptionGraph([unique[i] for i in first], group[[lookup[c] for c in image_captions]], nbr, w)


def train_cmle_head(head: CMLEHead, pooled: torch.Tensor, graph: CaptionGraph | None, cfg: CMLEConfig,
                    lam: float, seed: int, progress: bool = True, log=None) -> dict:
    """Train the head on precomputed (frozen) teacher embeddings `pooled` [N, E] of masked images.

    lam = 0 or graph None trains the one-class objective alone (the ablation's rows).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = pooled.shape[0]
    with torch.no_grad():
        z0 = head(pooled)
        center = F.normalize(z0.mean(0), dim=0)
        std_floor = 0.5 * z0.std(0)
    use_cmle = graph is not None and lam > 0
    by_caption = graph.images_by_caption() if graph is not None else None
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, math.ceil(n / batch))
    perm: list[torch.Tensor] = []

    def step_fn(step: int):
        if step % steps_per_epoch == 0:
            perm[:] = [torch.randperm(n, generator=gen)]
        s = step % steps_per_epoch
        idx = perm[0][s * batch:(s + 1) * batch]
        z = head(pooled[idx])
        compact, variance = oneclass_loss(z, center, std_floor)
        loss = compact + variance
        lcmle = z.new_zeros(())
        if use_cmle:
            caps = graph.image_caption[idx.numpy()]
            nbr_caps = graph.neighbours[caps]                       # [B, k]
            pick = np.array([[rng.choice(by_caption[c]) for c in row] for row in nbr_caps])
            zn = head(pooled[torch.from_numpy(pick.reshape(-1))]).view(len(idx), -1, z.shape[-1])
            lcmle = cmle_loss(z, zn, torch.from_numpy(graph.weights[caps]))
            loss = loss + lam * lcmle
        return loss, {"oneclass": compact, "variance": variance, "cmle": lcmle}

    stats = fit(head.parameters(), cfg.epochs * steps_per_epoch, cfg.lr, step_fn,
                desc=f"cmle head (lambda={lam:g})", progress=progress, log=log, clip=None)
    head.eval()
    with torch.no_grad():
        z = head(pooled)
        out = {"loss_first": stats["loss_first"], "loss_last": stats["loss_last"],
               "final_std": float(z.std(0).mean())}
        if graph is not None:
            zc = torch.stack([z[torch.from_numpy(ix)].mean(0) for ix in by_caption])
            out["cmle_residual"] = float(cmle_loss(zc, zc[torch.from_numpy(graph.neighbours)],
                                                   torch.from_numpy(graph.weights)))
    return out
