"""`cmg train`: the helpers (split, batching, practice regions), then the tiny trained run:
every stage in metrics.json, checkpoint round trip, contract, one-line errors for bad runs."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmg.config import Config, config_dir
from cmg.contract import CMLE_ENCODER
from cmg.dataset import MVTecFolder
from cmg.errors import CMGError
from cmg_train.checkpoint import FORMAT, load_run
from cmg_train.cmer.model import keep_mask_cfg
from cmg_train.detector import DetectorOutput
from cmg_train.loop import batched, fit
from cmg_train.masking import upsample_keep
from cmg_train.train import (
    MIN_SCORER_IMAGES,
    choose_global_weight,
    min_training_images,
    pick_weight,
    practice_regions,
    split_train_val,
    synthetic_anomaly_frames,
)

# -- what training may learn from -----------------------------------------------------


def test_nothing_in_training_or_build_imports_the_generator():
    """Every model learns from the user's folder: no module under cmg_train/ or build/ imports
    `cmg_data.synth` (the demo's generator), directly or by `from cmg_data import synth`."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("cmg_train", "build"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "cmg_data.synth" or n.startswith("cmg_data.synth.") for n in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert (root / "cmg_train" / "train.py").is_file()  # the scan saw the training code
    assert offenders == []


def test_too_few_captions_in_the_training_split_fail_before_training(tiny_data, tmp_path):
    """The folder has enough distinct captions, but one of them only on held-out normals: the
    split CMLE learns from has one too few, and `cmg train` says so before it trains anything."""
    import shutil

    from cmg.config import load_config, resolve_config
    from cmg_train.cmle.fit import unique_captions_needed
    from cmg_train.train import train_run

    cfg = load_config(resolve_config("tiny"))
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    samples = MVTecFolder(data).samples("train")
    tr, va = split_train_val(len(samples), cfg.data.val_fraction, cfg.seed)
    need = unique_captions_needed(cfg.cmle)
    caption = {int(i): f"part {int(n) % (need - 1)}" for n, i in enumerate(tr)}
    caption.update({int(i): f"part {need - 1}" for i in va})  # the last distinct caption: held out only
    rows = [{"file": s.path.relative_to(data).as_posix(), "caption": caption[i]} for i, s in enumerate(samples)]
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with pytest.raises(CMGError, match=f"CMLE: only {need - 1} unique captions among {len(tr)} images"):
        train_run(cfg, data, out, progress=False)
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("backbone", [{"taps": [99]},  # the ensemble's Lite0 has 16 blocks, Lite1 21
                                      {"variant": "efficientnet_lite1", "ensemble": ["efficientnet_lite0"], "taps": [2, 18]}])
def test_taps_past_a_backbones_last_block_fail_before_the_frames_load(tiny_data, tmp_path, backbone):
    """They had failed after the whole folder was read (42 s on the tiny preset)."""
    import dataclasses

    from cmg.config import load_config, resolve_config
    from cmg_train.train import train_run

    cfg = load_config(resolve_config("tiny"))
    cfg.backbone = dataclasses.replace(cfg.backbone, **backbone)
    with pytest.raises(CMGError, match="taps .* outside blocks"):
        train_run(cfg, tiny_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_run_folder_changes_only_on_success(tmp_path):
    """Success: the new log replaces the old one and the stale RUN/onnx goes. Failure: an
    existing run keeps its log and export; a folder made for the failed run is removed."""
    from cmg_train.runlog import append_jsonl, run_folder

    run = tmp_path / "run"
    (run / "onnx").mkdir(parents=True)
    (run / "onnx" / "export.json").write_text("{}")
    (run / "train_log.jsonl").write_text('{"old": 1}\n')
    with pytest.raises(RuntimeError), run_folder(run) as log:
        append_jsonl(log, {"new": 1})
        raise RuntimeError("training failed")
    assert (run / "train_log.jsonl").read_text() == '{"old": 1}\n' and (run / "onnx").is_dir()
    assert sorted(p.name for p in run.iterdir()) == ["onnx", "train_log.jsonl"]
    with run_folder(run) as log:
        append_jsonl(log, {"new": 1})
    assert (run / "train_log.jsonl").read_text() == '{"new": 1}\n' and not (run / "onnx").exists()
    fresh = tmp_path / "new" / "parents" / "fresh"
    with pytest.raises(KeyboardInterrupt), run_folder(fresh):
        raise KeyboardInterrupt
    assert not (tmp_path / "new").exists(), "the parents it made go with it"


def test_one_training_per_run_folder_and_only_into_a_run_or_empty_folder(tmp_path):
    """A second training into a folder that one is writing is refused (a failing one removes
    what it created: it had deleted the other's finished run); a folder holding anything but
    a run's files is refused; an onnx/ that `cmg export` did not write is never removed; a
    killed training's partial log goes with the next one."""
    from cmg.locks import OutputLock
    from cmg_train.runlog import run_folder

    run = tmp_path / "run"
    with OutputLock(run, folder=True), pytest.raises(CMGError, match="another `cmg train` writes it"), \
            run_folder(run):
        pass
    assert not run.exists()
    from filelock import FileLock

    with FileLock(str(tmp_path / ".run.lock")), run_folder(run):  # a tool's own `.NAME.lock` (our tests') is not ours
        pass
    mine = tmp_path / "mine"
    (mine / "onnx").mkdir(parents=True)
    (mine / "onnx" / "model.onnx").write_text("a user's model")
    (mine / "notes.txt").write_text("notes")
    with pytest.raises(CMGError, match=r"holds files that are not a training run's \(notes.txt\)"), run_folder(mine):
        pass
    (mine / "notes.txt").unlink()
    (mine / ".train_log.jsonl.partial-999999").write_text("")
    (mine / ".checkpoint.pt.tmp-999999").write_text("")  # a killed writer's: hidden names are not foreign
    (mine / "bench_train.json").write_text("{}")  # the benches' record of a training
    with run_folder(mine):
        assert (tmp_path / ".mine.cmg-lock").is_file()  # beside the run: every host that sees it sees the lock
    assert sorted(p.name for p in mine.iterdir()) == [".checkpoint.pt.tmp-999999", "bench_train.json", "onnx",
                                                      "train_log.jsonl"]
    assert (mine / "onnx" / "model.onnx").is_file()
    blocked = tmp_path / "afile"
    blocked.write_text("")
    for out, needle in ((blocked, "is a file, not a folder"), (blocked / "sub" / "run", "afile is a file")):
        with pytest.raises(CMGError, match=needle), run_folder(out):
            pass


def test_training_over_a_run_says_so_and_takes_its_eval_reports_along(tmp_path, capsys):
    """A small run trained over with tiny: replaced without a word, its eval/ (the old
    model's report and pictures) left beside the new checkpoint."""
    from cmg_train.runlog import run_folder

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.md").write_text("the old model's report")
    (run / "onnx").mkdir()
    (run / "onnx" / "export.json").write_text("{}")
    (run / "checkpoint.pt").write_text("the old model")
    with run_folder(run):
        assert "holds a run; this training replaces it" in capsys.readouterr().err
        assert (run / "eval" / "eval.md").is_file()  # nothing goes before the training succeeds
    assert not (run / "eval").exists() and not (run / "onnx").exists()


@pytest.mark.slow
def test_failed_train_keeps_the_run_and_is_quiet_under_no_progress(tiny_data, tmp_path, monkeypatch, capfd):
    """`cmg train --no-progress --out RUN` failing after the teacher (MiniLM loaded): RUN's
    train_log.jsonl, checkpoint and export are as before, no "Loading weights" bar printed;
    into a new folder, no folder is left holding only a log."""
    import cmg_train.train as train
    from cmg_app.cli import main
    from cmg_train import text

    cfg = yaml.safe_load((config_dir() / "tiny.yaml").read_text())
    cfg["teacher"]["steps"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    (run / "onnx").mkdir(parents=True)
    (run / "onnx" / "export.json").write_text("{}")
    (run / "train_log.jsonl").write_text('{"old": 1}\n')
    (run / "checkpoint.pt").write_bytes(b"old")

    def disk_gone(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run / "relevance"))

    monkeypatch.setattr(train, "occlusion_relevance", disk_gone)
    monkeypatch.setattr(train, "attention_relevance", disk_gone)  # tiny's relevance (cmer.relevance)
    text._minilm.cache_clear()  # load MiniLM in this test, as a fresh `cmg train` does
    argv = ["train", "--no-progress", "--config", str(tmp_path / "c.yaml"), "--data", str(tiny_data)]
    assert main([*argv, "--out", str(run)]) == 2
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cmg train: error:") and "No space left on device" in last and str(run / "relevance") in last
    assert (run / "train_log.jsonl").read_text() == '{"old": 1}\n'
    assert (run / "checkpoint.pt").read_bytes() == b"old" and (run / "onnx").is_dir()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "onnx", "train_log.jsonl"]
    assert main([*argv, "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


# -- helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, n_val", [(600, 0.15, 90), (10, 0.15, 2), (7, 0.5, 4)])
def test_split_is_disjoint_sorted_and_seeded(n, fraction, n_val):
    tr, va = split_train_val(n, fraction, seed=0)
    assert len(va) == n_val and len(tr) == n - n_val
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(n))
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)
    again = split_train_val(n, fraction, seed=0)
    assert torch.equal(again[0], tr) and torch.equal(again[1], va)
    assert not torch.equal(split_train_val(n, fraction, seed=1)[1], va)


@pytest.mark.parametrize("fraction", [0.01, 0.15, 0.2, 0.3, 0.5, 0.9])
def test_min_training_images_is_the_smallest_folder_the_split_leaves_enough(fraction):
    """The folder check's minimum: at it the scorer gets its 8, one image fewer it does not."""
    n = min_training_images(fraction)
    assert len(split_train_val(n, fraction, seed=0)[0]) >= MIN_SCORER_IMAGES
    assert len(split_train_val(n - 1, fraction, seed=0)[0]) < MIN_SCORER_IMAGES


def test_batched_concatenates_every_output_in_order():
    x, y = torch.arange(10.0), torch.arange(10.0) * 2
    calls: list[int] = []

    def fn(a, b):
        calls.append(len(a))
        return a + b, a * b

    s, p = batched(fn, x, y, batch_size=4)
    assert calls == [4, 4, 2]
    assert torch.equal(s, x + y) and torch.equal(p, x * y)
    (only,) = batched(lambda a: a.requires_grad_(False) * 3, x, batch_size=3)
    assert torch.equal(only, x * 3)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 14, 60])
