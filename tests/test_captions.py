"""`cmg captions`: a captions.jsonl for a folder without one, that `cmg train` then accepts.

The CoCa path runs a randomly initialised open_clip CoCa (open_clip's own `coca_ViT-B-32`
config, no weights): its captions are nonsense, but the image encoder, the text decoder and
open_clip's tokenizer are the real ones. The fallback fills a template from the folder's
own names.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg.config import load_config, resolve_config
from cmg.dataset import MVTecFolder, check_training_folder
from cmg.errors import CMGError
from cmg_app.cli import main
from cmg_train.captions import caption_folder, file_words, template_captions
from cmg_train.cmle.fit import check_captions, unique_captions_needed
from cmg_train.train import split_train_val


def uncaptioned(root: Path, n: int, names: str = "{i:03d}.png", seed: int = 0) -> Path:
    """An MVTec-style folder of `n` random normal images and no captions (as MVTec AD ships)."""
    good = root / "metal_nut" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good / names.format(i=i))
    return root / "metal_nut"


def rows(root: Path) -> dict[str, str]:
    lines = (root / "captions.jsonl").read_text().splitlines()
    return {r["file"]: r["caption"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("name, words", [
    ("000.png", ", number 0"),
    ("cam2_left_0012.png", ", cam left, number 2 12"),
    ("Scratch-Free.JPG", ", scratch free"),
])
def test_file_words(name, words):
    assert file_words(Path(name)) == words


def test_template_needs_the_part():
    with pytest.raises(CMGError, match="no {part} placeholder"):
        template_captions([Path("a.png")], "nut", "a photo")
    with pytest.raises(CMGError, match="only {part} and {file}"):
        template_captions([Path("a.png")], "nut", "a {part} by {camera}")


def test_template_fields_are_read_as_str_format_reads_them():
    """`{{part}}` is a literal (the part never appeared), `{part!r}` is the part (it was refused
    as "no {part}"), and a space before {file} leaves no " ,"."""
    with pytest.raises(CMGError, match="no {part} placeholder"):
        template_captions([Path("000.png")], "nut", "{{part}}{file}")
    assert template_captions([Path("000.png")], "hex_nut", "a {part!r}") == ["a 'hex nut'"]
    assert template_captions([Path("000.png")], "hex_nut", "a {part}  {file}") == ["a hex nut, number 0"]
    with pytest.raises(CMGError, match="only {part} and {file} can be filled \\('foo'\\)"):
        template_captions([Path("000.png")], "nut", "{part} {foo}")


def test_a_bad_template_or_weights_argument_fails_before_the_captioner_loads(tmp_path, monkeypatch):
    """A CoCa run captioned every image (a minute here) before the fallback's template was read."""
    import cmg_train.captions as cap

    root = uncaptioned(tmp_path, 3)
    monkeypatch.setattr(cap, "load_captioner", lambda *a: pytest.fail("the captioner was loaded"))
    with pytest.raises(CMGError, match="only {part} and {file}"):
        caption_folder(root, weights="coca.pt", template="{part} {foo}", progress=False)
    monkeypatch.undo()
    for weights, needle in (("", "--weights is empty"), (str(tmp_path), "is a folder")):
        with pytest.raises(CMGError, match=needle):
            caption_folder(root, weights=weights, progress=False)


def test_captions_file_is_readable_by_other_accounts(tmp_path):
    """mkstemp's 0600 had hidden captions.jsonl from a training container of another uid."""
    import os
    import stat

    root = uncaptioned(tmp_path, 3)
    old = os.umask(0o022)
    try:
        caption_folder(root, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "captions.jsonl").stat().st_mode) == 0o644


