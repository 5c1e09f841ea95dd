"""`cmg eval`: image and pixel AUROC, pixel AUPRO, per-defect AUROC, the paper's ablation table, and the
same over several training seeds (medians, spreads, pooled paired intervals).

Ablation rows share the run's teacher, CMER scorer, seed, data and training budget:
- baseline: no keep-mask, lambda 0, a local model that practised anywhere (image-only);
- cmer: the keep-mask at scoring time, and a local model that practised where it keeps;
- cmle: the CMLE loss alone; cmg: both (the trained run); cmg_exact: CMG scored with the
  paper's P+1-pass occlusion teacher instead of the one-pass scorer;
- diagnostic rows: CMG's local score alone and its global (CMLE kNN) score alone;
- reference rows: kNN on the teacher's image embeddings, and pyod's ECOD on them;
- the run at other keep-mask thresholds (`alpha_sweep`): what `cmer.alpha` is worth here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cmg.checksum import file_sha256
from cmg.dataset import MVTecFolder, nested_images, visible
from cmg.errors import CMGError
from cmg.files import write_atomic
from cmg.locks import DATA_BEING_WRITTEN, RUN_BEING_TRAINED, reading, writing
from cmg_train.checkpoint import Run, load_run, run_mismatch
from cmg_train.cmer.model import keep_mask_cfg
from cmg_train.cmer.report import defect_coverage, false_alarm_peaks
from cmg_train.cmle.fit import build_caption_graph
from cmg_train.detector import CMGDetector, RawScores
from cmg_train.local.bank import PatchBank, score_channel
from cmg_train.local.fit import train_local
from cmg_train.loop import batched
from cmg_train.memory_bank import KNNDistance
from cmg_train.metrics import (
    aupro,
    auroc,
    kinds_over_seeds,
    operating_point,
    over_seeds,
    paired_bootstrap,
)
from cmg_train.plots import alpha_plot, mask_grid, roc_plot
from cmg_train.train import (
    caption_embedder,
    fit_detector,
    quiet_library_progress,
    split_train_val,
)

# name -> (keep-mask at scoring, CMLE loss, local model practised inside the keep-mask)
ABLATION = {"baseline": (False, False), "cmer": (True, False), "cmle": (False, True), "cmg": (True, True)}
SEEDED_ROWS = ("baseline", "cmer", "cmle", "cmg", "cmg_exact", "patchcore", "teacher_knn", "pyod_ecod")
# Keep-mask thresholds the ablation also scores the run at (0: every patch kept).
SWEEP_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


# What a cached report was scored with: bump it when the scores or rows of an unchanged
# checkpoint change (2: the ablation rows' fusion weight chosen on synthetic anomalies scored
# with their own keep-masks, captions compared as one text), so that a user's runs are scored
# again after an upgrade instead of answering with last month's figures.
EVAL_VERSION = 2


def image_metrics(labels: np.ndarray, defects: list[str], scores: np.ndarray) -> dict:
    per = {}
    good = np.array([d == "good" for d in defects])
    for kind in sorted(set(defects) - {"good"}):
        sel = good | np.array([d == kind for d in defects])
        per[kind] = auroc(labels[sel], scores[sel])
    return {"image_auroc": auroc(labels, scores), "image_auroc_ci95": paired_bootstrap(labels, [(scores, None)]),
            "per_defect": per}


def _upsampled(maps: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Anomaly maps [N,M,M] upsampled bilinearly to the ground-truth masks [N,H,W]."""
    return F.interpolate(torch.from_numpy(maps)[:, None].float(), size=gt.shape[1:], mode="bilinear",
                         align_corners=False)[:, 0].numpy()


def pixel_auroc(maps: np.ndarray, gt: np.ndarray) -> float | None:
    return auroc(gt.reshape(-1).astype(np.int64), _upsampled(maps, gt).reshape(-1))


def pixel_metrics(maps: np.ndarray | None, gt: np.ndarray) -> dict:
    """Pixel AUROC and AUPRO (up to 30% FPR) of maps [N,M,M] against masks [N,H,W]; None
    for a row without maps."""
    if maps is None:
        return {"pixel_auroc": None, "pixel_aupro": None}
    up = _upsampled(maps, gt)
    return {"pixel_auroc": auroc(gt.reshape(-1).astype(np.int64), up.reshape(-1)), "pixel_aupro": aupro(gt > 0, up)}


