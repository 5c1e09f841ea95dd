"""Pictures people look at: ROC curves, test images with keep-masks and anomaly maps, and
what the keep-mask threshold does."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402


def roc_plot(labels: np.ndarray, rows: dict[str, np.ndarray], path: Path, title: str,
             point: tuple[float | None, float | None, str] | None = None) -> Path:
    """ROC curve per row; `point` = (FPR, TPR, label) marks an operating point (a threshold)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the ablation has 11 rows
    for i, (name, scores) in enumerate(rows.items()):
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color=colours[(2 * i) % 20 + (2 * i // 20) % 2],
                label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})")
    if point is not None and point[0] is not None and point[1] is not None:
        ax.plot([point[0]], [point[1]], "ko", ms=6, label=f"{point[2]} (FPR {point[0]:.2f}, TPR {point[1]:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend outside the axes stays in the picture
    plt.close(fig)
    return path


def mask_grid(frames: np.ndarray, keeps: np.ndarray, maps: np.ndarray, titles: list[str],
              path: Path, gt: np.ndarray | None = None, suptitle: str | None = None) -> Path:
    """One column per image: frame (+ ground truth outline in red), keep-mask overlay (green:
    kept), anomaly map."""
    n = len(frames)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2 + (0.4 if suptitle else 0)), squeeze=False)
    vmax = float(np.percentile(maps, 99)) or 1.0
    h, w = frames.shape[1:3]
    for i in range(n):
        axes[0, i].imshow(frames[i])
        if gt is not None and gt[i].any():
            axes[0, i].contour(gt[i], levels=[0.5], colors="red", linewidths=0.6)
        axes[0, i].set_title(titles[i], fontsize=7)
        axes[1, i].imshow(frames[i])
        axes[1, i].imshow(keeps[i], cmap="Greens", alpha=0.45, extent=(0, w, h, 0), vmin=0, vmax=1)
        axes[2, i].imshow(frames[i])
        axes[2, i].imshow(maps[i], cmap="jet", alpha=0.5, extent=(0, w, h, 0), vmin=0, vmax=vmax)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].text(-0.1, 0.5, "frame", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "keep-mask (green: kept)", transform=axes[1, 0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=8)
    axes[2, 0].text(-0.1, 0.5, "anomaly map", transform=axes[2, 0].transAxes, rotation=90, va="center", ha="right")
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def alpha_plot(sweeps: list[list[dict]], alpha: float | None, path: Path, title: str) -> Path:
    """Image AUROC and the share of the frame kept against the keep-mask threshold, one line
    per seed (`evaluate.alpha_sweep` rows); the run's alpha marked."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    kept = ax.twinx()
    for i, rows in enumerate(sweeps):
        a = [r["alpha"] for r in rows]
        ax.plot(a, [r["image_auroc"] for r in rows], "o-", color="C0", alpha=0.8, label="image AUROC" if i == 0 else None)
        kept.plot(a, [r["kept"] for r in rows], "s--", color="C2", alpha=0.6, label="frame kept" if i == 0 else None)
    if alpha is not None:
        ax.axvline(alpha, color="k", lw=0.8, ls=":", label=f"run's alpha {alpha:g}")
    ax.set(xlabel="keep-mask threshold alpha (0: every patch kept)", ylabel="image AUROC", title=title)
    kept.set_ylabel("share of the frame kept")
    kept.set_ylim(0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + kept.get_legend_handles_labels()[0]
    # on the twin axes, drawn last: the "frame kept" line must not paint over the legend
    kept.legend(handles=handles, fontsize=7, loc="best", framealpha=0.9).set_zorder(10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
