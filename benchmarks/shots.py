"""`cmg bench shots`: how many normal images a line needs. Image and pixel AUROC of a config
trained on N randomly drawn training images of a folder, for several N and seeds, scored
on the folder's whole test split.

Why: a user starting a line has a few dozen good parts, not hundreds, and WinCLIP-style
detectors are judged by exactly this curve. Each (N, seed) draws its own images (the seed
picks both the images and the training seed), so the spread over seeds includes which
images were drawn. N below what CMLE's caption graph needs trains with `cmle.enabled:
false`, and the table says so; `all` is the folder as it is.

Each subset is a folder of links (`OUT/data/nN_sSEED`: the drawn images under
train/good, the test split, masks and captions as they are in DIR), so `cmg train` and
`cmg eval` read it like any user folder and nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from cmg.argtypes import seed_list
from cmg.errors import CMGError
from cmg_bench.common import add_out_argument, finish_plot
from cmg_bench.trained import train_and_score
from cmg_train.metrics import over_seeds, range_cell

ALL = 0  # the shot count that means "every training image"


def parse_shots(text: str) -> tuple[int, ...]:
    """`--shots` '16,32,all' -> (16, 32, 0); `all` (0) is the whole folder."""
    out = []
    for v in (s.strip() for s in text.split(",")):
        if v == "all":
            out.append(ALL)
        elif v:
            if not v.isdigit() or int(v) < 1:
                raise argparse.ArgumentTypeError(f"expected positive image counts or 'all', got {v!r}")
            out.append(int(v))
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated image counts or 'all', got {text!r}")
    return tuple(dict.fromkeys(out))


def shot_label(n: int) -> str:
    return "all" if n == ALL else str(n)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


SUBSET = "subset.json"  # in each subset folder: which folder and images it was drawn from


def draw(data: Path, n: int, seed: int) -> list[Path]:
    """The `n` training images of DIR that `seed` draws (sorted)."""
    from cmg.dataset import training_images

    images = training_images(data)
    if n > len(images):
        raise CMGError(f"--shots {n}: {data}/train/good has only {len(images)} images")
    rng = np.random.default_rng(seed)
    return sorted(images[i] for i in rng.choice(len(images), size=n, replace=False))


def subset_record(data: Path, drawn: list[Path]) -> dict:
    return {"source": str(Path(data).resolve()), "images": [p.name for p in drawn]}


def subset_folder(data: Path, out: Path, n: int, seed: int) -> Path:
    """OUT: DIR with `n` of its training images (drawn with `seed`), everything else linked.

    Lines of captions.jsonl and meta.jsonl about training images that were not drawn are
    left out; every other line is kept as it is. Made again from scratch each call; OUT/
    subset.json names the folder and images, so a run trained on it is not taken for a run
    of another folder's subset (every subset of an --out has the same path)."""
    data = Path(data).resolve()
    drawn = draw(data, n, seed)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    good = out / "train" / "good"
    good.mkdir(parents=True)
    for path in drawn:
        os.symlink(path, good / path.name)
    for entry in data.iterdir():
        if entry.name not in ("train", "captions.jsonl", "meta.jsonl"):
            os.symlink(entry, out / entry.name)
    kept = {p.relative_to(data).as_posix() for p in drawn}
    for name in ("captions.jsonl", "meta.jsonl"):
        rows = _jsonl(data / name)
        if rows:
            lines = [json.dumps(r) for r in rows if not str(r.get("file", "")).startswith("train/") or r["file"] in kept]
            (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / SUBSET).write_text(json.dumps(subset_record(data, drawn), indent=1), encoding="utf-8")
    return out


def _linked(subset: Path) -> dict | None:
    """The record of a subset made before subset.json was written, read off its links
    (train/good/NAME -> SOURCE/train/good/NAME), or None when it has none."""
    good = subset / "train" / "good"
    links = sorted(p for p in good.iterdir() if p.is_symlink()) if good.is_dir() else []
    sources = {Path(os.readlink(p)).parent.parent.parent for p in links}
    if not links or len(sources) != 1:
        return None
    return {"source": str(sources.pop()), "images": [p.name for p in links]}


def check_reuse(data: Path, subset: Path, run_dir: Path, n: int, seed: int) -> None:
    """A run already in OUT/runs must have been trained on this folder's draw: refuse otherwise."""
    if not (run_dir / "checkpoint.pt").is_file():
        return
    record = json.loads((subset / SUBSET).read_text()) if (subset / SUBSET).is_file() else _linked(subset)
    if record != subset_record(data, draw(Path(data).resolve(), n, seed)):
        source = record["source"] if record else "a folder it does not record"
        raise CMGError(f"{run_dir} was trained on {n} images drawn from {source}, not this draw from "
                       f"{Path(data).resolve()}: remove that run folder or choose another --out")


