"""Synthetic factory data: determinism, layout, masks, captions, clutter, the CLI verb."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg.errors import CMGError
from cmg_app.cli import main as cli_main
from cmg_data import synth
from cmg_data.synth import ANOMALIES, CATEGORIES, DEFECTS, SEMANTIC, render_scene, synthesize

# Words a caption must never contain: they would leak clutter or defects into the text.
LEAKY = ("scratch", "hole", "stain", "deform", "dent", "dust", "speck", "glare", "clutter",
         "debris", "streak", "defect", "wrong", "anomal", "damage", "pebble", "chip")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mini(out: Path, seed: int = 0, **kw) -> Path:
    return synthesize(out, "tiny", seed=seed, n_train=6, n_test_good=2, n_test_per_anomaly=1,
                      progress=False, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The real tiny preset, once per module (a couple of seconds)."""
    return synthesize(tmp_path_factory.mktemp("synth") / "tiny", "tiny", seed=0, progress=False)


# ----------------------------------------------------------------------------- folder


def test_tiny_layout_counts_and_index_files(tiny):
    info = json.loads((tiny / "synth.json").read_text())
    assert info["preset"] == "tiny" and info["image_size"] == 64 and info["category"] == "hex_nut"
    want = {"train/good": 300, "test/good": 60, **{f"test/{a}": 15 for a in ANOMALIES}}
    assert info["counts"] == want
    for key, n in want.items():
        files = sorted((tiny / key).glob("*.png"))
        assert len(files) == n, key
        assert files[0].name == "000.png"
    for a in ANOMALIES:
        gts = sorted(p.name for p in (tiny / "ground_truth" / a).glob("*.png"))
        assert gts == [f"{i:03d}_mask.png" for i in range(15)]
    assert not (tiny / "ground_truth" / "good").exists()
    images = sorted(p.relative_to(tiny).as_posix() for p in tiny.glob("t*/*/*.png"))
    captions = _jsonl(tiny / "captions.jsonl")
    metas = _jsonl(tiny / "meta.jsonl")
    assert sorted(c["file"] for c in captions) == images
    assert sorted(m["file"] for m in metas) == images
    for m in metas[::37]:
        assert m["split"] == m["file"].split("/")[0] and m["defect"] == m["file"].split("/")[1]
        for key in ("part_mask", "clutter_mask"):
            assert Image.open(tiny / m[key]).size == (64, 64)
        with Image.open(tiny / m["file"]) as img:
            assert img.mode == "RGB" and img.size == (64, 64)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = _mini(tmp_path / "a", 3), _mini(tmp_path / "b", 3), _mini(tmp_path / "c", 4)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa.keys() == fb.keys() and len(fa) > 20
    assert all(fa[k] == fb[k] for k in fa), [k for k in fa if fa[k] != fb[k]]
    pngs = [k for k in fa if k.endswith(".png") and not k.startswith(("masks/", "ground_truth/"))]
    assert all(fa[k] != fc[k] for k in pngs)