def test_fit_runs_short_schedules(steps):
    """A small folder gives the CMLE head 10 steps (10 epochs of one batch): the one-cycle
    schedule must not divide by a warm-up shorter than a step (it did: ZeroDivisionError)."""
    w = torch.nn.Parameter(torch.tensor([3.0]))
    stats = fit([w], steps, 0.1, lambda step: (w ** 2).sum(), desc="toy", progress=False)
    assert stats["steps"] == steps
    assert float(w.detach().abs()) < 3.0


def test_fusion_weight_needs_a_gain_outside_noise():
    """The global branch joins the fused score only when it clearly helps on the held-out set."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)]
    local = labels + rng.normal(0, 1.5, 400)  # weak separation by the local score alone
    clear = {0.0: local, 0.5: labels + rng.normal(0, 0.3, 400)}
    out = pick_weight(labels, clear, seed=0)
    assert out["global_weight"] == 0.5 and out["best_gain_ci95"][0] > 0
    noisy = {0.0: local, 0.5: local + 0.1 * labels + rng.normal(0, 1.0, 400)}  # better by chance or a sliver
    out = pick_weight(labels, noisy, seed=0)
    assert out["synthetic_auroc"][0.5] > out["synthetic_auroc"][0.0]
    assert out["global_weight"] == 0.0 and out["best_gain_ci95"][0] <= 0
    assert pick_weight(labels, {0.0: clear[0.5], 0.5: local}, seed=0)["best_gain_ci95"] is None


def test_practice_regions_follow_cmer_placement():
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid, cfg.local.placement = 32, 4, "keep"
    rel = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    regions = practice_regions(cfg, rel)
    assert regions.shape == (3, 1, 32, 32)
    assert torch.equal(regions, upsample_keep(keep_mask_cfg(rel, cfg.cmer), (32, 32)))
    cfg.local.placement = "uniform"
    assert practice_regions(cfg, rel) is None
    cfg.local.placement, cfg.cmer.enabled = "keep", False
    assert practice_regions(cfg, rel) is None  # no CMER: nothing to practise inside


# -- the tiny run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def metrics(tiny_run) -> dict:
    return json.loads((tiny_run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def test_frames(run, tiny_data) -> torch.Tensor:
    ds = MVTecFolder(tiny_data)
    return torch.from_numpy(ds.frames(ds.samples("test")[::10], (run.cfg.data.image_size,) * 2))


def test_metrics_report_every_stage(metrics, run):
    t = metrics["teacher"]
    assert t["source"] == "backbone" and t["retrieval_top1"] > t["retrieval_chance"]
    c = metrics["cmer"]
    assert c["loss_last"] < c["loss_first"]  # distillation lowered its loss
    assert 0 < c["keep_iou"] <= 1 and c["speed_ratio"] > 1.0
    for who in ("teacher", "scorer"):
        q = c[who]
        assert q["random"]["keep_fraction"] == pytest.approx(q["relative"]["keep_fraction"])
    # the synthetic folder has part masks: the teacher's masks beat chance (the scorer's: the test below)
    assert c["teacher"]["relative"]["part_recall"] > c["teacher"]["random"]["part_recall"]
    loc = metrics["local"]
    assert loc["model"] == "bank" and loc["backbone"] == run.cfg.backbone.variant
    assert loc["bank_rows"] == min(run.cfg.local.bank_size, loc["patches"])
    assert loc["patches"] == metrics["images"]["train"] * loc["map_side"] ** 2
    m = metrics["cmle"]
    fusion = m["fusion"]  # the best weight on synthetic anomalies when its gain is outside noise, else 0
    aurocs = {float(w): a for w, a in fusion["synthetic_auroc"].items()}
    assert fusion["global_weight"] in aurocs and fusion["images"] == metrics["images"]["val"]
    if fusion["global_weight"] > 0:
        assert aurocs[fusion["global_weight"]] >= max(aurocs.values()) - 5e-4
        assert fusion["best_gain_ci95"][0] > 0
    elif fusion["best_gain_ci95"] is not None:  # a better weight was found but within noise
        assert fusion["best_gain_ci95"][0] <= 0
    assert float(run.detector.global_weight) == fusion["global_weight"]
    assert m["graph"]["unique_captions"] >= run.cfg.cmle.min_unique_captions
    assert m["threshold"] == pytest.approx(float(run.detector.threshold))
    n_val = metrics["images"]["val"]
    normals = m["threshold_normals"]  # held-out normals and training frames scored left out of the banks
    assert normals == {"held_out": n_val,
                       "training_left_out": min(run.cfg.scoring.train_frames, metrics["images"]["train"])}
    n = sum(normals.values())
    k = min(math.ceil((n + 1) * (1 - run.cfg.scoring.fpr)), n)  # split-conformal rank
    assert m["false_positive_rate_bound"] == pytest.approx((n + 1 - k) / (n + 1))
    assert m["global_bank"] == metrics["images"]["train"] and m["head"]["loss_last"] < m["head"]["loss_first"]
    assert set(metrics["timings"]) == {"teacher_s", "cmer_s", "local_s", "cmle_s", "total_s"}


def test_scorer_keep_mask_beats_chance(metrics):
    """The one-pass scorer agrees with its teacher's keep-mask better than chance and keeps
    more of the part than a random mask of its size (it kept nearly every patch, no better
    than chance, while it learned occlusion maps of the grid teacher: docs/results.md)."""
    c = metrics["cmer"]
    a, b = c["keep_fraction_teacher"], c["keep_fraction_scorer"]
    chance = a * b / (a + b - a * b)  # expected IoU of independent random masks keeping as much
    assert chance < c["keep_iou"]
    assert c["scorer"]["relative"]["part_recall"] > c["scorer"]["random"]["part_recall"]


def test_fusion_weight_scores_each_synthetic_anomaly_with_its_own_keep_mask(run, test_frames):
    """The served formula runs the CMER scorer on the frame it scores: the synthetic anomalies
    that choose the fusion weight were scored with their clean frames' keep-masks instead."""
    det, one_pass = run.detector, run.scorer_graph()
    normals = test_frames[:8]
    (clean,) = batched(one_pass, normals)
    g, lmax = batched(lambda f, s: det.raw(f, s)[:2], normals, clean)
    seen, returned, used = [], [], []

    def scorer(frames: torch.Tensor) -> torch.Tensor:
        seen.append(frames)
        returned.append(one_pass(frames))
        return returned[-1]

    raw = det.raw

    def recording_raw(frames: torch.Tensor, scores: torch.Tensor):
        used.append(scores)
        return raw(frames, scores)

    weight = float(det.global_weight)
    try:
        det.raw = recording_raw  # an instance attribute: what choose_global_weight scores with
        out = choose_global_weight(det, normals, clean, g, lmax, seed=0, scorer=scorer)
    finally:
        del det.raw
        det.global_weight.fill_(weight)
    assert torch.equal(torch.cat(seen), synthetic_anomaly_frames(normals, 0))  # the pasted frames, not the clean ones
    assert torch.equal(torch.cat(used), torch.cat(returned))  # and their own keep-masks score them
    assert not torch.equal(torch.cat(used), clean)
    assert out["images"] == len(normals) and set(out["synthetic_auroc"]) == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_the_same_training_gives_the_same_checkpoint_bytes(run, tmp_path):
    """Two identical trainings had checkpoints of different sha256 (the key export.json and
    the eval cache use) only because the metrics inside carried wall-clock timings."""
    from cmg_train.checkpoint import save_run

    shas = []
    for i, seconds in enumerate((1.5, 99.0)):
        metrics = {**run.metrics, "timings": {"total_s": seconds},
                   "cmer": {**run.metrics.get("cmer", {}), "exact_s": seconds, "speed_ratio": seconds}}
        out = tmp_path / str(i)
        out.mkdir()
        path = save_run(out, run.cfg, run.teacher, run.scorer, run.detector, run.caption_bank, run.captions, metrics)
        shas.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert shas[0] == shas[1]
    saved = load_run(tmp_path / "0").metrics
    assert "timings" not in saved and "exact_s" not in saved.get("cmer", {}) and saved["images"] == run.metrics["images"]


