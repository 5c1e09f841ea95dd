"""`cmg captions --data DIR`: a `captions.jsonl` for a folder that has none (MVTec AD has none).

Two sources, one file format (`{"file", "caption"}` per training image, what `cmg train`
reads):
- open_clip's CoCa captioner when weights are given (`--weights FILE`, or `--pretrained TAG`
  for a machine that may download once): each training frame is captioned by the model,
  decoded with open_clip's tokenizer.
- without weights, a template filled with the folder's own names: the part (the folder's
  category) and the words and number of each file name. These captions say nothing about
  what an image shows, so CMLE's caption graph then links images by file name only:
  little structure to learn from (the command says so).

Images are read through `cmg.frames.load_frame`, the one conversion training and the
clients use, at the captioner's input size. An existing captions.jsonl is never replaced
without `--force`; the file is written through a temporary file and a rename.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cmg.config import CMLEConfig
from cmg.dataset import MVTecFolder, caption_text, check_training_folder, training_images
from cmg.errors import CMGError
from cmg.files import write_atomic
from cmg.frames import load_frame
from cmg.quiet import quiet_logs

CAPTIONS = "captions.jsonl"
COCA_ARCH = "coca_ViT-B-32"
TEMPLATE = "a photo of a {part}{file}"  # {file}: ", <words of the file name>, number <n>" or ""


def file_words(path: Path) -> str:
    """', cam two left, number 12' for 'cam2_left_0012.png': the name's words, then its number."""
    stem = path.stem
    words = [w.lower() for w in re.findall(r"[^\W\d_]+", stem)]  # letters of any script: tête, 日本語
    numbers = [str(int(n)) for n in re.findall(r"\d+", stem)]
    parts = [" ".join(words)] if words else []
    if numbers:
        parts.append("number " + " ".join(numbers))
    return "".join(f", {p}" for p in parts)


def check_template(template: str) -> None:
    """Fields as str.format reads them: `{{part}}` is a literal, not the part; `{part!r}` is."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise CMGError(f"caption template {template!r}: {exc}") from None
    other = sorted({f for f in fields if f not in ("part", "file")})
    if other:
        raise CMGError(f"caption template {template!r}: only {{part}} and {{file}} can be filled "
                       f"({', '.join(repr(f) for f in other)})")
    if "part" not in fields:
        raise CMGError(f"caption template {template!r} has no {{part}} placeholder")


def template_captions(paths: Sequence[Path], part: str, template: str = TEMPLATE) -> list[str]:
    """The fallback: the template filled with the part name and each file's own name."""
    check_template(template)
    try:
        captions = [template.format(part=part.replace("_", " "), file=file_words(p)) for p in paths]
    except (KeyError, IndexError, ValueError) as exc:
        raise CMGError(f"caption template {template!r}: only {{part}} and {{file}} can be filled ({exc})") from None
    return [caption_text(c).replace(" ,", ",") for c in captions]  # "a {part} {file}": no " ," or doubled spaces


def load_captioner(arch: str, weights: str):
    """An open_clip CoCa model through open_clip's own loading code (file or pretrained tag)."""
    # heavy (open_clip, torch): only the CoCa captioner needs them, not template captions
    import open_clip

    from cmg_train.teacher.model import open_clip_error

    if arch not in open_clip.list_models() or not arch.startswith("coca"):
        coca = [m for m in open_clip.list_models() if m.startswith("coca")]
        raise CMGError(f"captioner: {arch!r} is not an open_clip CoCa architecture ({', '.join(coca)})")
    if not weights.strip():
        raise CMGError("--weights is empty: give a CoCa weights file, or leave --weights out for the template")
    if Path(weights).is_dir():
        raise CMGError(f"captioner weights {weights} is a folder: give the weights file in it")
    if (os.sep in weights or Path(weights).suffix) and not Path(weights).is_file():  # a path, not a tag
        raise CMGError(f"captioner weights not found: {weights}")
    try:  # open_clip and the hub log each failed try; the one line below says it
        with quiet_logs(logging.ERROR):
            model = open_clip.create_model(arch, pretrained=weights)
    except Exception as exc:  # noqa: BLE001 - torch.load, pickle, zip, download errors all differ
        raise open_clip_error("captioner", weights, arch, exc) from exc
    return model.eval()


def coca_captions(model, images: Sequence[Path], arch: str = COCA_ARCH, seq_len: int = 20, min_len: int = 3,
                  batch: int = 8, progress: bool = True) -> list[str]:
    """Image files -> one caption each (read a batch at a time at the model's input size),
    greedy decoding through CoCa's own forward
    (image encoded once, the text decoder fed the tokens so far), decoded with open_clip's
    tokenizer. Not `model.generate`: open_clip 3.3 imports transformers' BeamSearchScorer
    for it, which transformers 5 (needed by sentence-transformers 6 here) no longer has
    (mlfoundations/open_clip#1129)."""
    # heavy (open_clip, torch): only the CoCa captioner needs them, not template captions
    import open_clip
    import torch

    from cmg_train.preprocess import Preprocess

    tokenizer = open_clip.get_tokenizer(arch)
    sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    preprocess = Preprocess(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD))
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    out: list[str] = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch), desc="captions", unit="batch", disable=not progress):
            x = preprocess(torch.from_numpy(np.stack([load_frame(p, (size, size)) for p in images[i:i + batch]])))
            latent, embs = model._encode_image(x)
            tokens = torch.full((len(x), 1), sot, dtype=torch.long)
            done = torch.zeros(len(x), dtype=torch.bool)
            for step in range(seq_len - 1):
                logits = model(x, tokens, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
                if step < min_len:
                    logits[:, eot] = -float("inf")  # as open_clip's MinLengthLogitsProcessor
                nxt = torch.where(done, torch.full_like(done, eot, dtype=torch.long), logits.argmax(-1))
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                done |= nxt == eot
                if done.all():
                    break
            for row in tokens:
                text = open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "")
                out.append(caption_text(text))
    return out


