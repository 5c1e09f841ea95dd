"""`cmg bench shots`: the drawn subsets are what a user folder of N images would be, the
table's medians come from the rows, and one real smoke run (tiny, a count below CMLE's
caption minimum) trains, falls back to CMLE off and writes its files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cmg.config import resolve_config
from cmg.dataset import MVTecFolder
from cmg.errors import CMGError
from cmg_app.cli import main
from cmg_bench.shots import ALL, check_reuse, markdown, parse_shots, subset_folder, summarise
from cmg_data.synth import synthesize


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("shots") / "hex", "tiny", seed=3, n_train=20, n_test_good=2,
                      n_test_per_anomaly=1, progress=False)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_subset_holds_the_drawn_images_and_everything_else_of_the_folder(source, tmp_path):
    sub = subset_folder(source, tmp_path / "n6", 6, seed=0)
    full, part = MVTecFolder(source), MVTecFolder(sub)
    drawn = part.samples("train")
    assert len(drawn) == 6
    originals = {s.path.name: s for s in full.samples("train")}
    for s in drawn:  # the same image bytes and the same caption as in the source folder
        assert s.path.read_bytes() == originals[s.path.name].path.read_bytes()
        assert s.caption == originals[s.path.name].caption
    assert [(s.path.name, s.defect, s.caption) for s in part.samples("test")] == \
        [(s.path.name, s.defect, s.caption) for s in full.samples("test")]
    for name in ("captions.jsonl", "meta.jsonl"):
        train_files = {r["file"] for r in _lines(sub / name) if r["file"].startswith("train/")}
        assert train_files == {f"train/good/{s.path.name}" for s in drawn}
    anomalous = next(s for s in part.samples("test") if s.label)
    assert part.gt_mask(anomalous, (64, 64)).any()  # ground truth reached through the links


def test_subset_draw_follows_the_seed_and_is_made_afresh(source, tmp_path):
    names = lambda p: sorted(x.name for x in (p / "train" / "good").iterdir())  # noqa: E731
    a = names(subset_folder(source, tmp_path / "a", 6, seed=0))
    assert names(subset_folder(source, tmp_path / "a", 6, seed=0)) == a
    assert names(subset_folder(source, tmp_path / "b", 6, seed=1)) != a
    assert len(names(subset_folder(source, tmp_path / "a", 3, seed=0))) == 3  # the old draw is gone


def test_subset_larger_than_the_folder_is_refused(source, tmp_path):
    with pytest.raises(CMGError, match="only 20 images"):
        subset_folder(source, tmp_path / "n99", 99, seed=0)


def test_a_run_of_another_folders_subset_is_not_reused(source, tmp_path):
    """Every subset of an --out has the same path, so the run's recorded training folder
    cannot tell two source folders apart: the subset's own record does."""
    other = tmp_path / "other"
    shutil.copytree(source, other)
    sub, run_dir = tmp_path / "out" / "data" / "n6_s0", tmp_path / "out" / "runs" / "n6_s0"
    subset_folder(source, sub, 6, seed=0)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").touch()
    check_reuse(source, sub, run_dir, 6, 0)  # the same draw of the same folder: reused
    with pytest.raises(CMGError, match=f"drawn from {source.resolve()}, not this draw from {other.resolve()}"):
        check_reuse(other, sub, run_dir, 6, 0)
    with pytest.raises(CMGError, match="not this draw"):
        check_reuse(source, sub, run_dir, 6, 1)  # another seed draws other images
    (sub / "subset.json").unlink()  # an --out made before the record: its links say the same
    check_reuse(source, sub, run_dir, 6, 0)
    with pytest.raises(CMGError, match=f"drawn from {source.resolve()}, not this draw"):
        check_reuse(other, sub, run_dir, 6, 0)
    shutil.rmtree(sub / "train")
    with pytest.raises(CMGError, match="a folder it does not record"):
        check_reuse(source, sub, run_dir, 6, 0)