@pytest.mark.parametrize("failing", ["config.yaml", "metrics.json"])
def test_a_save_stopped_between_its_files_leaves_the_old_run_whole(run, tmp_path, monkeypatch, failing):
    """The checkpoint was renamed into place first, then config.yaml and metrics.json written
    plainly: a save stopped between them left a new checkpoint beside the old run's records."""
    import dataclasses
    import errno
    import pathlib

    from cmg_train.checkpoint import save_run

    out = tmp_path / "run"
    out.mkdir()
    save_run(out, run.cfg, run.teacher, run.scorer, run.detector, run.caption_bank, run.captions, run.metrics)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_open = pathlib.Path.open

    def full(self, *args, **kwargs):
        if failing in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", full)
    with pytest.raises(OSError, match="No space left on device"):
        save_run(out, dataclasses.replace(run.cfg, seed=run.cfg.seed + 1), run.teacher, run.scorer, run.detector,
                 run.caption_bank, run.captions, {**run.metrics, "seed": run.cfg.seed + 1})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_log_has_a_line_per_logged_step_of_every_stage(tiny_run):
    lines = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    stages = {r["stage"].split(" ")[0] for r in lines}
    assert stages == {"teacher", "cmer", "cmle"}  # the default local model (patch bank) is fitted, not trained
    assert all(set(r) >= {"stage", "step", "loss"} for r in lines)
    assert (tiny_run / "config.yaml").is_file()