class TestSet:
    """The test split as frames, labels, defect kinds and pixel masks."""

    def __init__(self, data: Path, size: int, progress: bool):
        ds = MVTecFolder(data, captions=False, need_train=False)  # only test/ (and ground_truth/) is scored
        self.samples = ds.samples("test")
        self.files = [s.path.relative_to(ds.root).as_posix() for s in self.samples]  # test/KIND/NAME
        self.labels = np.array([s.label for s in self.samples])
        if not len(self.labels) or self.labels.min() == self.labels.max():  # before decoding every frame
            have = "no images" if not len(self.labels) else (
                "only anomalous images (no test/good)" if self.labels.min() == 1 else "only normal images (test/good)")
            raise CMGError(f"{data}: the test split needs normal and anomalous images to measure AUROC; it has "
                           f"{have}")
        self.frames = torch.from_numpy(ds.frames(self.samples, (size, size), progress=progress))
        kinds = [p for p in (Path(data) / "test").iterdir() if p.is_dir() and visible(p)]
        nested = sum(nested_images(kind) for kind in kinds)
        if nested:
            print(f"{data}: {nested} image(s) in subfolders of test/<kind> are not scored (the layout is flat)",
                  file=sys.stderr)
        self.defects = [s.defect for s in self.samples]
        self.gt = np.stack([ds.gt_mask(s, (size, size)) for s in self.samples])
        # Pixel metrics read the frames whose masks are known: a defect image without its mask,
        # or with one that marks no pixel, would count as all-normal pixels (a folder without
        # ground_truth/ has none: '-').
        marked = self.gt.reshape(len(self.samples), -1).any(1)
        unmasked = [s for s, m in zip(self.samples, marked, strict=True) if s.label and not m]
        self.pixel = np.array([not s.label or m for s, m in zip(self.samples, marked, strict=True)])
        empty = [s for s in unmasked if s.mask_path is not None]  # said always: a mask file that reads as nothing
        has_gt = (Path(data) / "ground_truth").is_dir()  # masks were meant: a missing one is said too
        if empty or (unmasked and (has_gt or len(unmasked) < int(self.labels.sum()))):
            first = (empty or unmasked)[0]
            why = (f"no ground_truth/{first.defect}/{first.path.stem}_mask.png (or {first.path.stem}.png)"
                   if first.mask_path is None else f"{first.mask_path.name} marks no pixel at {size} x {size}")
            print(f"{data}: {len(unmasked)} defect image(s) have no mask or an empty one (first: "
                  f"{first.path.relative_to(data)}, {why}): left out of the pixel metrics", file=sys.stderr)

    def pixel_metrics(self, maps: np.ndarray | None) -> dict:
        return pixel_metrics(None if maps is None else maps[self.pixel], self.gt[self.pixel])


