"""MVTec-style loader: samples, captions, frames, masks, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg.dataset import MVTecFolder, Sample
from cmg.errors import CMGError
from cmg.frames import FrameError
from cmg_data.synth import ANOMALIES, synthesize


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("ds") / "hex", "tiny", seed=1, n_train=8, n_test_good=3,
                      n_test_per_anomaly=2, progress=False)


@pytest.fixture
def data(source, tmp_path) -> Path:
    """A private copy each test may break."""
    return Path(shutil.copytree(source, tmp_path / "hex"))


def _captions(root: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    return {r["file"]: r["caption"] for r in rows}


def test_samples_labels_captions_and_masks(source):
    ds = MVTecFolder(source)
    assert ds.category == "hex_nut" and ds.has_captions
    caps = _captions(source)
    train = ds.samples("train")
    assert [s.path.name for s in train] == [f"{i:03d}.png" for i in range(8)]
    assert all(s.label == 0 and s.defect == "good" and s.split == "train" and s.mask_path is None for s in train)
    assert [s.caption for s in train] == [caps[f"train/good/{i:03d}.png"] for i in range(8)]
    assert all(s.meta and s.meta["attrs"]["category"] == "hex_nut" for s in train)
    test = ds.samples("test")
    assert sorted({s.defect for s in test}) == sorted(("good",) + ANOMALIES)
    assert len(test) == 3 + 2 * len(ANOMALIES)
    for s in test:
        assert s.label == int(s.defect != "good")
        if s.label:
            assert s.mask_path == source / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
        else:
            assert s.mask_path is None
    with pytest.raises(ValueError, match="split"):
        ds.samples("val")


def test_frames_are_the_pngs_and_resize_through_frames(source):
    ds = MVTecFolder(source)
    samples = ds.samples("test")[:4]
    frames = ds.frames(samples, (64, 64))
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    for f, s in zip(frames, samples, strict=True):
        assert (f == np.asarray(Image.open(s.path).convert("RGB"))).all()
    small = ds.frames(samples, (32, 48), progress=True)
    assert small.shape == (4, 32, 48, 3)
    assert ds.frames([], (16, 16)).shape == (0, 16, 16, 3)


def test_gt_part_and_clutter_masks(source):
    ds = MVTecFolder(source)
    test = ds.samples("test")
    good = next(s for s in test if s.label == 0)
    bad = next(s for s in test if s.defect == "hole")
    assert not ds.gt_mask(good, (64, 64)).any()
    gt = ds.gt_mask(bad, (64, 64))
    assert gt.dtype == bool and gt.any()
    assert (gt == (np.asarray(Image.open(bad.mask_path)) > 127)).all()
    up = ds.gt_mask(bad, (128, 128))  # NEAREST: every pixel doubles, nothing is invented
    assert (up == np.kron(gt, np.ones((2, 2), bool))).all()
    part, clutter = ds.part_mask(bad, (64, 64)), ds.clutter_mask(bad, (64, 64))
    assert part is not None and clutter is not None
    assert not (gt & ~part).any() and not (part & clutter).any()
    assert ds.part_mask(bad, (32, 32)).shape == (32, 32)


def test_a_soft_mask_is_split_at_half_its_range(tmp_path):
    """A soft mask's faint halo (40 of 200) is not defect: only what lies above half the range
    is marked, not everything above the background."""
    from cmg.dataset import _load_mask

    levels = np.zeros((32, 32), np.uint8)
    levels[4:20, 4:20] = 40
    levels[8:16, 8:16] = 200
    Image.fromarray(levels).save(tmp_path / "soft.png")
    assert np.array_equal(_load_mask(tmp_path / "soft.png", (32, 32)), levels == 200)


def test_plain_mvtec_folder_without_captions_or_meta(data, tmp_path):
    for name in ("captions.jsonl", "meta.jsonl", "synth.json"):
        (data / name).unlink()
    plain = Path(shutil.move(str(data), str(tmp_path / "metal_nut")))
    ds = MVTecFolder(plain)
    assert ds.category == "metal_nut" and not ds.has_captions
    s = ds.samples("train")[0]
    assert s.caption == "a photo of a metal nut" and s.meta is None
    assert ds.part_mask(s, (64, 64)) is None and ds.clutter_mask(s, (64, 64)) is None
    assert MVTecFolder(plain, prompt="{category} on a belt", category="gear").samples("train")[0].caption == "gear on a belt"
    bad = next(s for s in ds.samples("test") if s.label)
    assert ds.gt_mask(bad, (64, 64)).any()  # MVTec naming found without meta.jsonl


def test_captions_absent_uses_prompt_with_category_from_synth_json(data):
    (data / "captions.jsonl").unlink()
    ds = MVTecFolder(data)
    assert {s.caption for s in ds.samples("train")} == {"a photo of a hex nut"}


def test_missing_root_and_missing_train_good(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MVTecFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CMGError, match=r"train.good"):
        MVTecFolder(tmp_path / "empty")


def test_empty_splits_name_the_folder(data):
    for name in ("captions.jsonl", "meta.jsonl"):  # they would (rightly) name the missing images first
        (data / name).unlink()
    for p in (data / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(CMGError, match=r"split 'train' .*no images.*train.good"):
        MVTecFolder(data).samples("train")
    shutil.rmtree(data / "test")
    with pytest.raises(CMGError, match="test"):
        MVTecFolder(data).samples("test")
    (data / "test" / "good").mkdir(parents=True)
    with pytest.raises(CMGError, match="no images"):
        MVTecFolder(data).samples("test")


def test_unreadable_image_names_the_path(data):
    broken = data / "train" / "good" / "003.png"
    broken.write_bytes(b"not a png")
    ds = MVTecFolder(data)
    with pytest.raises(FrameError, match="003.png"):
        ds.frames(ds.samples("train"), (64, 64))


def test_captions_line_naming_a_missing_file(data):
    lines = (data / "captions.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file": "train/good/777.png", "caption": "a hex nut"})
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CMGError, match=r"captions.jsonl:3: .*train/good/777.png.*remove its line"):
        MVTecFolder(data)


def test_lines_naming_removed_test_images_are_skipped(data):
    """Test images taken out of a folder leave their caption and meta lines behind; nothing
    reads a test image's caption, so they must not make the folder unusable."""
    for name in ("captions.jsonl", "meta.jsonl"):
        if (data / name).is_file():
            with (data / name).open("a") as fh:
                fh.write(json.dumps({"file": "test/good/999.png", "caption": "a hex nut"}) + "\n")
    ds = MVTecFolder(data)
    assert "test/good/999.png" not in ds.captions and ds.samples("test")


