"""AUROC and its paired bootstrap interval: what training (the fusion choice) and evaluation
(the ablation's intervals) both judge with, so the two read scores the same way."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def _auroc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every row of [R, N] labels/scores at once (Mann-Whitney with tied ranks);
    NaN for a row with one class. The same value as sklearn's roc_auc_score per row."""
    ranks = rankdata(scores, axis=1)
    pos = labels.sum(1)
    neg = labels.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def paired_bootstrap(labels: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray | None]],
                     n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of mean_s [AUROC(a_s) - AUROC(b_s)] (or of mean_s AUROC(a_s) when b is None)
    over test images resampled together for every seed s: one seed and ~200 test images leave
    differences of a few points within noise; the tables say so instead of hiding it."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), (n, len(labels)))
    y = labels[idx]
    vals = np.zeros(n)
    for a, b in pairs:
        vals += _auroc_rows(y, a[idx]) - (_auroc_rows(y, b[idx]) if b is not None else 0.0)
    vals = vals[np.isfinite(vals)] / len(pairs)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return [float(lo), float(hi)]