def test_fallback_captions_are_accepted_by_cmg_train(tmp_path, capsys):
    root = uncaptioned(tmp_path, 30)
    assert main(["captions", "--data", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "little structure to learn from" in out and "cmg train (CMLE) needs" not in out
    summary = json.loads(out.splitlines()[0])
    assert summary["source"] == "template" and summary["images"] == 30 == summary["distinct"]
    caps = rows(root)
    assert caps["train/good/007.png"] == "a photo of a metal nut, number 7"
    # What `cmg train --config tiny` checks before any training, on the whole folder and on its split.
    cfg = load_config(resolve_config("tiny"))
    check_training_folder(root, cfg.data.image_size, min_unique_captions=unique_captions_needed(cfg.cmle))
    samples = MVTecFolder(root).samples("train")
    tr, _ = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
    check_captions([samples[i].caption for i in tr.tolist()], cfg.cmle)


def test_too_few_images_says_why_train_will_refuse(tmp_path, capsys):
    root = uncaptioned(tmp_path, 10)
    assert main(["captions", "--data", str(root), "--no-progress"]) == 0
    assert "10 distinct captions: cmg train (CMLE) needs at least 20" in capsys.readouterr().out


def test_existing_captions_are_never_replaced_without_force(tmp_path, capsys):
    root = uncaptioned(tmp_path, 8)
    (root / "captions.jsonl").write_text("mine\n")
    assert main(["captions", "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists: cmg captions never replaces captions without --force" in err[0]
    assert (root / "captions.jsonl").read_text() == "mine\n"
    assert main(["captions", "--data", str(root), "--force", "--template", "a {part} on the belt",
                 "--no-progress"]) == 0
    assert set(rows(root).values()) == {"a metal nut on the belt"}
    assert not list(root.glob(".captions.*"))  # the temporary file went with the rename


def test_missing_captioner_weights_is_one_line(tmp_path, capsys):
    root = uncaptioned(tmp_path, 8)
    assert main(["captions", "--data", str(root), "--weights", str(tmp_path / "coca.pt")]) == 2
    assert "captioner weights not found" in capsys.readouterr().err
    assert not (root / "captions.jsonl").exists()


def random_coca():
    """open_clip's coca_ViT-B-32 with random weights. A fresh model's text-decoder output
    projection is all zeros (open_clip fills it from weights), which makes every logit 0:
    it gets random values here so that the tokens depend on the image."""
    import open_clip
    import torch

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = open_clip.create_model("coca_ViT-B-32", pretrained=None).eval()
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
    return model


@pytest.mark.slow
def test_coca_captions_through_open_clip(tmp_path, capsys):
    root = uncaptioned(tmp_path, 3)
    shutil.copy(root / "train" / "good" / "000.png", root / "train" / "good" / "003.png")  # same image twice
    summary = caption_folder(root, model=random_coca(), seq_len=6, batch=4, progress=False)
    assert summary["source"] == "open_clip coca_ViT-B-32" and summary["images"] == 4
    caps = rows(root)
    assert len(caps) == 4 and all(c.strip() for c in caps.values())
    assert all("<start_of_text>" not in c and "<end_of_text>" not in c for c in caps.values())
    # Decoded by open_clip's tokenizer from the image: the same image gets the same words,
    # different images (here) do not all get one caption.
    assert caps["train/good/000.png"] == caps["train/good/003.png"]
    assert len(set(caps.values())) >= 2
    assert MVTecFolder(root).samples("train")[1].caption == caps["train/good/001.png"]


def test_force_keeps_every_replaced_file(tmp_path):
    """`--force` keeps the file it replaces beside it, also when two replacements fall in one
    second (the second backup had overwritten the first, the user's own captions)."""
    from cmg_train.captions import write_captions

    (tmp_path / "captions.jsonl").write_text('{"file": "train/good/0.png", "caption": "mine"}\n')
    write_captions(tmp_path, {"train/good/0.png": "first"}, force=True)
    write_captions(tmp_path, {"train/good/0.png": "second"}, force=True)
    kept = sorted(p.read_text() for p in tmp_path.glob("captions.jsonl.bak-*"))
    assert len(kept) == 2 and any("mine" in k for k in kept) and any("first" in k for k in kept)
    assert "second" in (tmp_path / "captions.jsonl").read_text()