@pytest.mark.parametrize("line", ['{"file": "train/good/000.png"', '["a", "b"]',
                                  '{"file": "train/good/000.png"}', '{"file": 3, "caption": "x"}'])
def test_malformed_captions_line(data, line):
    lines = (data / "captions.jsonl").read_text().splitlines()
    lines[4] = line
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CMGError, match=r"captions.jsonl:5: malformed"):
        MVTecFolder(data)


def test_unreadable_mask_names_the_path(data):
    ds = MVTecFolder(data)
    bad = next(s for s in ds.samples("test") if s.label)
    bad.mask_path.write_bytes(b"garbage")
    with pytest.raises(CMGError, match=bad.mask_path.name):
        ds.gt_mask(bad, (64, 64))


def test_sample_is_a_frozen_record(source):
    s = MVTecFolder(source).samples("train")[0]
    assert isinstance(s, Sample)
    with pytest.raises(AttributeError):
        s.label = 1  # type: ignore[misc]


@pytest.mark.parametrize("form", ["0/255", "0/1", "16-bit 0/1", "16-bit 0/65535", "1-bit", "red on black",
                                  "soft, peak 100", "palette index 1", "empty"])
def test_a_mask_reads_the_same_in_every_format_datasets_ship(tmp_path, form):
    """Masks were read after scaling to 8-bit grey at > 127: 0/1, 16-bit 0/1, palette label and
    colour masks read as empty and their defect images left the pixel metrics."""
    from PIL import Image

    from cmg.dataset import _load_mask

    m = np.zeros((32, 32), bool)
    m[8:16, 8:16] = True
    images = {
        "0/255": lambda: Image.fromarray(m.astype(np.uint8) * 255),
        "0/1": lambda: Image.fromarray(m.astype(np.uint8)),
        "16-bit 0/1": lambda: Image.fromarray(m.astype(np.uint16)),
        "16-bit 0/65535": lambda: Image.fromarray(m.astype(np.uint16) * 65535),
        "1-bit": lambda: Image.fromarray(m).convert("1"),
        "red on black": lambda: Image.fromarray(np.stack([m * 255, m * 0, m * 0], -1).astype(np.uint8)),
        "soft, peak 100": lambda: Image.fromarray((m * 100).astype(np.uint8)),
        "empty": lambda: Image.fromarray(np.zeros((32, 32), np.uint8)),
    }
    if form == "palette index 1":
        img = Image.fromarray(m.astype(np.uint8), "P")
        img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # index 1 is dark red: luma 38
    else:
        img = images[form]()
    img.save(tmp_path / "mask.png")
    want = np.zeros_like(m) if form == "empty" else m
    assert np.array_equal(_load_mask(tmp_path / "mask.png", (32, 32)), want)
    assert _load_mask(tmp_path / "mask.png", (16, 16)).sum() == want.sum() // 4  # NEAREST halves each side