def test_every_shot_count_is_checked_before_anything_trains(source, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["bench", "shots", "--config", "tiny", "--data", str(source), "--out", str(out), "--seeds", "0"]
    assert main([*base, "--shots", "12,99"]) == 2
    err = capsys.readouterr().err
    assert "--shots 99:" in err and "has only 20 images" in err, err
    assert main([*base, "--shots", "12,3"]) == 2
    assert "--shots 3: training needs at least" in capsys.readouterr().err
    assert not out.exists()


def test_shot_and_seed_lists(tmp_path, capsys):
    assert parse_shots("25, 50,all,25") == (25, 50, ALL)
    for bad in ("0", "x", ",", "-3"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "shots", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--shots", bad])
        assert exc.value.code == 2
        assert "--shots" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "shots", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "a"])
    assert exc.value.code == 2
    assert main(["bench", "shots", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no train/good" in capsys.readouterr().err


def test_summary_takes_medians_and_ranges_per_count():
    rows = [{"shots": 25, "images": 25, "cmle": "on", "image_auroc": a, "pixel_auroc": 0.9, "train_s": t,
             "gain_vs_baseline": None} for a, t in ((0.7, 10.0), (0.6, 30.0), (0.8, 20.0))]
    rows.append({"shots": ALL, "images": 200, "cmle": "on", "image_auroc": 0.81, "pixel_auroc": 0.96,
                 "train_s": 100.0, "gain_vs_baseline": 0.01})
    s = summarise(rows[3:] + rows[:3])  # `all` first on the command line: still drawn last
    assert [r["shots"] for r in s] == [25, ALL]
    assert s[0]["image_auroc"] == pytest.approx(0.7) and s[0]["image_auroc_range"] == pytest.approx([0.6, 0.8])
    assert s[0]["train_s"] == pytest.approx(20.0) and "gain_vs_baseline" not in s[0]
    assert s[1]["gain_vs_baseline"] == pytest.approx(0.01)
    table = markdown(s, "small", "line3")
    assert "| 25 (25) | 3 | 0.700 (0.600 to 0.800) |" in table
    assert "| all (200) | 1 | 0.810" in table


@pytest.mark.slow
def test_shots_smoke(tiny_data, tiny_run, tmp_path, capsys):
    """12 drawn images (10 after the held-out split: below CMLE's 20 captions, so CMLE off)
    trained for real; `all` is the session's tiny run, copied so its folder stays untouched,
    its saved config given the quick config's step counts (a run is reused only when every
    setting matches: the wiring is tested here, not the steps)."""
    import torch

    out = tmp_path / "shots"
    shutil.copytree(tiny_run, out / "runs" / "nall_s0", ignore=shutil.ignore_patterns("eval", "onnx"))
    cfg = yaml.safe_load(resolve_config("tiny").read_text())  # tiny with fewer steps: the wiring is tested
    cfg["teacher"]["steps"] = cfg["cmer"]["scorer"]["steps"] = 20
    ckpt = out / "runs" / "nall_s0" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"]["teacher"]["steps"] = state["config"]["cmer"]["scorer"]["steps"] = 20
    torch.save(state, ckpt)
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["bench", "shots", "--config", str(tmp_path / "quick.yaml"), "--data", str(tiny_data), "--shots", "12,all",
                 "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "shots.json").read_text())
    by = {r["shots"]: r for r in report["rows"]}
    assert by[12]["images"] == 12 and by[12]["cmle"] == "off"
    assert by[ALL]["images"] == 300 and by[ALL]["cmle"] == "on"
    for r in by.values():
        assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0
    assert (out / "shots.png").stat().st_size > 1000
    assert "| 12 (12) | 1 |" in (out / "shots.md").read_text()
    assert "| 12 (12) | 1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_of_another_config_or_seed_is_not_reused(tiny_data, tiny_run, tmp_path, capsys):
    """OUT/runs/nall_s0 holding the tiny run: asked for another config (or a misspelt one)
    the bench refuses before anything trains, instead of reporting tiny's results under that
    name."""
    out = tmp_path / "shots"
    shutil.copytree(tiny_run, out / "runs" / "nall_s0", ignore=shutil.ignore_patterns("eval", "onnx"))
    base = ["bench", "shots", "--data", str(tiny_data), "--shots", "all", "--seeds", "0", "--out", str(out), "--no-progress"]
    assert main([*base, "--config", "small-fast"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of config 'tiny', seed 0" in err and "not 'small-fast', seed 0" in err, err
    assert "remove that run folder or choose another --out" in err
    assert main([*base, "--config", "tiyn"]) == 2
    assert "tiyn" in capsys.readouterr().err
    (out / "runs" / "nall_s0" / "checkpoint.pt").write_bytes(b"a checkpoint this version cannot read")
    assert main([*base, "--config", "tiny"]) == 2  # said with what to do, not a traceback
    assert "unreadable checkpoint" in (err := capsys.readouterr().err) and "remove that run folder" in err, err
    assert not (out / "shots.json").exists()


@pytest.mark.slow
def test_run_mismatch_names_what_differs(tiny_run, tiny_data, tmp_path):
    from cmg.config import load_config
    from cmg_train.checkpoint import load_run, run_mismatch

    run = load_run(tiny_run)
    cfg = load_config(resolve_config("tiny"))
    assert run_mismatch(run, cfg, tiny_data) is None
    assert run_mismatch(run, cfg, None) is None  # the demo's moved workdir: data not compared
    assert "on " + str((tmp_path / "other").resolve()) in run_mismatch(run, cfg, tmp_path / "other")
    cfg.cmle.enabled = False  # what the benches set on a folder whose captions cannot carry CMLE
    cfg.teacher.checkpoint = "/elsewhere/open_clip.bin"  # where weights are read from is no setting
    assert run_mismatch(run, cfg, None) is None
    cfg.cmer.alpha, cfg.local.bank_size = 0.45, 123  # a YAML edited under the same name
    why = run_mismatch(run, cfg, None)
    assert why and "cmer.alpha" in why and "local.bank_size" in why and "-> 123" in why
    cfg = load_config(resolve_config("tiny"))
    cfg.seed = 3
    assert "not 'tiny', seed 3" in run_mismatch(run, cfg, None)
