"""The tiny trained run: metrics, checkpoint round trip, one-line errors for bad runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmg.dataset import MVTecFolder
from cmg.errors import CMGError
from cmg_train.checkpoint import load_run


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


def test_metrics_report_every_stage(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert 0.0 <= m["teacher"]["retrieval_top1"] <= 1.0
    assert m["cmer"]["loss_last"] < m["cmer"]["loss_first"]  # distillation lowered its loss
    for who in ("teacher", "scorer"):
        q = m["cmer"][who]["relative"]
        assert 0.0 <= q["part_recall"] <= 1.0 and 0.0 <= q["clutter_removed"] <= 1.0
    assert 0.0 <= m["cmer"]["keep_iou"] <= 1.0 and m["cmer"]["speed_ratio"] > 1.0
    assert m["cmle"]["graph"]["unique_captions"] >= 20
    assert m["cmle"]["patch_bank"] <= 2000 and m["cmle"]["patch_bank"] <= m["cmle"]["patch_features"]
    lines = (tiny_run / "train_log.jsonl").read_text().splitlines()
    assert {json.loads(line)["stage"].split("_")[0] for line in lines} >= {"teacher", "cmle"}
    assert (tiny_run / "config.yaml").is_file()


def test_checkpoint_round_trip_reproduces_scores(run, tiny_data):
    ds = MVTecFolder(tiny_data)
    samples = ds.samples("test")[::10]
    frames = torch.from_numpy(ds.frames(samples, (run.cfg.data.image_size,) * 2))
    again = load_run(run.path)
    with torch.no_grad():
        th = torch.zeros(len(frames), 1)
        a = run.detector(frames, run.scorer_graph()(frames), th)
        b = again.detector(frames, again.scorer_graph()(frames), th)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    assert float(again.detector.threshold) == pytest.approx(json.loads(
        (run.path / "metrics.json").read_text())["cmle"]["threshold"])
    assert run.contract.grid == 8 and run.contract.height == 64


def test_detector_outputs_follow_the_contract(run, tiny_data):
    ds = MVTecFolder(tiny_data)
    frames = torch.from_numpy(ds.frames(ds.samples("test")[:3], (64, 64)))
    specs = run.contract.models["cmle_encoder"].outputs
    with torch.no_grad():
        outs = run.detector(frames, run.scorer_graph()(frames), torch.zeros(3, 1))
    for spec, out in zip(specs, outs, strict=True):
        spec.check(out.numpy())
    keep = outs[3].numpy().astype(bool)
    assert (outs[2].numpy()[~keep] == 0).all()  # anomaly map is zero where the keep-mask discarded


def test_missing_run_is_a_one_line_error(tmp_path):
    with pytest.raises(CMGError, match="run folder not found"):
        load_run(tmp_path / "nope")
    with pytest.raises(CMGError, match="no checkpoint"):
        load_run(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CMGError, match="unreadable checkpoint"):
        load_run(tmp_path)
    res = subprocess.run([sys.executable, "-m", "cmg.cli", "export", "--run", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "run folder not found" in res.stderr


def test_ablation_table_on_the_tiny_run(run, tiny_data):
    from cmg_train.evaluate import evaluate

    report = evaluate(run, tiny_data, ablation=True, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert {"baseline", "cmer", "cmle", "cmg", "cmg_exact", "teacher_knn", "pyod_ecod"} <= set(rows)
    for name in ("baseline", "cmer", "cmle", "cmg"):
        assert 0.0 <= rows[name]["image_auroc"] <= 1.0
        assert 0.0 <= rows[name]["pixel_auroc"] <= 1.0
        assert set(rows[name]["per_defect"]) == {"scratch", "hole", "stain", "deformation", "wrong_part"}
        lo, hi = rows[name]["image_auroc_ci95"]
        assert lo <= rows[name]["image_auroc"] <= hi
    lo, hi = rows["cmg"]["delta_vs_baseline_ci95"]
    assert lo <= rows["cmg"]["delta_vs_baseline"] <= hi
    # Same seed, same code path: the run's own configuration (CMG) is reproduced exactly.
    assert rows["cmg"]["image_auroc"] == pytest.approx(rows["run"]["image_auroc"], abs=1e-6)
    eval_dir = run.path / "eval"
    for f in ("ablation.json", "ablation.md", "ablation_roc.png", "ablation_masks.png"):
        assert (eval_dir / f).stat().st_size > 0
    assert np.isfinite([rows[n]["image_auroc"] for n in ("teacher_knn", "pyod_ecod")]).all()


def test_run_is_usable_from_any_directory(tiny_run, tiny_data, tmp_path, monkeypatch):
    """The tiny run was trained with a relative data path (conftest); it is stored resolved,
    so eval and bench find the data from anywhere."""
    from cmg_bench.bench import resolve_data

    monkeypatch.chdir(tmp_path)
    stored = Path(json.loads((tiny_run / "metrics.json").read_text())["data"])
    assert stored.is_absolute() and stored == tiny_data.resolve()
    assert resolve_data(tiny_run, None) == stored and (stored / "train" / "good").is_dir()


def test_older_runs_relative_data_path_is_found(tiny_run, tiny_data, tmp_path, monkeypatch):
    """A run written before paths were stored resolved: its relative path is tried against the
    run folder's parents; one that resolves nowhere names --data."""
    import shutil

    from cmg_bench.bench import resolve_data

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
