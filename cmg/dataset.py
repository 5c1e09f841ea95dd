"""Loader for MVTec-AD style folders, with optional captions and synthetic metadata.

Layout: `train/good/*`, `test/<kind>/*`, `ground_truth/<kind>/<name>_mask.png`, plus
optional `captions.jsonl` (`{"file", "caption"}`), `meta.jsonl` (part/clutter masks of
synthetic scenes) and `synth.json`. Any real MVTec category folder loads too: without
captions every image gets the product prompt, e.g. "a photo of a hex nut".

Images become frames only through `cmg.frames.load_frame`, so training sees exactly what
the clients send. numpy/PIL only: no torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cmg.errors import CMGError
from cmg.frames import load_frame, opened_image, to_rgb8, upright

# one list for training folders and the clients' folder walk: a line whose camera writes .webp
# trains on the same files it streams
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
SPLITS = ("train", "test")
# `cmg data synth` marks a folder it is writing (or was stopped writing) with this file
SYNTH_INCOMPLETE = "synth.incomplete"


@dataclass(frozen=True)
class Sample:
    """One image of a split; `label` is 0 for normal (`good`) and 1 for anomalous."""

    path: Path
    split: str
    defect: str
    label: int
    caption: str
    mask_path: Path | None
    meta: dict | None


def _relative(name: str, root: Path) -> str:
    """A line's `file` as a path under `root`, written with `/`: Windows backslashes and a path
    that starts at `root` itself (absolute) name the same image as `train/good/000.png`."""
    path = Path(name.replace("\\", "/"))
    if path.is_absolute():
        for base in (root, root.resolve()):
            if path.is_relative_to(base):
                return path.relative_to(base).as_posix()
    return path.as_posix()


def caption_text(text: str) -> str:
    """A caption as every model reads it: case, runs of spaces and a closing full stop do not
    make it another caption. CMLE counts and weighs distinct captions: "A red nut." beside "a
    red nut" had passed the distinct-caption minimum as two and taken most of each other's
    locally linear weight (a degenerate W). The text encoders lowercase anyway; the full stop
    they would have read is gone (a run trained before reads its captions without it)."""
    return " ".join(text.casefold().split()).rstrip(" .")


def read_captions(path: Path, root: Path, skipped: list[str] | None = None) -> dict[str, str]:
    """captions.jsonl -> {file relative to `root`: caption_text(caption)}; `skipped` gets the
    names of lines whose file does not exist (`_read_jsonl`)."""
    rows = _read_jsonl(path, root, ("file", "caption"), skipped)
    return {k: caption_text(v["caption"]) for k, v in rows.items()}


def visible(path: Path) -> bool:
    """Not a hidden name: macOS copies put an AppleDouble `._NAME.png` (not an image) beside
    every file, and a hidden folder (.thumbnails) is no defect kind."""
    return not path.name.startswith(".")


def image_name(path: Path) -> bool:
    """A visible name with an image suffix (whether the file is there is the reader's to say)."""
    return visible(path) and path.suffix.lower() in IMAGE_SUFFIXES


def is_image(path: Path) -> bool:
    """A file this layout reads as an image: a visible name with an image suffix."""
    return path.is_file() and image_name(path)


def nested_images(folder: Path) -> int:
    """Images in subfolders of `folder`, which the flat MVTec layout does not read."""
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.parent != folder and is_image(p)
               and all(visible(Path(part)) for part in p.relative_to(folder).parts))


def _read_jsonl(path: Path, root: Path, required: tuple[str, ...],
                skipped: list[str] | None = None) -> dict[str, dict]:
    """Lines keyed by their `file` (relative to `root`); errors name the file and line. A line
    naming a training image that is not there is an error (a misspelt name would leave an
    image without its caption); one naming another image is skipped (test images removed
    from a folder leave their lines behind, and nothing reads a test image's caption), its
    name as written added to `skipped`."""
    rows: dict[str, dict] = {}
    line_of: dict[str, int] = {}
    with path.open(encoding="utf-8-sig") as fh:  # -sig: a BOM (Notepad, Excel) is not part of line 1
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CMGError(f"{path}:{lineno}: malformed line ({exc.msg})") from exc
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in required):
                raise CMGError(f"{path}:{lineno}: malformed line: expected an object with string "
                               f"keys {', '.join(required)}")
            rel = _relative(row["file"], root)
            if not (root / rel).is_file():
                if not rel.startswith("train/"):
                    if skipped is not None:
                        skipped.append(row["file"])
                    continue
                raise CMGError(f"{path}:{lineno}: file {rel!r} does not exist under {root} "
                               "(if the image was removed on purpose, remove its line)")
            # Which of two captions for one training image is meant is the user's to say
            if rel in rows and row != rows[rel] and rel.startswith("train/"):
                raise CMGError(f"{path}:{lineno}: file {rel!r} is named again with other values (first on "
                               f"line {line_of[rel]}): keep one line per training image")
            if rel not in rows:  # a copy of a line, or a test image's (nothing reads its caption): the first
                rows[rel], line_of[rel] = row, lineno
    return rows