def write_captions(root: Path, rows: dict[str, str], force: bool = False) -> Path:
    """DIR/captions.jsonl (one {"file", "caption"} per image), atomically; never over an
    existing file unless `force`, and then the old one is kept beside it
    (captions.jsonl.bak-TIME): hand-written captions are a user's work, replaced in one step."""
    path = root / CAPTIONS
    if path.exists() and not force:
        raise CMGError(f"{path} exists: cmg captions never replaces captions without --force")
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup, n = path.with_name(f"{CAPTIONS}.bak-{stamp}"), 1
        while backup.exists():  # two replacements in one second: the first backup holds the user's file
            backup, n = path.with_name(f"{CAPTIONS}.bak-{stamp}-{n}"), n + 1
        shutil.copy2(path, backup)
        kept = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        print(f"cmg captions: replacing {path} ({kept} lines); the old file is kept as {backup.name}",
              file=sys.stderr)
    # write_atomic: the umask's mode for a new file (the training account reads it), the old
    # file's own for a replaced one
    return write_atomic(path, "".join(json.dumps({"file": rel, "caption": caption}) + "\n"
                                      for rel, caption in rows.items()))


def caption_folder(root: Path, weights: str | None = None, arch: str = COCA_ARCH, force: bool = False,
                   template: str = TEMPLATE, seq_len: int = 20, batch: int = 8, progress: bool = True,
                   model=None) -> dict:
    """Caption every training image of `root` (train/good) and write captions.jsonl.

    `model` (an open_clip CoCa already built) or `weights` selects the captioner; neither
    selects the template. Returns a summary with the distinct-caption count CMLE checks.
    """
    # cmle.fit imports torch: importing this module (`cmg captions --help`) stays torch-free
    from cmg_train.cmle.fit import unique_captions_needed

    root = Path(root)
    if (root / CAPTIONS).exists() and not force:  # before minutes of captioning, not after
        raise CMGError(f"{root / CAPTIONS} exists: cmg captions never replaces captions without --force")
    check_training_folder(root, 8, need_captions=False, min_images=1, say_shapes=False)  # layout, readable
    paths = training_images(root)
    category = MVTecFolder(root, captions=False).category
    rels = [p.relative_to(root).as_posix() for p in paths]
    check_template(template)  # the fallback's template: before minutes of captioning, not after
    if model is None and weights is not None:
        model = load_captioner(arch, weights)
    if model is not None:
        captions = coca_captions(model, paths, arch, seq_len, batch=batch, progress=progress)
        fallback = template_captions(paths, category, template)
        empty = [i for i, c in enumerate(captions) if not c]
        for i in empty:  # a caption must not be empty; say how many were filled
            captions[i] = fallback[i]
        source = f"open_clip {arch}"
    else:
        captions, empty, source = template_captions(paths, category, template), [], "template"
    path = write_captions(root, dict(zip(rels, captions, strict=True)), force)
    need = unique_captions_needed(CMLEConfig())
    return {"captions": str(path), "source": source, "images": len(rels),
            "distinct": len({caption_text(c) for c in captions}),  # as training counts them
            "cmle_needs": need, "empty_filled_from_template": len(empty)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="MVTec-style folder (train/good/*)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="open_clip CoCa weights file (or a pretrained tag such as "
                        "mscoco_finetuned_laion2b_s13b_b90k, downloaded once by open_clip)")
    p.add_argument("--arch", default=COCA_ARCH, help=f"open_clip CoCa architecture (default {COCA_ARCH})")
    p.add_argument("--template", default=TEMPLATE,
                   help="fallback without --weights: {part} is the folder's category, {file} the file's "
                        "own words and number (default %(default)r)")
    p.add_argument("--seq-len", type=int, default=20, help="most tokens per CoCa caption (default 20)")
    p.add_argument("--batch", type=int, default=8, help="images per CoCa generate call")
    p.add_argument("--force", action="store_true", help="replace an existing captions.jsonl")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.seq_len < 5:
        raise CMGError(f"--seq-len {args.seq_len}: must be >= 5 (captions of at least 3 tokens)")
    if args.batch < 1:
        raise CMGError(f"--batch {args.batch}: must be >= 1")
    summary = caption_folder(args.data, args.weights, args.arch, args.force, args.template, args.seq_len,
                             args.batch, progress=not args.no_progress)
    print(json.dumps(summary))
    if summary["source"] == "template":
        print(f"note: no captioner (--weights): captions are the template filled with the part name and file "
              f"names ({summary['distinct']} distinct). They say nothing about what each image shows, so CMLE "
              "has little structure to learn from (its caption graph links images by file name). For real "
              "captions give --weights (open_clip CoCa) or write captions.jsonl yourself; or set "
              "cmle.enabled: false.")
    if summary["distinct"] < summary["cmle_needs"]:
        print(f"note: {summary['distinct']} distinct captions: cmg train (CMLE) needs at least "
              f"{summary['cmle_needs']}; add more images, give file names that differ, or set "
              "cmle.enabled: false.")
    return 0