def test_rewrites_its_own_folder_and_refuses_a_foreign_one(tmp_path):
    out = _mini(tmp_path / "d")
    (out / "train" / "good" / "999.png").write_bytes(b"stale")
    _mini(out)  # a second run clears what the first wrote: no stale images survive
    assert not (out / "train" / "good" / "999.png").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CMGError, match="refusing"):
        _mini(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        synthesize(tmp_path / "x", "huge", progress=False)
    with pytest.raises(ValueError, match="category"):
        synthesize(tmp_path / "x", "tiny", category="bolt", progress=False)
    with pytest.raises(ValueError, match="category"):
        render_scene(np.random.default_rng(0), 64, "bolt")
    with pytest.raises(ValueError, match="defect"):
        render_scene(np.random.default_rng(0), 64, "gear", defect="rust")


# ----------------------------------------------------------------------------- masks


def test_masks_lie_where_they_should(tiny):
    for m in _jsonl(tiny / "meta.jsonl"):
        part = _mask(tiny / m["part_mask"])
        clutter = _mask(tiny / m["clutter_mask"])
        assert part.sum() > 30, m["file"]
        assert not (part & clutter).any(), m["file"]
        if m["defect"] == "good":
            assert "gt_mask" not in m
            continue
        gt = _mask(tiny / m["gt_mask"])
        assert m["gt_mask"] == f"ground_truth/{m['defect']}/{Path(m['file']).stem}_mask.png"
        assert gt.sum() >= 2, m["file"]
        assert not (gt & ~part).any(), f"{m['file']}: defect pixels outside the part"
        if m["defect"] == SEMANTIC:
            assert (gt == part).all()
            assert m["attrs"]["category"] != "hex_nut" and m["attrs"]["expected_category"] == "hex_nut"
        else:
            assert gt.sum() < 0.5 * part.sum(), f"{m['file']}: defects must be small"


@pytest.mark.parametrize("defect", ANOMALIES)
def test_a_defect_changes_the_image_exactly_at_its_mask(defect):
    """Same generator state, with and without the defect: the difference is the defect."""
    for i, category in enumerate(CATEGORIES):
        good = render_scene(np.random.default_rng([5, i]), 64, category)
        bad = render_scene(np.random.default_rng([5, i]), 64, category, defect=defect)
        assert not good.defect_mask.any() and bad.defect_mask.any()
        assert good.caption == bad.caption
        assert (good.clutter_mask & ~bad.part_mask == bad.clutter_mask).all()
        diff = np.abs(good.image.astype(int) - bad.image.astype(int)).max(-1)
        assert diff[bad.defect_mask].mean() > 8, f"{category}/{defect}: defect not visible"
        if defect != SEMANTIC:
            near = synth._dilate(bad.defect_mask, 2)
            assert (diff[~near] == 0).all(), f"{category}/{defect}: pixels changed away from the mask"


def test_defects_are_not_one_saturated_colour(tiny):
    """Defect pixels must not be findable by one global colour statistic."""
    pixels = []
    for m in _jsonl(tiny / "meta.jsonl"):
        if m["defect"] in DEFECTS:
            img = np.asarray(Image.open(tiny / m["file"]))
            pixels.append(img[_mask(tiny / m["gt_mask"])].astype(float))
    pixels = np.concatenate(pixels)
    assert pixels.std(0).min() > 20


def test_no_clutter_twin_has_the_same_parts(tiny, tmp_path):
    assert cli_main(["data", "synth", "--out", str(tmp_path / "clean"), "--no-clutter"]) == 0
    clean = tmp_path / "clean"
    assert json.loads((clean / "synth.json").read_text())["clutter"] is False
    metas = _jsonl(tiny / "meta.jsonl")
    clean_metas = {m["file"]: m for m in _jsonl(clean / "meta.jsonl")}
    for m in metas[::5]:
        c = clean_metas[m["file"]]
        assert not _mask(clean / c["clutter_mask"]).any()
        assert (_mask(clean / c["part_mask"]) == _mask(tiny / m["part_mask"])).all()
        if "gt_mask" in m:
            assert (_mask(clean / c["gt_mask"]) == _mask(tiny / m["gt_mask"])).all()
    assert (_files(clean)["captions.jsonl"] == (tiny / "captions.jsonl").read_bytes())


# ----------------------------------------------------------------------------- content


def test_captions_vary_and_never_leak_clutter_or_defects(tiny):
    captions = _jsonl(tiny / "captions.jsonl")
    train = [c["caption"] for c in captions if c["file"].startswith("train/")]
    assert len(set(train)) >= 0.3 * len(train)
    for c in captions:
        text = c["caption"].lower()
        assert "hex nut" in text, c
        assert not [w for w in LEAKY if w in text], c
    # Wrong parts are captioned as the product the line expects, not as what is there.
    others = [synth.CATEGORY_NAMES[x] for x in CATEGORIES if x != "hex_nut"]
    wrong = [c["caption"] for c in captions if c["file"].startswith(f"test/{SEMANTIC}/")]
    assert wrong and not any(o in w for w in wrong for o in others)


def test_attributes_vary_and_positions_match_the_image(tiny):
    metas = [m for m in _jsonl(tiny / "meta.jsonl") if m["split"] == "train"]
    attrs = [m["attrs"] for m in metas]
    assert {a["position"] for a in attrs} == set(synth.POSITIONS)
    assert {a["rotation"] for a in attrs} == set(synth.ROTATIONS)
    assert {a["size"] for a in attrs} == {s for s, _ in synth.SIZES}
    assert {a["background"] for a in attrs} == set(synth.BACKGROUNDS)
    assert len({a["colour"] for a in attrs}) >= 6
    for m in metas[:120]:  # hex nuts are symmetric: the mask centroid is the part's centre
        ys, xs = np.nonzero(_mask(tiny / m["part_mask"]))
        row, col = m["attrs"]["cell"]
        assert int(ys.mean() * 3 // 64) == row and int(xs.mean() * 3 // 64) == col, m["file"]
    sizes = Counter()
    for m in metas[:200]:
        sizes[m["attrs"]["size"]] += int(_mask(tiny / m["part_mask"]).sum())
    assert sizes["small"] / max(1, sum(1 for m in metas[:200] if m["attrs"]["size"] == "small")) < \
        sizes["large"] / max(1, sum(1 for m in metas[:200] if m["attrs"]["size"] == "large"))


def test_clutter_varies_and_some_of_it_looks_like_defects(tiny):
    metas = [m for m in _jsonl(tiny / "meta.jsonl") if m["split"] == "train"]
    with_clutter = sum(_mask(tiny / m["clutter_mask"]).any() for m in metas)
    assert with_clutter >= 0.7 * len(metas)
    counts = Counter()
    for m in metas:
        for k, v in m["attrs"]["clutter"].items():
            counts[k] += v > 0
    assert all(counts[k] >= 0.1 * len(metas) for k in ("objects", "specks", "streaks", "dust", "glare")), counts
    areas = {int(_mask(tiny / m["clutter_mask"]).sum()) for m in metas}
    assert len(areas) > 30


def test_random_scenes_are_varied_reproducible_and_fast_enough():
    a = list(synth.random_scenes(60, 64, seed=1))
    b = list(synth.random_scenes(60, 64, seed=1))
    assert all((x.image == y.image).all() and x.caption == y.caption for x, y in zip(a, b, strict=True))
    assert {s.attrs["category"] for s in a} == set(CATEGORIES)
    assert len({s.caption for s in a}) >= 55
    for s in a:
        assert synth.CATEGORY_NAMES[s.attrs["category"]] in s.caption
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8 and s.defect == "good"
    bad = list(synth.random_scenes(20, 64, seed=2, categories=("gear",), defect_rate=1.0))
    assert all(s.defect in DEFECTS and s.defect_mask.any() for s in bad)
    assert all(s.attrs["category"] == "gear" for s in bad)
    with pytest.raises(ValueError, match="category"):
        next(synth.random_scenes(1, 64, 0, categories=("bolt",)))


def test_small_size_renders_consistently():
    s = render_scene(np.random.default_rng(9), 128, "screw", defect="scratch")
    assert s.image.shape == (128, 128, 3)
    assert s.part_mask.sum() > 100 and s.defect_mask.any() and not (s.defect_mask & ~s.part_mask).any()


def test_stream_frames_mix_good_and_anomalous():
    items = list(synth.stream_frames("tiny", seed=0, n=40, anomaly_rate=0.3))
    assert len(items) == 40
    assert all(img.shape == (64, 64, 3) for img, _ in items)
    labels = [info["label"] for _, info in items]
    assert 0 < sum(labels) < 40
    again = [img for img, _ in synth.stream_frames("tiny", seed=0, n=3, anomaly_rate=0.3)]
    assert all((x == y[0]).all() for x, y in zip(again, items[:3], strict=True))


def test_cli_errors_exit_2(tmp_path, capsys):
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    assert cli_main(["data", "synth", "--out", str(foreign)]) == 2
    assert "refusing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["data", "synth", "--out", str(tmp_path / "y"), "--preset", "huge"])
    assert exc.value.code == 2


def test_a_bad_seed_touches_nothing_and_an_interrupted_run_leaves_no_half_folder(tmp_path, monkeypatch):
    """`--seed -1` had deleted an existing folder's data before numpy refused the seed; an
    interrupted run had left a folder the next run refused ("holds no synth.json")."""
    from cmg_data import synth as synthmod

    out = synthmod.synthesize(tmp_path / "line", n_train=2, n_test_good=1, n_test_per_anomaly=0, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for seed in (-1, 2**31):
        with pytest.raises(CMGError, match="--seed must be 0"):
            synthmod.synthesize(out, seed=seed, n_train=2, n_test_good=1, n_test_per_anomaly=0, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    calls = {"n": 0}
    real = synthmod.render_scene

    def stop_on_the_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(synthmod, "render_scene", stop_on_the_third)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        synthmod.synthesize(fresh, n_train=4, n_test_good=1, n_test_per_anomaly=0, progress=False)
    assert not fresh.exists()
    (out / "notes.txt").write_text("mine")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        synthmod.synthesize(out, n_train=4, n_test_good=1, n_test_per_anomaly=0, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_no_progress_is_passed_on(tmp_path, monkeypatch):
    """`cmg data synth --no-progress`, as every other long verb takes it (logs, CI)."""
    import cmg_data.synth as synth_mod

    seen = {}

    def record(out, **kw):
        seen.update(kw)
        return _mini(out)

    monkeypatch.setattr(synth_mod, "synthesize", record)
    assert cli_main(["data", "synth", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert seen["progress"] is False
    assert cli_main(["data", "synth", "--out", str(tmp_path / "d")]) == 0 and seen["progress"] is True


def test_a_folder_left_by_a_killed_run_is_written_again(tmp_path):
    """SIGKILL runs no cleanup: the folder it left (images, no synth.json) had been refused by
    every rerun, `cmg demo --fresh` too. A folder that is not ours is still refused (above)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "line"
    proc = subprocess.Popen([sys.executable, "-m", "cmg_app.cli", "data", "synth", "--out", str(out),
                             "--preset", "tiny", "--no-progress"], env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not any((out / "train" / "good").glob("*.png")):
            assert proc.poll() is None and time.monotonic() < deadline, "no image was written"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "synth.json").exists()
    synthesize(out, "tiny", n_train=2, n_test_good=1, n_test_per_anomaly=0, progress=False)
    assert (out / "synth.json").is_file() and not (out / synth.INCOMPLETE).exists()
    assert len(list((out / "train" / "good").iterdir())) == 2


def test_a_run_stopped_while_clearing_leaves_no_synth_json_over_missing_images(tmp_path, monkeypatch):
    """synth.json marks a whole folder (`cmg demo` reuses a folder that has one): removed last,
    a kill while clearing left it over a folder whose images were gone."""
    out = _mini(tmp_path / "line")
    real = synth.shutil.rmtree

    def stop(path, *args, **kwargs):
        if Path(path).name == "test":  # train/ is gone, test/ not yet
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(synth.shutil, "rmtree", stop)
    with pytest.raises(KeyboardInterrupt):
        _mini(out)
    assert not (out / "synth.json").exists()
    monkeypatch.undo()
    _mini(out)  # the rerun takes it as its own
    assert (out / "synth.json").is_file() and (out / "train" / "good").is_dir()