def summarise(rows: list[dict]) -> list[dict]:
    """Per shot count, fewest images first: medians and ranges over seeds of image and pixel AUROC, of the gain
    over the image-only baseline (with --ablation) and of the training time."""
    out = []
    for n in dict.fromkeys(r["shots"] for r in rows):
        per = [r for r in rows if r["shots"] == n]
        out.append({"shots": n, "images": int(np.median([r["images"] for r in per])), "seeds": len(per),
                    "cmle": sorted({r["cmle"] for r in per})}
                   | over_seeds(per, ("image_auroc", "pixel_auroc", "gain_vs_baseline", "train_s")))
    return sorted(out, key=lambda r: r["images"])  # the curve's order, whatever order --shots gave


def markdown(summary: list[dict], config: str, data: str) -> str:
    lines = [f"`{config}` on {data}: medians over seeds (range)", "",
             "| training images | seeds | image AUROC | pixel AUROC | CMG - image-only baseline | CMLE | training s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        lines.append(f"| {shot_label(r['shots'])} ({r['images']}) | {r['seeds']} | {range_cell(r, 'image_auroc')} | "
                     f"{range_cell(r, 'pixel_auroc')} | {range_cell(r, 'gain_vs_baseline')} | {'/'.join(r['cmle'])} | "
                     f"{range_cell(r, 'train_s', 0)} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib  # heavy: only the picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    x = [r["images"] for r in summary]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        pts = [(xi, r) for xi, r in zip(x, summary, strict=True) if key in r]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        med = [p[1][key] for p in pts]
        lo = [p[1][f"{key}_range"][0] for p in pts]
        hi = [p[1][f"{key}_range"][1] for p in pts]
        ax.plot(xs, med, marker="o", label=f"{label} (median)")
        ax.fill_between(xs, lo, hi, alpha=0.2, label=f"{label} (range over seeds)")
    ax.set_xscale("log")
    ax.minorticks_off()  # the counts themselves are the ticks
    ax.set_xticks(x, [str(v) for v in x])
    finish_plot(fig, ax, path, "normal training images (log scale)", "AUROC", title, "lower right")


def one(config: str, data: Path, out: Path, n: int, seed: int, ablation: bool, progress: bool) -> dict:
    """Train (unless OUT/runs/nN_sSEED already holds a run) and score one shot count and seed."""
    run_dir = out / "runs" / f"n{shot_label(n)}_s{seed}"
    if n != ALL:
        check_reuse(data, out / "data" / f"n{n}_s{seed}", run_dir, n, seed)
    folder = data if n == ALL else subset_folder(data, out / "data" / f"n{n}_s{seed}", n, seed)
    return {"shots": n} | train_and_score(config, folder, run_dir, seed, ablation, progress, cmle_if_it_fits=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="MVTec-style folder (train/good, test/, captions.jsonl)")
    p.add_argument("--config", default="small", help="a shipped config's name (`cmg_configs`) or a YAML path")
    p.add_argument("--shots", default="25,50,100,all", type=parse_shots,
                   help="training image counts, comma-separated; 'all' is the whole folder (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", type=seed_list, help="seeds, comma-separated: each draws its own images and trains "
                                                    "with that seed (default %(default)s)")
    p.add_argument("--ablation", action="store_true",
                   help="also score the image-only baseline: the table gains CMG's margin over it per count")
    p.add_argument("--no-progress", action="store_true")
    add_out_argument(p, "the subsets, runs, shots.json, shots.md and shots.png")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cmg.config import load_config, resolve_config
    from cmg.dataset import training_images
    from cmg_train.train import min_training_images

    if not (args.data / "train" / "good").is_dir():
        raise CMGError(f"--data {args.data}: no train/good folder")
    # Every count checked before the first training: a typo found after hours of training loses them
    cfg = load_config(resolve_config(args.config))
    have, need = len(training_images(args.data)), min_training_images(cfg.data.val_fraction)
    for n in (n for n in args.shots if n != ALL):
        if n > have:
            raise CMGError(f"--shots {n}: {args.data}/train/good has only {have} images")
        if n < need:
            raise CMGError(f"--shots {n}: training needs at least {need} images")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, s) for n in args.shots for s in args.seeds]
    rows = []
    for n, s in tqdm(jobs, desc="shots", unit="run", disable=args.no_progress):
        rows.append(one(args.config, args.data, args.out, n, s, args.ablation, progress=not args.no_progress))
    summary = summarise(rows)
    (args.out / "shots.json").write_text(json.dumps({"config": args.config, "data": str(args.data.resolve()),
                                                     "rows": rows, "summary": summary}, indent=2))
    table = markdown(summary, args.config, str(args.data))
    (args.out / "shots.md").write_text(table)
    plot(summary, args.out / "shots.png", f"{args.config}: AUROC against normal training images")
    print(table, end="")
    return 0
