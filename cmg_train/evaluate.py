"""`cmg eval`: image and pixel AUROC, per-defect AUROC, and the paper's ablation table.

Ablation rows share the run's teacher (the encoder backbone), CMER scorer, seed, data and
training budget; they differ only in whether the keep-mask is applied (CMER) and in the
CMLE weight lambda. Reference rows: kNN on the teacher's image embeddings, and a pyod
detector on the same embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from cmg.dataset import MVTecFolder
from cmg.errors import CMGError
from cmg_train.checkpoint import Run, load_run
from cmg_train.cmle import build_caption_graph
from cmg_train.detector import CMGDetector
from cmg_train.memory_bank import KNNDistance
from cmg_train.plots import mask_grid, roc_plot
from cmg_train.train import batched, fit_detector, split_train_val

# name -> (use_mask, use CMLE)
ABLATION = {"baseline": (False, False), "cmer": (True, False), "cmle": (False, True), "cmg": (True, True)}


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray | None = None,
                    n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the AUROC (or, with `reference`, of AUROC(scores) - AUROC(reference)
    on the same resampled images: a paired bootstrap). One seed and ~200 test images leave
    differences of a few points within noise; the table says so instead of hiding it."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() == labels[idx].max():
            continue
        v = roc_auc_score(labels[idx], scores[idx])
        if reference is not None:
            v -= roc_auc_score(labels[idx], reference[idx])
        stats.append(v)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


def image_metrics(labels: np.ndarray, defects: list[str], scores: np.ndarray) -> dict:
    per = {}
    good = np.array([d == "good" for d in defects])
    for kind in sorted(set(defects) - {"good"}):
        sel = good | np.array([d == kind for d in defects])
        per[kind] = _auroc(labels[sel], scores[sel])
    return {"image_auroc": _auroc(labels, scores), "image_auroc_ci95": bootstrap_auroc(labels, scores),
            "per_defect": per}


def pixel_auroc(maps: np.ndarray, gt: np.ndarray) -> float | None:
    """Anomaly maps [N,G,G] upsampled bilinearly to the ground-truth masks [N,H,W]."""
    up = F.interpolate(torch.from_numpy(maps)[:, None].float(), size=gt.shape[1:], mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    return _auroc(gt.reshape(-1).astype(np.int64), up.reshape(-1))


class TestSet:
    """The test split as frames, labels, defect kinds and pixel masks."""

    def __init__(self, data: Path, size: int, progress: bool):
        ds = MVTecFolder(data)
        self.samples = ds.samples("test")
        self.frames = torch.from_numpy(ds.frames(self.samples, (size, size), progress=progress))
        self.labels = np.array([s.label for s in self.samples])
        self.defects = [s.defect for s in self.samples]
        self.gt = np.stack([ds.gt_mask(s, (size, size)) for s in self.samples])


def score_detector(det: CMGDetector, frames: torch.Tensor, patch_scores: torch.Tensor) -> dict:
    th = torch.zeros(frames.shape[0], 1)
    score, _, amap, keep, _ = batched(det, frames, patch_scores, th)
    return {"scores": score[:, 0].numpy(), "maps": amap.numpy(), "keeps": keep.numpy()}


def evaluate(run: Run, data: Path, ablation: bool, progress: bool = True) -> dict:
    cfg = run.cfg
    size = cfg.data.image_size
    test = TestSet(data, size, progress)
    (test_ps,) = batched(run.scorer_graph(), test.frames)
    results: dict[str, dict] = {}
    rows: list[dict] = []

    def add_row(name: str, scores: np.ndarray, maps: np.ndarray | None, extra: dict | None = None):
        row = {"name": name, **image_metrics(test.labels, test.defects, scores),
               "pixel_auroc": pixel_auroc(maps, test.gt) if maps is not None else None, **(extra or {})}
        rows.append(row)
        results[name] = {"scores": scores}

    out = score_detector(run.detector, test.frames, test_ps)
    add_row("run", out["scores"], out["maps"])
    shown = out
    if ablation:
        ds = MVTecFolder(data)
        samples = ds.samples("train")
        frames = torch.from_numpy(ds.frames(samples, (size, size), progress=progress))
        captions = [s.caption for s in samples]
        tr, va = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
        (ps,) = batched(run.scorer_graph(), frames)
        try:
            graph = build_caption_graph([captions[i] for i in tr], cfg.cmle)
        except CMGError as exc:
            graph, note = None, str(exc)
        else:
            note = None
        for name, (use_mask, use_cmle) in tqdm(ABLATION.items(), desc="ablation", disable=not progress):
            if use_cmle and graph is None:
                rows.append({"name": name, "skipped": note})
                continue
            det, m = fit_detector(cfg, run.teacher, frames[tr], ps[tr], frames[va], ps[va],
                                  graph if use_cmle else None, use_mask, cfg.cmle.lam if use_cmle else 0.0,
                                  progress=False)
            o = score_detector(det, test.frames, test_ps)
            add_row(name, o["scores"], o["maps"], {"kept_fraction_train": m["kept_fraction_train"]})
            if name == "cmg":
                shown = o
                (exact_ps,) = batched(run.exact_graph(), test.frames, batch_size=8, progress=progress,
                                      desc="exact-mode relevance")
                oe = score_detector(det, test.frames, exact_ps)
                add_row("cmg_exact", oe["scores"], oe["maps"])
        # Reference rows on the teacher's image embeddings (no mask).
        emb = lambda f: run.teacher.encode_image(run.teacher.preprocess(f))  # noqa: E731
        (train_emb,) = batched(emb, frames[tr])
        (test_emb,) = batched(emb, test.frames)
        knn = KNNDistance(train_emb, cfg.scoring.k_global)
        with torch.no_grad():
            add_row("teacher_knn", knn(test_emb).numpy(), None)
        from pyod.models.ecod import ECOD

        ecod = ECOD().fit(train_emb.numpy())
        add_row("pyod_ecod", ecod.decision_function(test_emb.numpy()), None)

    if "baseline" in results:
        base = results["baseline"]["scores"]
        for row in rows:
            if row["name"] in results and row["name"] != "baseline":
                d = _auroc(test.labels, results[row["name"]]["scores"]) - _auroc(test.labels, base)
                row["delta_vs_baseline"] = d
                row["delta_vs_baseline_ci95"] = bootstrap_auroc(test.labels, results[row["name"]]["scores"], base)
    eval_dir = run.path / "eval"
    eval_dir.mkdir(exist_ok=True)
    report = {"rows": rows, "data": str(data), "seed": cfg.seed, "config": cfg.name,
              "test_images": int(len(test.labels)), "anomalies": int(test.labels.sum())}
    stem = "ablation" if ablation else "eval"
    (eval_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (eval_dir / f"{stem}.md").write_text(markdown_table(report))
    roc_plot(test.labels, {k: v["scores"] for k, v in results.items()}, eval_dir / f"{stem}_roc.png",
             f"{cfg.name}: image-level ROC")
    pick = _showcase(test.defects)
    mask_grid(test.frames.numpy()[pick], shown["keeps"][pick], shown["maps"][pick],
              [test.defects[i] for i in pick], eval_dir / f"{stem}_masks.png", gt=test.gt[pick])
    return report


def _showcase(defects: list[str]) -> list[int]:
    """Two images of each kind, good first."""
    kinds = ["good"] + sorted(set(defects) - {"good"})
    return [i for k in kinds for i in [j for j, d in enumerate(defects) if d == k][:2]]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(report: dict) -> str:
    kinds = sorted({k for r in report["rows"] for k in r.get("per_defect", {})})
    head = "| row | image AUROC (95% CI) | vs baseline (paired 95% CI) | pixel AUROC | " + " | ".join(kinds) + " |"
    lines = [head, "|" + "---|" * (4 + len(kinds))]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |")
            continue
        per = [_fmt(r["per_defect"].get(k)) for k in kinds]
        ci = r.get("image_auroc_ci95")
        auroc = _fmt(r["image_auroc"]) + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
        d, dci = r.get("delta_vs_baseline"), r.get("delta_vs_baseline_ci95")
        delta = f"{d:+.3f} ({dci[0]:+.2f} to {dci[1]:+.2f})" if d is not None else "-"
        lines.append(f"| {r['name']} | {auroc} | {delta} | {_fmt(r['pixel_auroc'])} | " + " | ".join(per) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--data", type=Path, default=None, help="MVTec-style folder (default: the training data)")
    p.add_argument("--ablation", action="store_true", help="baseline / +CMER / +CMLE / CMG + reference rows")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    r = load_run(args.run)
    data = args.data or Path(r.metrics["data"])
    report = evaluate(r, data, args.ablation, progress=not args.no_progress)
    print(markdown_table(report), end="")
    return 0