def local_maps(det: CMGDetector, frames: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """The local model's ungated maps, once for every row that shares the model (the long pass
    of an eval: the backbones and the bank's kNN over every test frame)."""
    (maps,) = batched(lambda f: det.local_map(f, det.teacher.preprocess(f)), frames, progress=progress,
                      desc="anomaly maps")
    return maps


def score_detector(det: CMGDetector, frames: torch.Tensor, patch_scores: torch.Tensor,
                   maps: torch.Tensor | None = None) -> dict:
    """Fused scores, maps and keep-masks, and the two scores before fusion, from one pass
    (`maps`: the ungated local maps of `frames`, when already computed)."""
    if maps is None:
        raw = RawScores(*batched(det.raw, frames, patch_scores))
    else:
        raw = RawScores(*batched(det.raw, frames, patch_scores, maps))
    with torch.no_grad():
        out = det.outputs(raw, torch.zeros(frames.shape[0], 1))
    return {"scores": out.anomaly_score[:, 0].numpy(), "maps": out.anomaly_map.numpy(),
            "keeps": out.keep_mask.numpy(), "global": raw.global_score.numpy(), "local": raw.local_score.numpy()}


def alpha_sweep(det: CMGDetector, test: TestSet, patch_scores: torch.Tensor, maps: torch.Tensor,
                alphas: tuple[float, ...] = SWEEP_ALPHAS) -> list[dict]:
    """The run scored at other keep-mask thresholds (`cmer.alpha`, and the run's own; 0 keeps
    every patch), on this test split, without training again: the scorer and the patch bank
    do not depend on alpha, so with the global score at weight 0 (what `scoring.fusion: auto`
    chose on the parts set and the own data) each row is what a run trained at that alpha
    would score if its fusion chose weight 0 too (the local score's normalisation is a
    monotone map: AUROC does not see it).
    With a global weight the CMLE head and global bank stay those of the run's alpha: an
    estimate (`alpha_table` says so). What a user reads to set alpha for their line from
    labelled frames of it. [] when the rule has no alpha."""
    if det.cmer_cfg.rule != "relative" or not det.use_mask:
        return []
    cfg, rows = det.cmer_cfg, []
    try:
        for a in sorted({*alphas, cfg.alpha}):
            det.cmer_cfg, det.use_mask = dataclasses.replace(cfg, alpha=a), a > 0
            o = score_detector(det, test.frames, patch_scores, maps)
            rows.append({"alpha": a, **image_metrics(test.labels, test.defects, o["scores"]),
                         "pixel_auroc": pixel_auroc(o["maps"][test.pixel], test.gt[test.pixel]),
                         "kept": float(o["keeps"].mean())})
    finally:
        det.cmer_cfg, det.use_mask = cfg, True
    return rows


def evaluate(run: Run, data: Path, ablation: bool, progress: bool = True, test: TestSet | None = None,
             fingerprint: str | None = None) -> dict:
    """Score the test split of `data` with the run (and, with `ablation`, every row).
    `fingerprint`: `test_split_fingerprint(data)` taken before `test` was read, with `test`."""
    if not progress:
        quiet_library_progress()  # the ablation loads MiniLM for the caption graph
    cfg = run.cfg
    writable = run.path / "eval" if (run.path / "eval").is_dir() else run.path
    if not os.access(writable, os.W_OK):  # said before minutes of scoring, not after them
        raise CMGError(f"cmg eval writes its report into {run.path / 'eval'}, and {writable} is read-only: "
                       "evaluate a copy of the run in a folder you can write")
    if test is None or fingerprint is None:  # before reading: an edit while scoring makes the report stale
        fingerprint = test_split_fingerprint(data)
    test = test or TestSet(data, cfg.data.image_size, progress)
    (test_ps,) = batched(run.scorer_graph(), test.frames, progress=progress, desc="keep-masks")
    rows: list[dict] = []
    scores: dict[str, np.ndarray] = {}

    def add_row(name: str, s: np.ndarray | None, maps: np.ndarray | None, extra: dict | None = None) -> None:
        if s is None:  # a row that could not be made: its reason only (no figures, curve or delta)
            rows.append({"name": name, **(extra or {})})
            return
        rows.append({"name": name, **image_metrics(test.labels, test.defects, s),
                     **test.pixel_metrics(maps), **(extra or {})})
        scores[name] = s

    test_maps = local_maps(run.detector, test.frames, progress)
    out = score_detector(run.detector, test.frames, test_ps, test_maps)
    shown = out
    cover = {"scorer": defect_coverage(keep_mask_cfg(test_ps, cfg.cmer), test.gt)}
    normal = torch.from_numpy(test.labels == 0)
    cover["normal_false_alarms"] = false_alarm_peaks(test_maps[normal], keep_mask_cfg(test_ps[normal], cfg.cmer))
    at = operating_point(test.labels, test.defects, out["scores"], float(run.detector.threshold))
    at["target_false_positive_rate"] = cfg.scoring.fpr
    add_row("run", out["scores"], out["maps"], {"at_threshold": at})
    sweep: list[dict] = []
    if ablation:
        # the retrained `cmg` row's masks; the run's own where that row is skipped (no caption graph)
        shown = _ablation_rows(run, test, test_ps, test_maps, add_row, cover, progress, data) or out
        sweep = alpha_sweep(run.detector, test, test_ps, test_maps)
    for row in rows:
        if "baseline" in scores and row["name"] in scores and row["name"] != "baseline":
            row["delta_vs_baseline"] = auroc(test.labels, scores[row["name"]]) - auroc(test.labels, scores["baseline"])
            row["delta_vs_baseline_ci95"] = paired_bootstrap(test.labels, [(scores[row["name"]], scores["baseline"])])
    eval_dir = run.path / "eval"
    eval_dir.mkdir(exist_ok=True)
    report = {"rows": rows, "data": str(Path(data).resolve()), "data_fingerprint": fingerprint,
              "checkpoint_sha256": file_sha256(run.path / "checkpoint.pt"), "eval_version": EVAL_VERSION,
              "seed": cfg.seed, "config": cfg.name,
              "test_images": int(len(test.labels)), "anomalies": int(test.labels.sum()),
              "keep_mask_on_test": cover, "scores": {k: v.tolist() for k, v in scores.items()},
              "labels": test.labels.tolist(), "defects": test.defects, "alpha": cfg.cmer.alpha,
              "files": test.files,  # which frame each score is
              "global_weight": float(run.detector.global_weight)}
    stem = "ablation" if ablation else "eval"
    # STEM.json marks a finished report (cached_report reuses it): gone before the first file
    # changes, written after the last. Written first, an eval stopped while drawing left a json
    # that the rerun reused, claiming pictures missing or drawn from other data.
    (eval_dir / f"{stem}.json").unlink(missing_ok=True)
    if sweep:
        report["alpha_sweep"] = sweep
        alpha_plot([sweep], cfg.cmer.alpha, eval_dir / "ablation_alpha.png", f"{cfg.name}: keep-mask threshold")
    head = (f"Run {run.path} (config {cfg.name}, seed {cfg.seed}, checkpoint sha256 {report['checkpoint_sha256'][:12]}) "
            f"on {report['test_images']} test images of {report['data']}"
            + ("; no defect image has a ground-truth mask (ground_truth/KIND/NAME_mask.png), so the pixel "
               "metrics are '-'" if _run_row(report).get("pixel_auroc") is None else "")
            + "\n\n")  # the file is the run's, whichever data
    (eval_dir / f"{stem}.md").write_text(head + markdown_table(report["rows"], report["defects"])
                                         + threshold_table([report]) + alpha_table([report]))
    roc_plot(test.labels, scores, eval_dir / f"{stem}_roc.png", f"{cfg.name}: image-level ROC",
             point=(at["false_positive_rate"], at["recall"], "run at its calibrated threshold"))
    pick = _showcase(test.defects)
    mask_grid(test.frames.numpy()[pick], shown["keeps"][pick], shown["maps"][pick],
              [test.defects[i] for i in pick], eval_dir / f"{stem}_masks.png", gt=test.gt[pick])
    worst = worst_frames(test.labels, out["scores"])
    thr = float(run.detector.threshold)
    mask_grid(test.frames.numpy()[worst], out["keeps"][worst], out["maps"][worst],
              [f"{test.defects[i]}/{test.samples[i].path.stem} {out['scores'][i]:.2f}"
               + (" (flagged)" if out["scores"][i] > thr else "")
               for i in worst], eval_dir / f"{stem}_errors.png", gt=test.gt[worst],
              suptitle=f"{cfg.name}: the highest-scoring normal frames, then the lowest-scoring defects "
                       f"(titles: kind and score; the run flags scores above {thr:.2f})")
    write_atomic(eval_dir / f"{stem}.json", json.dumps(report, indent=2))  # a torn report blocked the next eval
    return report


def training_folder(run: Run, data: Path | None = None) -> MVTecFolder:
    """The folder the run trained on, which the ablation's rows retrain from; the one `data`
    (`--data`) names when that one moved (a run copied to another machine with its data)."""
    try:
        return MVTecFolder(run.data_folder())
    except CMGError:
        if data is None:
            raise
        return MVTecFolder(run.data_folder(data))


def _ablation_rows(run: Run, test: TestSet, test_ps: torch.Tensor, test_maps: torch.Tensor, add_row, cover: dict,
                   progress: bool, data: Path | None = None) -> dict:
    """The ablation's rows (each retrained on the run's training split) added with `add_row`;
    returns the `cmg` row's outputs, {} where CMLE's caption graph cannot be built (its rows
    are then listed as skipped, with the reason)."""
    cfg = run.cfg
    size = cfg.data.image_size
    ds = training_folder(run, data)
    samples = ds.samples("train")
    frames = torch.from_numpy(ds.frames(samples, (size, size), progress=progress))
    captions = [s.caption for s in samples]
    tr, va = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
    one_pass = run.scorer_graph()
    (ps,) = batched(one_pass, frames)
    try:
        graph = build_caption_graph([captions[i] for i in tr.tolist()], cfg.cmle, caption_embedder(cfg, run.teacher))
        note = None
    except CMGError as exc:
        graph, note = None, str(exc)
    locals_ = {True: run.detector.local}
    maps = {True: (test_maps, local_maps(run.detector, frames[va]))}  # shared by the rows of one local model
    if cfg.local.model == "unet" and cfg.local.placement == "keep":  # the image-only rows get a local model that practised anywhere
        locals_[False], _ = train_local(cfg, run.teacher.preprocess, frames[tr], None, progress)
        maps[False] = (None, None)
    else:
        locals_[False], maps[False] = run.detector.local, maps[True]
    (exact_ps,) = batched(run.exact_graph(), test.frames, batch_size=8, progress=progress,
                          desc="exact-mode relevance")
    cover["teacher"] = defect_coverage(keep_mask_cfg(exact_ps, cfg.cmer), test.gt)
    shown: dict = {}
    features: dict[bool, torch.Tensor] = {}  # the teacher's embeddings of the training frames, by mask
    for name, (use_mask, use_cmle) in tqdm(ABLATION.items(), desc="ablation", disable=not progress):
        if use_cmle and graph is None:
            add_row(name + " (skipped)", None, None, {"skipped": note})
            continue
        test_m, val_m = maps[use_mask]
        det, _ = fit_detector(cfg, run.teacher, locals_[use_mask], frames[tr], ps[tr], frames[va], ps[va],
                              graph if use_cmle else None, use_mask, cfg.cmle.lam if use_cmle else 0.0,
                              progress=False, val_maps=val_m, features=features, scorer=one_pass)
        o = score_detector(det, test.frames, test_ps, test_m)
        add_row(name, o["scores"], o["maps"])
        if name == "cmg":
            shown = o
            oe = score_detector(det, test.frames, exact_ps, test_m)
            add_row("cmg_exact", oe["scores"], oe["maps"])
            add_row("cmg_local_only", o["local"], o["maps"])
            add_row("cmg_global_only", o["global"], None)
    # PatchCore reference: the same backbone and bank, whole frame, no mask, no head, map maximum.
    if isinstance(run.detector.local, PatchBank):
        plain = score_channel(test_maps)
        add_row("patchcore", plain.flatten(1).amax(1).numpy(), plain.squeeze(1).numpy())
    emb = lambda f: run.teacher(f)  # noqa: E731
    (train_emb,) = batched(emb, frames[tr])
    (test_emb,) = batched(emb, test.frames)
    with torch.no_grad():
        add_row("teacher_knn", KNNDistance(train_emb, cfg.scoring.k_global)(test_emb).numpy(), None)
    from pyod.models.ecod import ECOD  # heavy (pyod imports numba): only this ablation row needs it

    ecod = ECOD().fit(train_emb.numpy())
    add_row("pyod_ecod", ecod.decision_function(test_emb.numpy()), None)
    return shown


def test_split_fingerprint(data: Path) -> str:
    """Names, sizes and modification times of the files the evaluation reads (test/,
    ground_truth/ and meta.jsonl, which can name masks): a report is reused only while they
    are what it scored."""
    entries = []
    meta = Path(data) / "meta.jsonl"  # its gt_mask entries may name masks outside ground_truth/
    if meta.is_file():
        entries.append(f"meta.jsonl\t{meta.stat().st_size}\t{meta.stat().st_mtime_ns}")
        named = set()
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                named.add(json.loads(line).get("gt_mask") or "")
            except (ValueError, AttributeError):
                continue
        for rel in sorted(named - {""}):
            f = Path(data) / rel
            st = f.stat() if f.is_file() else None
            entries.append(f"{rel}\t{st.st_size if st else '-'}\t{st.st_mtime_ns if st else '-'}")
    for sub in ("test", "ground_truth"):
        root = Path(data) / sub
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    entries.append(f"{f.relative_to(data)}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def cached_report(run: Run, data: Path, ablation: bool) -> dict | None:
    """RUN/eval/{ablation,eval}.json when it scored the same data, unchanged since, with this
    checkpoint (its hash: a copy with an older time is another model all the same) and this
    version of the scoring (EVAL_VERSION); an unreadable report is no report (scored again).
    The json is written after the .md and the pictures (evaluate): there, they are too."""
    path = run.path / "eval" / ("ablation.json" if ablation else "eval.json")
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (report.get("data") == str(Path(data).resolve())
            and report.get("eval_version") == EVAL_VERSION
            and report.get("checkpoint_sha256") == file_sha256(run.path / "checkpoint.pt")
            and report.get("data_fingerprint") == test_split_fingerprint(data))
    return report if same else None


def aggregate(reports: list[dict]) -> dict:
    """Rows over training seeds: median and [min, max] of each metric, and the gain of each row
    over the baseline: its median and range over seeds, and its mean over seeds with a paired
    95% interval (test images resampled, the same for every seed; the trained models fixed,
    so seed-to-seed variation is the range's to show, not the interval's)."""
    labels = np.array(reports[0]["labels"])
    names = [r["name"] for r in reports[0]["rows"] if "skipped" not in r]
    out_rows = []
    for name in names:
        per_seed = [next(r for r in rep["rows"] if r["name"] == name) for rep in reports]
        row: dict = {"name": name, "seeds": len(per_seed)} | over_seeds(
            per_seed, ("image_auroc", "pixel_auroc", "pixel_aupro"))
        row["per_defect"] = kinds_over_seeds(per_seed)
        if name != "baseline" and all("baseline" in rep["scores"] for rep in reports):
            pairs = [(np.array(rep["scores"][name]), np.array(rep["scores"]["baseline"])) for rep in reports]
            gains = [auroc(labels, a) - auroc(labels, b) for a, b in pairs]
            row["gain_vs_baseline"] = float(np.median(gains))
            row["gain_vs_baseline_range"] = [float(min(gains)), float(max(gains))]
            row["gain_vs_baseline_mean"] = float(np.mean(gains))  # the statistic the interval is of
            row["gain_vs_baseline_ci95"] = paired_bootstrap(labels, pairs)
        out_rows.append(row)
    return {"rows": out_rows, "seeds": [rep["seed"] for rep in reports], "data": reports[0]["data"],
            "config": reports[0]["config"], "test_images": reports[0]["test_images"],
            "at_threshold": [_run_row(rep).get("at_threshold") for rep in reports],
            "alpha_sweep": alpha_medians(reports)}


def alpha_medians(reports: list[dict]) -> list[dict]:
    """The alpha sweep over seeds: medians and ranges of image AUROC and of its gain over
    alpha 0 (the same run with every patch kept), pixel AUROC and the share of the frame kept.
    [] unless every report has the same sweep."""
    sweeps = [rep.get("alpha_sweep") or [] for rep in reports]
    alphas = [r["alpha"] for r in sweeps[0]]
    if not alphas or any([r["alpha"] for r in sw] != alphas for sw in sweeps) or 0.0 not in alphas:
        return []
    rows, base = [], [sw[alphas.index(0.0)] for sw in sweeps]
    for i, a in enumerate(alphas):
        per = [sw[i] for sw in sweeps]
        img = [r["image_auroc"] for r in per]
        gain = [r["image_auroc"] - b["image_auroc"] for r, b in zip(per, base, strict=True)]
        pix = [r["pixel_auroc"] for r in per if r.get("pixel_auroc") is not None]
        rows.append({"alpha": a, "image_auroc": float(np.median(img)),
                     "image_auroc_range": [float(min(img)), float(max(img))],
                     "gain": float(np.median(gain)), "gain_range": [float(min(gain)), float(max(gain))],
                     "pixel_auroc": float(np.median(pix)) if pix else None,
                     "kept": float(np.median([r["kept"] for r in per])), "seeds": len(per)})
    return rows


def alpha_table(reports: list[dict]) -> str:
    """The alpha sweep as markdown (medians over the reports' seeds; the run's alpha marked)."""
    rows = alpha_medians(reports)
    if not rows:
        return ""
    mine = {rep.get("alpha") for rep in reports}
    seeded = len(reports) > 1  # one run has no range to show: a range of one value read as a measured spread
    lines = ["", "The run at other keep-mask thresholds (`cmer.alpha`; 0 keeps every patch; scorer, bank and "
             "calibration as trained):", "",
             "| alpha | image AUROC, median (range) | gain over alpha 0 (range over seeds) | pixel AUROC | frame kept |"
             if seeded else "| alpha | image AUROC | gain over alpha 0 | pixel AUROC | frame kept |",
             "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["image_auroc_range"]
        glo, ghi = r["gain_range"]
        name = f"{r['alpha']:.2f}" + (" (run)" if r["alpha"] in mine else "")
        auc, gain = f"{r['image_auroc']:.3f}", f"{r['gain']:+.3f}"
        if seeded:
            auc, gain = f"{auc} ({lo:.3f}-{hi:.3f})", f"{gain} ({glo:+.3f} to {ghi:+.3f})"
        lines.append(f"| {name} | {auc} | {gain} | {_fmt(r['pixel_auroc'])} | {r['kept']:.2f} |")
    if not seeded:
        lines += ["", "One run: a gain of a point or two between rows is within its test images' noise (the "
                  "run's image AUROC interval above); compare alphas over seeds (`benchmarks/seeds.sh`)."]
    if any(rep.get("global_weight", 0.0) > 0 for rep in reports):
        lines += ["", "Rows other than the run's are estimates: the run gives the global score a weight, and "
                  "its CMLE head and global bank were fitted on frames masked at the run's alpha."]
    return "\n".join(lines) + "\n"


def _run_row(report: dict) -> dict:
    return next((r for r in report["rows"] if r["name"] == "run"), {})


def threshold_table(reports: list[dict]) -> str:
    """The run at its calibrated threshold, one line per seed (and the median): what a line
    would see, next to the FPR it was calibrated for on held-out normals."""
    points = [(rep["seed"], _run_row(rep).get("at_threshold")) for rep in reports]
    points = [(seed, p) for seed, p in points if p]
    if not points:
        return ""
    kinds = sorted({k for _, p in points for k in p["recall_per_defect"]})
    lines = ["", "The run at its calibrated threshold (a frame is flagged above it):", "",
             "| seed | threshold | target FPR | test FPR (95% CI) | recall | " + " | ".join(kinds) + " |",
             "|" + "---|" * (5 + len(kinds))]

    def line(label: str, thr: str, p: dict, ci: str) -> str:
        per = [_fmt(p["recall_per_defect"].get(k)) for k in kinds]
        return (f"| {label} | {thr} | {p['target_false_positive_rate']:.3f} | {_fmt(p['false_positive_rate'])}{ci} | "
                f"{_fmt(p['recall'])} | " + " | ".join(per) + " |")

    for seed, p in points:
        lo, hi = p["false_positive_rate_ci95"] or (None, None)
        lines.append(line(str(seed), f"{p['threshold']:.3f}", p, f" ({lo:.2f}-{hi:.2f})" if lo is not None else ""))
    if len(points) > 1:
        med = lambda key: float(np.median([p[key] for _, p in points]))  # noqa: E731
        median = {"target_false_positive_rate": points[0][1]["target_false_positive_rate"],
                  "false_positive_rate": med("false_positive_rate"), "recall": med("recall"),
                  "recall_per_defect": {k: float(np.median([p["recall_per_defect"][k] for _, p in points]))
                                        for k in kinds}}
        lines.append(line("median", "-", median, ""))
    return "\n".join(lines) + "\n"


def worst_frames(labels: np.ndarray, scores: np.ndarray, n: int = 6) -> list[int]:
    """The run's worst mistakes, for `*_errors.png`: the n highest-scoring normal frames (its
    false alarms, highest first), then the n lowest-scoring defective ones (its misses,
    lowest first). Why: where a run fails on a line is read off these frames (clutter, glare,
    a rare part), not off an AUROC."""
    normal, defect = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    return ([int(i) for i in normal[np.argsort(-scores[normal], kind="stable")][:n]]
            + [int(i) for i in defect[np.argsort(scores[defect], kind="stable")][:n]])


def _showcase(defects: list[str]) -> list[int]:
    """Two images of each kind, good first."""
    kinds = ["good"] + sorted(set(defects) - {"good"})
    return [i for k in kinds for i in [j for j, d in enumerate(defects) if d == k][:2]]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(rows: list[dict], defects: list[str] | None = None) -> str:
    """One table for a single run (with 95% intervals) or for seeds (medians, ranges, pooled gain).
    `defects` (the test images' kinds) adds each kind's image count to its column: a kind of
    one image scores 0 or 1 and should be read as that."""
    kinds = sorted({k for r in rows for k in r.get("per_defect", {})})
    counts = {k: (defects or []).count(k) for k in kinds}
    seeded = any("seeds" in r for r in rows)
    head = ("| row | image AUROC, median (range) | gain vs baseline: median (range over seeds); mean, paired 95% CI "
            "| pixel AUROC | "
            if seeded else "| row | image AUROC (95% CI) | vs baseline (paired 95% CI) | pixel AUROC | ")
    head += "pixel AUPRO (FPR <= 0.3) | "
    named = [f"{k} ({counts[k]})" if counts[k] else k for k in kinds]
    lines = [head + " | ".join(named) + " |", "|" + "---|" * (5 + len(kinds))]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |")
            continue
        per = [_fmt(r["per_defect"].get(k)) for k in kinds]
        if seeded:
            rng = r.get("image_auroc_range")
            auc = _fmt(r.get("image_auroc")) + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else "")
            delta = _seeded_gain(r)
        else:
            ci = r.get("image_auroc_ci95")
            auc = _fmt(r.get("image_auroc")) + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            d, dci = r.get("delta_vs_baseline"), r.get("delta_vs_baseline_ci95")
            delta = f"{d:+.3f} ({dci[0]:+.3f} to {dci[1]:+.3f})" if d is not None else "-"
        lines.append(f"| {r['name']} | {auc} | {delta} | {_fmt(r.get('pixel_auroc'))} | {_fmt(r.get('pixel_aupro'))} | "
                     + " | ".join(per) + " |")
    return "\n".join(lines) + "\n"


def _seeded_gain(row: dict) -> str:
    """'median (range over seeds); mean, CI lo to hi': the interval is the mean's, so the
    mean stands beside it (a median outside its neighbour's interval had read as a contradiction)."""
    d, dci = row.get("gain_vs_baseline"), row.get("gain_vs_baseline_ci95")
    if d is None:
        return "-"
    if "gain_vs_baseline_mean" not in row:  # a table aggregated before the mean was kept
        return f"{d:+.3f} ({dci[0]:+.3f} to {dci[1]:+.3f})"
    lo, hi = row["gain_vs_baseline_range"]
    return (f"{d:+.3f} ({lo:+.3f} to {hi:+.3f}); mean {row['gain_vs_baseline_mean']:+.3f}, "
            f"CI {dci[0]:+.3f} to {dci[1]:+.3f}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, action="append",
                   help="trained run folder; repeat for several training seeds (medians over seeds)")
    p.add_argument("--data", type=Path, default=None, help="MVTec-style folder (default: the training data)")
    p.add_argument("--ablation", action="store_true", help="baseline / +CMER / +CMLE / CMG + reference rows")
    p.add_argument("--out", type=Path, default=None, help="with several runs: where the seeds table goes")
    p.add_argument("--recompute", action="store_true",
                   help="score again even where RUN/eval holds a report of the same data and checkpoint")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Each run read under a reader's lock (a training replacing it meanwhile had put its new
    checkpoint's hash on the old one's scores, reused by every later eval) and its report
    written under its own (two evals of one run had left one data's json over the other's
    pictures)."""
    with contextlib.ExitStack() as held:
        for path in args.run:
            held.enter_context(reading(Path(path), refusal=RUN_BEING_TRAINED.format(run=path)))
        for path in dict.fromkeys(Path(p).resolve() for p in args.run if Path(p).is_dir()):  # a run given twice is said below
            # (a read-only run has none: its cached report is read, or it says why not)
            held.enter_context(writing(path / "eval", refusal=f"{path / 'eval'} is being written by another `cmg eval` "
                                       "(pid {pid}, lock {lock}): one at a time; wait for it to end"))
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    runs = [load_run(path) for path in args.run]
    for r in runs[1:]:  # medians over seeds of one config: another config's run is no seed of it
        why = run_mismatch(r, dataclasses.replace(runs[0].cfg, seed=r.cfg.seed), runs[0].metrics.get("data"))
        if why is not None:
            raise CMGError(f"--run {r.path} is not another seed of --run {runs[0].path}: {why}")
    seeds: dict[int, Path] = {}
    for r in runs:  # a median over seeds counts each seed once: the same run twice is no second seed
        first = seeds.setdefault(r.cfg.seed, r.path)
        if first is not r.path:
            same = "the same run" if first.resolve() == r.path.resolve() else f"seed {r.cfg.seed} too"
            raise CMGError(f"--run {r.path} and --run {first} are {same}: give each training seed once")
    if len(runs) == 1 and args.out is not None:
        print(f"--out {args.out}: a single run's report goes to {runs[0].path / 'eval'} (--out is where "
              "several runs' seeds table goes)", file=sys.stderr)
    data = runs[0].data_folder(args.data)
    if not Path(data).is_dir():
        raise CMGError(f"dataset folder not found: {data}")
    test: TestSet | None = None
    fingerprint = None
    reports = []
    with reading(Path(data), refusal=DATA_BEING_WRITTEN.format(data=data)):
        for r in runs:
            report = None if args.recompute else cached_report(r, data, args.ablation)
            if report is not None:
                print(f"{r.path}: the report of this data, unchanged since it was scored, from {r.path / 'eval'} "
                      "(--recompute scores again)", file=sys.stderr)
            else:
                if test is None:  # the fingerprint before the frames are read: an edit meanwhile makes it stale
                    fingerprint = test_split_fingerprint(data)
                    test = TestSet(data, r.cfg.data.image_size, not args.no_progress)
                report = evaluate(r, data, args.ablation, not args.no_progress, test, fingerprint)
            reports.append(report)
    if len(reports) == 1:
        print(markdown_table(reports[0]["rows"], reports[0].get("defects")) + threshold_table(reports)
              + alpha_table(reports), end="")
        stem = "ablation" if args.ablation else "eval"
        print(f"cmg eval: {runs[0].path / 'eval'}/{stem}.md, {stem}.json and {stem}_*.png: this run's report of "
              f"{reports[0]['data']} (the run's report of any other data is replaced)", file=sys.stderr)
        return 0
    agg = aggregate(reports)
    out = args.out or runs[0].path.parent / "eval_seeds"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(agg["rows"], reports[0].get("defects")) + threshold_table(reports) + alpha_table(reports)
    # one seeds table per folder at a time (two had left one's json beside the other's table)
    with writing(out, refusal=f"{out} is being written by another `cmg eval` (pid {{pid}}, lock {{lock}}): one "
                 "seeds table at a time"):
        (out / "seeds.json").write_text(json.dumps(agg, indent=2))
        (out / "seeds.md").write_text(text)
        if agg["alpha_sweep"]:
            alpha_plot([rep["alpha_sweep"] for rep in reports], reports[0].get("alpha"), out / "alpha.png",
                       f"{agg['config']}: keep-mask threshold, {len(reports)} seeds")
    print(text, end="")
    return 0