def test_the_runs_config_yaml_is_a_record_that_trains_the_same_config(run, tiny_run, tmp_path):
    """RUN/config.yaml is never read back by the run (its checkpoint holds the config): it
    says so, and `--config RUN/config.yaml` gives the run's own config."""
    from cmg.config import load_config
    from cmg_train.checkpoint import RECORD_HEADER, config_record

    assert load_config(tiny_run / "config.yaml") == run.cfg
    record = tmp_path / "config.yaml"
    record.write_text(config_record(run.cfg))  # what save_run writes (the cached run may predate it)
    assert record.read_text().startswith(RECORD_HEADER) and load_config(record) == run.cfg


def test_a_run_saved_before_a_setting_existed_scores_as_it_did(run, test_frames, tmp_path):
    """A run trained before `local.model` and `local.score` (2026-12-03) carries neither: loaded
    with today's defaults it scored max minus p90 where it had scored the map's maximum (image
    AUROC 0.350 in its own report, 0.510 loaded), against a threshold set for the old scores."""
    import shutil

    old = Path(shutil.copytree(run.path, tmp_path / "old", ignore=shutil.ignore_patterns("eval", "onnx")))
    state = torch.load(old / "checkpoint.pt", weights_only=False)
    del state["config"]["local"]["model"], state["config"]["local"]["score"]
    torch.save(state, old / "checkpoint.pt")
    legacy = load_run(old)
    assert (legacy.cfg.local.model, legacy.cfg.local.score) == ("bank", "max")
    th = torch.zeros(len(test_frames), 1)
    with torch.no_grad():
        run.detector.local_score = "max"
        try:
            want = run.detector(test_frames, run.scorer_graph()(test_frames), th)
        finally:
            run.detector.local_score = run.cfg.local.score
        got = legacy.detector(test_frames, legacy.scorer_graph()(test_frames), th)
    torch.testing.assert_close(got.anomaly_score, want.anomaly_score)
    assert not torch.equal(want.anomaly_score, run.detector(test_frames, run.scorer_graph()(test_frames), th).anomaly_score)
    state["format"] = "cmg-run/1"
    torch.save(state, old / "checkpoint.pt")
    with pytest.raises(CMGError, match=r"written by an older version \(cmg-run/1\); .* train the run again"):
        load_run(old)