def _unmatched_note(names: list[str], root: Path) -> str:
    """'; N lines name files that do not exist (first ..., ...)' for the lines `read_captions`
    skipped: captions written relative to train/good instead of the data folder (a common
    slip) are otherwise skipped unseen."""
    if not names:
        return ""
    first = names[0]
    where = (f", which is train/good/{first}: name the files relative to {root}"
             if (root / "train" / "good" / first).is_file() else "")
    return f"; {len(names)} lines name files that do not exist (first: {first!r}{where})"


def _mask_levels(img: Image.Image, path: Path) -> np.ndarray:
    """A mask's own values, 2-D: palette indices (index 0 is the background), grey or 16-bit
    levels as stored, or the strongest channel of a colour mask (alpha dropped)."""
    if img.mode in ("P", "1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img)
    return np.asarray(to_rgb8(img, f"mask {path}")).max(axis=2)


def _load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A binary mask image, read from its own values before any scaling, so the formats
    datasets ship read alike: 0/255 (MVTec AD), 0/1, 16-bit, palette label masks, colour
    masks; two levels split at the lower, a soft mask at half its range; then resized with
    NEAREST (interpolation must not invent labels)."""
    with opened_image(path, "mask", fix=" (downscale the mask)") as img:  # its problems: a CMGError naming it
        levels = _mask_levels(upright(img), path).astype(np.float64)  # as its image is read
    found = np.unique(levels)
    if found.size == 1:
        marked = levels > 0  # all background, or all defect
    elif found.size == 2:
        marked = levels > found[0]
    else:
        marked = levels > (found[0] + found[-1]) / 2
    height, width = size
    if marked.shape != (height, width):
        resized = Image.fromarray(marked.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        marked = np.asarray(resized) > 127
    return marked


class MVTecFolder:
    """One product line's folder: samples per split, frames, and ground-truth masks."""

    def __init__(self, root: str | Path, prompt: str = "a photo of a {category}",
                 category: str | None = None, captions: bool = True, need_train: bool = True) -> None:
        """`need_train=False`: a folder of test frames alone (`cmg eval --data` on new frames)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        if need_train and not (self.root / "train" / "good").is_dir():
            raise CMGError(f"dataset {self.root}: missing folder {self.root / 'train' / 'good'}")
        if "{category}" not in prompt:
            raise CMGError(f"prompt template {prompt!r} has no {{category}} placeholder")
        synth = self.root / "synth.json"
        self.info: dict | None = None
        if synth.is_file():
            try:
                self.info = json.loads(synth.read_text())
            except json.JSONDecodeError as exc:
                raise CMGError(f"{synth}: not valid JSON ({exc.msg})") from exc
        self.category = category or (self.info or {}).get("category") or self.root.resolve().name
        self.prompt = caption_text(prompt.format(category=self.category.replace("_", " ")))
        cap_path = self.root / "captions.jsonl"
        self.captions: dict[str, str] = {}
        if captions and cap_path.is_file():  # captions=False: `cmg captions --force` replaces the file
            self.captions = read_captions(cap_path, self.root)
        meta_path = self.root / "meta.jsonl"
        self.meta: dict[str, dict] = _read_jsonl(meta_path, self.root, ("file",)) if meta_path.is_file() else {}

    @property
    def has_captions(self) -> bool:
        return bool(self.captions)

    def _images(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if is_image(p))

    def _masks(self, kind: str) -> dict[str, Path]:
        """ground_truth/<kind>'s mask images by lower-case stem (any image suffix, any case)."""
        folder = self.root / "ground_truth" / kind
        if not folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for p in sorted(folder.iterdir(), key=lambda q: (q.suffix != ".png", q.name)):  # .png first
            if is_image(p):
                found.setdefault(p.stem.lower(), p)
        return found

    def samples(self, split: str) -> list[Sample]:
        """`train`: train/good; `test`: every test/<kind> folder (sorted, so order is stable)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        base = self.root / split
        if split == "train":
            folders = [base / "good"]
        else:
            if not base.is_dir():
                raise CMGError(f"dataset {self.root}: missing folder {base}")
            folders = sorted(p for p in base.iterdir() if p.is_dir() and visible(p))
        out: list[Sample] = []
        for folder in folders:
            kind = folder.name
            masks = self._masks(kind) if kind != "good" else {}
            for path in self._images(folder):
                rel = path.relative_to(self.root).as_posix()
                meta = self.meta.get(rel)
                mask = None
                if kind != "good":
                    # MVTec AD's NAME_mask.png; NAME_mask or NAME with another image suffix too
                    gt = masks.get(f"{path.stem}_mask".lower()) or masks.get(path.stem.lower())
                    if meta and meta.get("gt_mask"):
                        gt = self.root / meta["gt_mask"]
                    mask = gt if gt is not None and gt.is_file() else None
                out.append(Sample(path=path, split=split, defect=kind, label=int(kind != "good"),
                                  caption=self.captions.get(rel, self.prompt), mask_path=mask, meta=meta))
        if not out:
            raise CMGError(f"dataset {self.root}: split {split!r} has no images "
                           f"(looked in {', '.join(str(f) for f in folders) or base})")
        return out

    def frames(self, samples: list[Sample], size: tuple[int, int], progress: bool = False) -> np.ndarray:
        """uint8 [N, H, W, 3] frames; `size` is (height, width)."""
        height, width = size
        out = np.empty((len(samples), height, width, 3), np.uint8)
        for i, s in enumerate(tqdm(samples, desc="frames", unit="img", disable=not progress)):
            out[i] = load_frame(s.path, size)
        return out

    def gt_mask(self, sample: Sample, size: tuple[int, int]) -> np.ndarray:
        """bool [H, W] anomaly ground truth; all False for normal images or a missing mask."""
        if sample.label == 0 or sample.mask_path is None:
            return np.zeros(size, bool)
        return _load_mask(sample.mask_path, size)

    def _meta_mask(self, sample: Sample, key: str, size: tuple[int, int]) -> np.ndarray | None:
        if not sample.meta or not sample.meta.get(key):
            return None
        return _load_mask(self.root / sample.meta[key], size)

    def part_mask(self, sample: Sample, size: tuple[int, int]) -> np.ndarray | None:
        """bool [H, W] product-part pixels (synthetic data only), else None."""
        return self._meta_mask(sample, "part_mask", size)

    def clutter_mask(self, sample: Sample, size: tuple[int, int]) -> np.ndarray | None:
        """bool [H, W] irrelevant clutter pixels (synthetic data only), else None."""
        return self._meta_mask(sample, "clutter_mask", size)


def training_images(root: str | Path) -> list[Path]:
    """The images of `root/train/good`, sorted: what `cmg train` learns from and `cmg
    captions` captions (without reading a captions.jsonl that may be about to be replaced)."""
    good = Path(root) / "train" / "good"
    return sorted(p for p in good.iterdir() if is_image(p))


def check_training_folder(root: str | Path, image_size: int, need_captions: bool = True,
                          min_unique_captions: int = 20, min_images: int = 8, why_min: str = "",
                          progress: bool = False, say_shapes: bool = True) -> dict:
    """Everything `cmg train` needs from the data folder, checked before any training.

    Layout (`train/good` with at least `min_images` images), every training image readable
    (through the same `cmg.frames` conversion training uses), and, when CMLE is on
    (`need_captions`), a `captions.jsonl` giving every training image a non-empty caption
    with at least `min_unique_captions` distinct ones (`why_min` says what the image minimum
    is made of, for the error). Raises CMGError naming the first
    problem; returns counts. (CMLE builds its graph on the training share after the
    held-out split, so a count just at the minimum can still fall short there.)
    """
    root = Path(root)
    if not root.exists():
        raise CMGError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise CMGError(f"dataset {root} is a file, not a folder")
    if (root / SYNTH_INCOMPLETE).exists():
        raise CMGError(f"dataset {root} is not finished: `cmg data synth` is writing it, or was stopped "
                       f"({SYNTH_INCOMPLETE}); run it again")
    good = root / "train" / "good"
    if not good.is_dir():
        raise CMGError(f"dataset {root}: missing folder {good} (expected the MVTec layout train/good/*.png)")
    images = training_images(root)
    broken = sorted(p.name for p in good.iterdir() if image_name(p) and not p.exists())
    if broken:  # said, not read: a link whose target moved is no image, but the user meant one
        print(f"dataset {root}: {len(broken)} name(s) in {good} link to nothing and are not used: "
              f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}", file=sys.stderr)
    nested = nested_images(good)
    if nested:  # said, not read: the MVTec layout is flat, and a subfolder may hold anything
        print(f"dataset {root}: {nested} image(s) in subfolders of {good} are not used (the layout is flat: "
              "move them into train/good to train on them)", file=sys.stderr)
    if len(images) < min_images:
        raise CMGError(f"dataset {root}: {good} has {len(images)} images ({', '.join(IMAGE_SUFFIXES)}); "
                       f"training needs at least {min_images}" + (f" ({why_min})" if why_min else ""))
    other_shapes = 0
    for path in tqdm(images, desc="checking images", unit="img", leave=False, disable=not progress):
        load_frame(path, (image_size, image_size))  # FrameError names the file
        with Image.open(path) as im:  # the header only: the size before the frame conversion
            other_shapes += im.size[0] != im.size[1]
    if other_shapes and say_shapes:  # said once: a user with 1024 x 768 frames should know what the model sees
        print(f"dataset {root}: {other_shapes} of {len(images)} training images are not square: each frame is "
              f"stretched to {image_size} x {image_size} px (crop them to the part's region to keep its "
              "proportions)", file=sys.stderr)
    summary = {"images": len(images), "captions": 0, "unique_captions": 0, "not_square": other_shapes}
    if not need_captions:
        return summary
    cap_path = root / "captions.jsonl"
    off = "or train without CMLE: `cmle.enabled: false` in a copy of the config, given as --config PATH"
    hint = f"add one caption per training image (`cmg captions --data {root}` writes them), {off}"
    if not cap_path.is_file():
        raise CMGError(f"dataset {root}: no captions.jsonl, which CMLE needs ({hint})")
    unmatched: list[str] = []
    captions = read_captions(cap_path, root, unmatched)
    rels = [p.relative_to(root).as_posix() for p in images]
    missing = [r for r in rels if r not in captions]
    if missing:  # the file exists: never hint at --force, which would replace the user's own captions
        raise CMGError(f"{cap_path}: {len(missing)} of {len(rels)} training images have no caption "
                       f"(first: {', '.join(missing[:3])}){_unmatched_note(unmatched, root)}; add a line "
                       f'{{"file": "{missing[0]}", "caption": ...}} for each, {off}')
    empty = [r for r in rels if not captions[r].strip()]
    if empty:
        raise CMGError(f"{cap_path}: {len(empty)} training images have an empty caption (first: {empty[0]})")
    unique = len({captions[r] for r in rels})  # as CMLE counts them
    if unique < min_unique_captions:
        more = ("captions that tell the images apart" if len(rels) >= min_unique_captions
                else f"at least {min_unique_captions} training images with captions that tell them apart")
        raise CMGError(f"{cap_path}: only {unique} distinct captions among {len(rels)} training images; "
                       f"CMLE needs at least {min_unique_captions} (give it {more}, {off})")
    summary.update(captions=len(rels), unique_captions=unique)
    return summary


def resolve_data(run_dir: Path, data: Path | None, stored: str | None = None) -> Path:
    """The data folder a run used: --data, else the run's training data as `stored` (a loaded
    run's own record, the checkpoint's) or RUN/metrics.json names it. Runs store it resolved;
    an older run's relative path is tried against the working directory and the run folder's
    parents."""
    if data is not None:
        return Path(data)
    metrics = run_dir / "metrics.json"
    if stored is None:
        try:
            stored = json.loads(metrics.read_text())["data"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CMGError(f"no --data given and {metrics} names no training data ({exc})") from exc
    stored = Path(stored)
    if stored.is_absolute():
        if not stored.is_dir():
            raise CMGError(f"run {run_dir} trained on {stored}, which is not there any more: "
                           "pass --data DIR (where that folder is now)")
        return stored
    run_abs = run_dir.resolve()
    for base in (Path.cwd(), run_abs, *run_abs.parents):
        if (base / stored / "train").is_dir():
            return base / stored
    raise CMGError(f"{metrics} names the data folder {stored} relative to where `cmg train` ran; "
                   "pass --data")
