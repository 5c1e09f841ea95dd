"""AUROC and its paired bootstrap interval, the threshold rule and the operating point it
gives: what training (the fusion choice, the threshold) and evaluation (the ablation's
intervals, the threshold on the test split) both judge with, so the two read scores the same way.
AUPRO, the pixel-level metric MVTec AD and anomalib report beside pixel AUROC."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.stats import binomtest, rankdata
from sklearn.metrics import auc, roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def aupro(gt: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float | None:
    """Area under the per-region overlap curve up to `max_fpr` false-positive rate, divided by
    `max_fpr` (MVTec AD's AUPRO; 0.3 as there). gt [N,H,W] defect masks, maps [N,H,W] scores.

    Why beside pixel AUROC: pixel AUROC counts pixels, so large defects decide it; here every
    connected defect region counts the same, however small (a pit of 30 pixels as much as a
    stain of 300). Regions are 8-connected, as in MVTec AD's and anomalib's code (a thin
    diagonal scratch is one region, not a chain of one-pixel ones). The curve has a point at
    every distinct map value (a tie is one step) and is interpolated linearly at `max_fpr`,
    as anomalib's is. None without normal pixels or regions."""
    gt = gt.astype(bool)
    if not gt.any() or gt.all():
        return None
    weights, regions_total = np.zeros(gt.shape), 0
    for i, g in enumerate(gt):
        regions, n = ndimage.label(g, structure=np.ones((3, 3)))
        sizes = np.bincount(regions.ravel())
        weights[i] = np.where(regions > 0, 1.0 / sizes[regions], 0.0)  # each region sums to 1
        regions_total += n
    scores = maps.ravel().astype(np.float64)  # signed: an unsigned map's negation wraps around
    order = np.argsort(-scores)  # highest first: lowering the threshold flags more (ties collapse below)
    ends = np.append(np.flatnonzero(np.diff(scores[order])), scores.size - 1)  # the last of each tie
    fpr = np.append(0.0, np.cumsum(~gt.ravel()[order])[ends] / np.count_nonzero(~gt))
    pro = np.append(0.0, np.cumsum(weights.ravel()[order])[ends] / regions_total)
    k = int(np.searchsorted(fpr, max_fpr, side="right")) - 1  # the last point at or below max_fpr
    x, y = fpr[:k + 1], pro[:k + 1]
    if k + 1 < fpr.size and fpr[k] < max_fpr:
        step = (max_fpr - fpr[k]) / (fpr[k + 1] - fpr[k])
        x, y = np.append(x, max_fpr), np.append(y, pro[k] + step * (pro[k + 1] - pro[k]))
    return float(auc(x, y) / max_fpr)


def _auroc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every row of [R, N] labels/scores at once (Mann-Whitney with tied ranks);
    NaN for a row with one class. The same value as sklearn's roc_auc_score per row."""
    ranks = rankdata(scores, axis=1)
    pos = labels.sum(1)
    neg = labels.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def over_seeds(per_seed: list[dict], keys: tuple[str, ...]) -> dict:
    """`key` -> median and `key_range` -> [min, max] over the seeds' rows that have a value:
    how every multi-seed table here reports a metric (one seed's gain is noise)."""
    out: dict = {}
    for key in keys:
        vals = [r[key] for r in per_seed if r.get(key) is not None]
        if vals:
            out[key] = float(np.median(vals))
            out[f"{key}_range"] = [float(min(vals)), float(max(vals))]
    return out


def kinds_over_seeds(per_seed: list[dict], key: str = "per_defect") -> dict[str, float]:
    """Per defect kind, the median over the seeds' rows of `key` (kind -> AUROC)."""
    return {k: float(np.median([r[key][k] for r in per_seed])) for k in per_seed[0][key]}


def range_cell(row: dict, key: str, digits: int = 3) -> str:
    """A table cell of what `over_seeds` wrote: 'median (min to max)', or '-' without a value."""
    if key not in row:
        return "-"
    lo, hi = row[f"{key}_range"]
    return f"{row[key]:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


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


def normal_threshold(normal_scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """Threshold over held-out normal scores that flags at most `fpr` of future normal frames,
    and that bound. Split-conformal: the ceil((n+1)(1-fpr))-th smallest score, so a new normal
    frame exchangeable with these exceeds it with probability <= (n+1-k)/(n+1) <= fpr. A plain
    interpolated quantile sits below it and flags more than `fpr` of the very frames it was set
    on. With too few frames for the target (k > n) the threshold is their maximum and the bound,
    1/(n+1), is above `fpr`: the report says so instead of promising the target."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("no held-out normal scores to set a threshold on")
    if not np.isfinite(s).all():  # a threshold of NaN flags nothing, and nothing would say so
        raise ValueError(f"{int((~np.isfinite(s)).sum())} of {s.size} normal scores are not finite: "
                         "no threshold can be set on them")
    n = s.size
    k = min(math.ceil((n + 1) * (1.0 - fpr)), n)
    return float(s[k - 1]), (n + 1 - k) / (n + 1)


def operating_point(labels: np.ndarray, defects: list[str], scores: np.ndarray, threshold: float) -> dict:
    """What a line sees at one threshold (a frame is flagged when its score is above it): the
    share of normal frames flagged (with its exact 95% interval: a test split holds tens of
    normal frames) and the share of anomalies caught, over all and per defect kind."""
    flagged = np.asarray(scores) > threshold
    labels = np.asarray(labels)
    normal, anomalous = flagged[labels == 0], flagged[labels == 1]
    fp = binomtest(int(normal.sum()), len(normal)).proportion_ci(0.95, method="exact") if len(normal) else None
    kinds = sorted(set(defects) - {"good"})
    return {
        "threshold": float(threshold),
        "normal_frames": int(len(normal)),
        "false_positive_rate": float(normal.mean()) if len(normal) else None,
        "false_positive_rate_ci95": [float(fp.low), float(fp.high)] if fp else None,
        "recall": float(anomalous.mean()) if len(anomalous) else None,
        "recall_per_defect": {k: float(flagged[np.array([d == k for d in defects])].mean()) for k in kinds},
    }