def test_contract_follows_the_config(run):
    tiny = yaml.safe_load((config_dir() / "tiny.yaml").read_text())
    c = run.contract
    assert c.grid == run.cfg.cmer.grid == tiny["cmer"]["grid"]
    assert c.map_size == tiny["scoring"]["map_size"] != c.grid  # the tiny run exercises M != G
    assert (c.height, c.width, c.embed_dim) == (64, 64, run.cfg.cmle.embed_dim)


def test_checkpoint_round_trip_gives_identical_outputs(run, test_frames):
    again = load_run(run.path)
    th = torch.zeros(len(test_frames), 1)
    with torch.no_grad():
        a = run.detector(test_frames, run.scorer_graph()(test_frames), th)
        b = again.detector(test_frames, again.scorer_graph()(test_frames), th)
        ea, eb = run.exact_graph()(test_frames[:2]), again.exact_graph()(test_frames[:2])
    assert isinstance(b, DetectorOutput)
    for name, x, y in zip(DetectorOutput._fields, a, b, strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(ea, eb)
    assert again.captions == run.captions and torch.equal(again.caption_bank, run.caption_bank)


def test_detector_outputs_follow_the_contract(run, test_frames):
    specs = run.contract.models[CMLE_ENCODER].outputs
    with torch.no_grad():
        out = run.detector(test_frames, run.scorer_graph()(test_frames), torch.zeros(len(test_frames), 1))
    for spec, tensor in zip(specs, out, strict=True):
        spec.check(tensor.numpy())
    m = run.contract.map_size
    keep = upsample_keep(out.keep_mask.float(), (m, m)).squeeze(1)
    assert torch.all(out.anomaly_map[keep == 0] == 0)  # zero where the keep-mask discarded


class _RunsCode:
    """A pickled object whose loading runs code (writes the file named in `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    """A run folder from elsewhere is read as tensors and plain values only: its pickle's
    code had run before the format check (torch.load with weights_only=False)."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran.txt"
    run_dir.mkdir()
    torch.save({"format": FORMAT, "config": _RunsCode(marker)}, run_dir / "checkpoint.pt")
    with pytest.raises(CMGError, match="refused checkpoint .* objects other than tensors and plain values"):
        load_run(run_dir)
    assert not marker.exists()


def test_missing_or_foreign_run_is_a_one_line_error(tmp_path):
    with pytest.raises(CMGError, match="run folder not found"):
        load_run(tmp_path / "nope")
    with pytest.raises(CMGError, match="no checkpoint"):
        load_run(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CMGError, match="unreadable checkpoint"):
        load_run(tmp_path)
    torch.save({"format": "cmg-run/1"}, tmp_path / "checkpoint.pt")
    with pytest.raises(CMGError, match=rf"written by an older version \(cmg-run/1\); this version reads {FORMAT}"):
        load_run(tmp_path)
    torch.save({"weights": []}, tmp_path / "checkpoint.pt")  # some other program's
    with pytest.raises(CMGError, match="not a checkpoint of `cmg train`"):
        load_run(tmp_path)
    res = subprocess.run([sys.executable, "-m", "cmg_app.cli", "export", "--run", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "run folder not found" in res.stderr


def test_run_is_usable_from_any_directory(tiny_run, tiny_data, tmp_path, monkeypatch):
    """The tiny run was trained with a relative data path (conftest); it is stored resolved,
    so eval and bench find the data from anywhere."""
    from cmg.dataset import resolve_data

    monkeypatch.chdir(tmp_path)
    stored = Path(json.loads((tiny_run / "metrics.json").read_text())["data"])
    assert stored.is_absolute() and stored == tiny_data.resolve()
    assert resolve_data(tiny_run, None) == stored and (stored / "train" / "good").is_dir()
    assert load_run(tiny_run).data == stored


def test_older_runs_relative_data_path_is_found(tiny_run, tiny_data, tmp_path, monkeypatch):
    """A run written before paths were stored resolved: its relative path is tried against the
    run folder's parents; one that resolves nowhere names --data."""
    import shutil

    from cmg.dataset import resolve_data

    run = tmp_path / "proj" / "runs" / "old"
    run.mkdir(parents=True)
    shutil.copytree(tiny_data, tmp_path / "proj" / "data")
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "data": "data"}))
    monkeypatch.chdir(tmp_path)
    assert resolve_data(run, None) == tmp_path / "proj" / "data"
    (run / "metrics.json").write_text(json.dumps({**metrics, "data": "elsewhere"}))
    with pytest.raises(CMGError, match="pass --data"):
        resolve_data(run, None)


