"""A config trained on a folder (or the run already there) and scored as `cmg eval` scores
it: the one step `cmg bench shots` and `cmg bench tradeoff` repeat per config, count and seed.

Why one place: both sub-verbs reuse finished runs and evaluations, so a sweep that stopped
halfway goes on where it stopped and a finished one re-plots in seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TIMING = "bench_train.json"  # RUN/...: the wall time of train_run when this module trained it


def cmle_fits(cfg, folder: Path) -> bool:
    """Whether the training split `cmg train` will make of `folder` has the distinct captions
    CMLE's caption graph needs (the check training runs before it starts)."""
    from cmg.dataset import MVTecFolder
    from cmg.errors import CMGError
    from cmg_train.cmle.fit import check_captions
    from cmg_train.train import split_train_val

    samples = MVTecFolder(folder).samples("train")
    tr, _ = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
    try:
        check_captions([samples[i].caption for i in tr.tolist()], cfg.cmle)
    except CMGError:
        return False
    return True


def train_and_score(config: str, folder: Path, run_dir: Path, seed: int, ablation: bool = False,
                    progress: bool = True, cmle_if_it_fits: bool = False) -> dict:
    """Train `config` with `seed` on `folder` into `run_dir` unless a run is there, then score
    its test split (a cached evaluation of the same data is reused; with `ablation` false an
    ablation report serves too, its `run` row is the same). `cmle_if_it_fits` trains with
    CMLE off where the training split has too few distinct captions for it.

    Returns the `run` row's image/pixel AUROC and per-kind AUROC, the gain over the image-only
    baseline (ablation only), the training images, whether CMLE was on and the training time
    (None for a run this module did not train)."""
    from cmg.config import load_config, resolve_config
    from cmg.errors import CMGError
    from cmg_train.checkpoint import load_run, run_mismatch
    from cmg_train.evaluate import cached_report, evaluate
    from cmg_train.train import train_run

    run_dir = Path(run_dir)
    cfg = load_config(resolve_config(config))  # a misspelt config fails here, reused run or not
    cfg.seed = seed
    if (run_dir / "checkpoint.pt").is_file():
        try:
            run = load_run(run_dir)
            why = run_mismatch(run, cfg, folder)
        except CMGError as exc:  # a checkpoint this version cannot read
            why = str(exc)
        if why is not None:
            raise CMGError(f"{why}: remove that run folder or choose another --out")
    else:
        if cmle_if_it_fits:
            cfg.cmle.enabled = cfg.cmle.enabled and cmle_fits(cfg, folder)  # else the rest of the method
        t = time.perf_counter()
        train_run(cfg, folder, run_dir, progress=progress)
        (run_dir / TIMING).write_text(json.dumps({"train_s": time.perf_counter() - t}))
        run = load_run(run_dir)
    report = (cached_report(run, folder, ablation) or (None if ablation else cached_report(run, folder, True))
              or evaluate(run, folder, ablation, progress=progress))
    row = next(r for r in report["rows"] if r["name"] == "run")
    timing = json.loads((run_dir / TIMING).read_text()) if (run_dir / TIMING).is_file() else {}
    return {"seed": seed, "images": int(run.metrics["images"]["train"] + run.metrics["images"]["val"]),
            "cmle": "on" if run.cfg.cmle.enabled else "off", "image_auroc": row["image_auroc"],
            "pixel_auroc": row["pixel_auroc"], "per_defect": row["per_defect"],
            "gain_vs_baseline": row.get("delta_vs_baseline"), "train_s": timing.get("train_s"),
            "run": str(run_dir)}