def test_what_a_users_copied_folder_holds_besides_the_images(data, capsys):
    """A folder copied from a Mac has an AppleDouble `._NAME.png` (not an image) beside every
    file, and may hold a hidden folder of thumbnails; images may sit in a subfolder. The
    hidden ones are not read (they had stopped training: "unreadable image"), the nested
    ones are said."""
    from cmg.dataset import check_training_folder
    from cmg_clients.client import iter_image_paths

    before = MVTecFolder(data)
    train, test = len(before.samples("train")), [(s.path.name, s.defect) for s in before.samples("test")]
    kind = next(d for d in ANOMALIES if (data / "test" / d).is_dir())
    for folder in (data / "train" / "good", data / "test" / kind):
        (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (data / "test" / ".thumbnails").mkdir()
    shutil.copy(next((data / "test" / "good").iterdir()), data / "test" / ".thumbnails" / "t.png")
    after = MVTecFolder(data)
    assert len(after.samples("train")) == train and [(s.path.name, s.defect) for s in after.samples("test")] == test
    assert not [p for p in iter_image_paths([data / "test"]) if p.name.startswith(".") or ".thumbnails" in p.parts]
    (data / "train" / "good" / "day2").mkdir()
    shutil.copy(next((data / "train" / "good").glob("0*.png")), data / "train" / "good" / "day2" / "x.png")
    check_training_folder(data, 64, min_unique_captions=1)
    assert "1 image(s) in subfolders of" in capsys.readouterr().err
    gif = data / "train" / "good" / "000.gif"  # GIF is an image suffix here as in the clients' walk
    Image.open(next((data / "train" / "good").glob("0*.png"))).save(gif)
    assert gif in {s.path for s in MVTecFolder(data).samples("train")} and gif in iter_image_paths([data / "train"])
    gif.unlink()
    (data / "train" / "good" / "moved.png").symlink_to(data / "nowhere" / "moved.png")  # its target moved
    check_training_folder(data, 64, min_unique_captions=1)
    assert "1 name(s) in" in (err := capsys.readouterr().err) and "moved.png" in err


def test_training_folder_and_the_clients_walk_read_the_same_image_files(data):
    """One list of image suffixes: a camera that writes .webp trains on the files it streams
    (the dataset had read six suffixes, the clients' folder walk nine)."""
    from cmg_clients.client import iter_image_paths

    for name in ("captions.jsonl", "meta.jsonl"):  # they name the .png files
        (data / name).unlink()
    good = data / "train" / "good"
    for png in sorted(good.glob("*.png"))[:3]:
        Image.open(png).save(png.with_suffix(".webp"), lossless=True)
        png.unlink()
    (good / "notes.txt").write_text("not an image")
    listed = {s.path for s in MVTecFolder(data).samples("train")}
    assert sum(p.suffix == ".webp" for p in listed) == 3
    assert set(iter_image_paths([good])) == listed


def test_masks_named_as_users_name_them_are_found(data):
    """MVTec AD's NAME_mask.png, and NAME.png / NAME_mask with another suffix or case."""
    (data / "meta.jsonl").unlink()  # synthetic data names its masks there: here the folder decides
    kind = next(d for d in ANOMALIES if (data / "ground_truth" / d).is_dir())
    masks = sorted((data / "ground_truth" / kind).glob("*_mask.png"))
    masks[0].rename(masks[0].with_name(masks[0].name.replace("_mask", "")))
    masks[1].rename(masks[1].with_name(masks[1].stem + ".PNG"))
    found = {s.path.stem: s.mask_path for s in MVTecFolder(data).samples("test") if s.defect == kind}
    assert all(found.values()), found


def test_caption_lines_written_on_windows_or_with_absolute_paths(data):
    """A BOM (Notepad, Excel), backslashes and a path that starts at the folder itself name
    the same images: they had been refused as 'no caption' for every training image."""
    want = _captions(data)
    lines = []
    for i, (rel, caption) in enumerate(want.items()):
        name = rel.replace("/", "\\") if i % 2 else str(data / rel)
        lines.append(json.dumps({"file": name, "caption": caption}))
    (data / "captions.jsonl").write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    got = {s.path.relative_to(data).as_posix(): s.caption for s in MVTecFolder(data).samples("train")}
    assert got == {k: v for k, v in want.items() if k.startswith("train/")}


def test_captions_differing_only_in_case_spaces_or_a_full_stop_are_one_caption(data):
    """Twenty captions and their "Capitalised." twins had counted as forty distinct ones: past
    CMLE's minimum, and each twin took most of the other's locally linear weight."""
    from cmg.dataset import check_training_folder

    want = _captions(data)
    train = sorted(k for k in want if k.startswith("train/"))
    base = sorted({want[k] for k in train})
    lines = []
    for i, rel in enumerate(train):
        text = base[(i // 2) % 4]
        if i % 2:
            text = "  " + text[0].upper() + text[1:].replace(" ", "   ") + ". "
        lines.append(json.dumps({"file": rel, "caption": text}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert len(train) >= 8 and len(base) >= 4
    assert {s.caption for s in MVTecFolder(data).samples("train")} == set(base[:4])
    assert check_training_folder(data, 64, min_unique_captions=4)["unique_captions"] == 4
    with pytest.raises(CMGError, match="only 4 distinct captions"):
        check_training_folder(data, 64, min_unique_captions=5)


def test_the_category_of_a_folder_given_as_dot_is_its_name(data, monkeypatch):
    monkeypatch.chdir(data)
    (data / "synth.json").unlink()
    assert MVTecFolder(".").category == data.name


def test_training_on_frames_that_are_not_square_says_they_are_stretched(data, capsys):
    """A 1024 x 768 camera's frames become the model's square input without a word had been
    said; the check counts them and says so once."""
    from cmg.dataset import check_training_folder

    check_training_folder(data, 64, min_unique_captions=1)
    assert "not square" not in capsys.readouterr().err
    wide = next((data / "train" / "good").glob("*.png"))
    Image.new("RGB", (96, 64), (120, 120, 120)).save(wide)
    summary = check_training_folder(data, 64, min_unique_captions=1)
    assert summary["not_square"] == 1
    assert "1 of " in (err := capsys.readouterr().err) and "stretched to 64 x 64 px" in err


def test_a_training_image_named_twice_with_two_captions_is_refused_with_both_lines(data):
    """Which caption is meant is the user's to say; an exact copy of a line, or a test image's
    line (nothing reads its caption), trains as before."""
    from cmg.dataset import read_captions

    path = data / "captions.jsonl"
    before = read_captions(path, data)
    lines = path.read_text().splitlines()
    test_line = next(x for x in lines if '"test/' in x)
    path.write_text("\n".join([*lines, lines[0], test_line.replace('"caption": "', '"caption": "other ')]) + "\n")
    assert read_captions(path, data) == before
    path.write_text("\n".join([*lines, lines[0].replace('"caption": "', '"caption": "another ')]) + "\n")
    with pytest.raises(CMGError, match=r"is named again with other values \(first on line 1\)"):
        read_captions(path, data)


def test_the_train_good_hint_only_for_a_name_under_train_good(tmp_path):
    from cmg.dataset import _unmatched_note

    (tmp_path / "train" / "good").mkdir(parents=True)
    assert "which is train/good" not in _unmatched_note(["test/bad/x.png"], tmp_path)


def test_portrait_frames_count_as_not_square(tmp_path, capsys):
    """Counted either way; said only where the caller asks (`cmg captions` does not: `cmg
    train` says it, once)."""
    from cmg.dataset import check_training_folder

    good = tmp_path / "train" / "good"
    good.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (64, 96) if i == 0 else (64, 64), (100, 100, 100)).save(good / f"{i}.png")
    assert check_training_folder(tmp_path, 32, need_captions=False)["not_square"] == 1
    assert "not square" in capsys.readouterr().err
    assert check_training_folder(tmp_path, 32, need_captions=False, say_shapes=False)["not_square"] == 1
    assert "not square" not in capsys.readouterr().err