def test_a_full_disk_while_saving_the_checkpoint_names_it_and_keeps_the_old_one(tmp_path, monkeypatch):
    """torch.save straight into a full disk raised RuntimeError "unexpected pos", which the
    CLI reported as an internal error (exit 1)."""
    import errno
    import pathlib

    from cmg.files import write_atomic
    from cmg_train.checkpoint import checkpoint_bytes

    path = tmp_path / "checkpoint.pt"
    write_atomic(path, checkpoint_bytes({"old": torch.zeros(3)}))
    old = path.read_bytes()

    class Full:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = pathlib.Path.open
    monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: Full() if ".tmp-" in self.name
                        else real_open(self, *a, **k))
    with pytest.raises(OSError, match="No space left on device") as info:
        write_atomic(path, checkpoint_bytes({"new": torch.ones(1000)}))
    assert info.value.filename == str(path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_training_ends_saying_what_the_threshold_promises_and_what_comes_next():
    """`cmg train` had ended on a JSON line of the run, threshold and time only."""
    from cmg_train.train import next_steps

    metrics = {"cmle": {"threshold": 2.5, "false_positive_rate_bound": 0.049, "val_false_positive_rate": 0.033,
                        "threshold_normals": {"held_out": 30, "training_left_out": 170},
                        "fusion": {"global_weight": 0.0, "synthetic_auroc": {0.0: 0.91, 0.25: 0.9}}}}
    said = next_steps(metrics, Path("runs/line3"))
    assert "flag at most 4.9% of normal frames like the 200" in said and "AUROC 0.91" in said
    assert "`cmg eval --run runs/line3`" in said and "`cmg export --run runs/line3`" in said
    assert "`cmg eval --run 'runs/Linie 3 $x'`" in next_steps(metrics, Path("runs/Linie 3 $x"))  # pasted as shown


def test_training_names_its_stages_in_order_with_the_time_so_far(tmp_path, monkeypatch, capsys):
    """A bar per stage and nothing across them: a third of a large training had shown no bar."""
    import cmg_train.train as train
    from cmg.config import load_config, resolve_config
    from cmg_data.synth import synthesize

    data = synthesize(tmp_path / "d", "tiny", seed=0, n_train=40, n_test_good=1, n_test_per_anomaly=1, progress=False)

    def stop(*_a, **_k):
        raise RuntimeError("stopped after the first stage began")

    monkeypatch.setattr(train, "train_teacher", stop)
    with pytest.raises(RuntimeError, match="stopped after"):
        train.train_run(load_config(resolve_config("tiny")), data, tmp_path / "run", progress=True)
    assert "cmg train [1/4] teacher: image and caption embeddings (" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="stopped after"):
        train.train_run(load_config(resolve_config("tiny")), data, tmp_path / "run", progress=False)
    assert "[1/4]" not in capsys.readouterr().err
