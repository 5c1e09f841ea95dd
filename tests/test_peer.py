"""`cmg bench peer`: CMG next to anomalib's PatchCore on the same folder and weights.

The slow test runs the real comparison (real anomalib, real tritonserver) on a small cut of
the session's tiny folder; it skips, saying why, where the `peer` extra is not installed.
The quick tests check the errors a user sees first.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from cmg_app.cli import main

HAVE_ANOMALIB = importlib.util.find_spec("anomalib") is not None
NEEDS_ANOMALIB = pytest.mark.skipif(not HAVE_ANOMALIB,
                                    reason='anomalib not installed (the optional extra: pip install -e ".[peer]")')


def _cut(src: Path, dst: Path, train: int = 40, good: int = 10, kinds: int = 2, per_kind: int = 5) -> Path:
    """A smaller MVTec-style copy of `src` (train/good, test/good, `kinds` defect kinds with
    their masks, the captions of the copied files): keeps the anomalib fits short."""
    names = sorted(p.name for p in (src / "test").iterdir() if p.is_dir() and p.name != "good")[:kinds]
    picks = {"train/good": train, "test/good": good, **{f"test/{k}": per_kind for k in names}}
    kept = set()
    for rel, n in picks.items():
        (dst / rel).mkdir(parents=True)
        for p in sorted((src / rel).glob("*.png"))[:n]:
            shutil.copy(p, dst / rel / p.name)
            kept.add(f"{rel}/{p.name}")
            if rel.startswith("test/") and rel != "test/good":
                mask = src / "ground_truth" / rel.split("/")[1] / f"{p.stem}_mask.png"
                (dst / "ground_truth" / rel.split("/")[1]).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, dst / "ground_truth" / rel.split("/")[1] / mask.name)
    lines = [ln for ln in (src / "captions.jsonl").read_text().splitlines()
             if ln.strip() and json.loads(ln)["file"] in kept]
    (dst / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_peer_missing_folder(tmp_path, capsys) -> None:
    assert main(["bench", "peer", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_peer_without_anomalib_names_the_extra(tmp_path, tiny_data, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "anomalib", None)  # `import anomalib` raises ImportError, as uninstalled
    assert main(["bench", "peer", "--data", str(tiny_data), "--out", str(tmp_path / "o")]) == 2
    assert '.[peer]' in capsys.readouterr().err


def test_peer_flags_given_win_over_quick_and_a_ratio_above_1_is_refused(tmp_path, tiny_data, capsys) -> None:
    """`--quick --repeats 3` had measured one repeat: --quick overwrote the flags given."""
    import argparse

    from cmg_bench.peer import FULL, add_arguments, measurement_defaults

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--data", "d", "--out", "o", "--quick", "--repeats", "3", "--concurrency", "1,4"])
    measurement_defaults(args)
    assert (args.repeats, args.concurrency, args.window) == (3, (1, 4), 0.6)
    args = p.parse_args(["--data", "d", "--out", "o"])
    measurement_defaults(args)
    assert {k: getattr(args, k) for k in FULL} == FULL
    assert main(["bench", "peer", "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--coreset-ratio", "2"]) == 2
    assert "--coreset-ratio 2.0: a share of the training patches, at most 1" in capsys.readouterr().err


def test_peer_report_names_each_sides_backbones() -> None:
    """anomalib's models take one backbone: with a two-backbone CMG run the report must say
    that anomalib ran only the first, not "same backbone"."""
    from cmg_bench.peer import backbones

    one = {"backbone": {"variant": "efficientnet_lite1", "cmg_ensemble": []}}
    two = {"backbone": {"variant": "efficientnet_lite1", "cmg_ensemble": ["efficientnet_lite2"]}}
    assert backbones(one) == "same backbone and weights (efficientnet_lite1)"
    assert backbones(two) == "anomalib on efficientnet_lite1; CMG's bank on efficientnet_lite1 + efficientnet_lite2"


@pytest.mark.slow
@NEEDS_ANOMALIB
def test_peer_side_by_side(tmp_path, tiny_data, tiny_run, capfd) -> None:
    data = _cut(Path(tiny_data), tmp_path / "data")
    out = tmp_path / "peer"
    rc = main(["bench", "peer", "--data", str(data), "--run", str(tiny_run), "--out", str(out),
               "--models", "patchcore", "--runtimes", "torch,onnx", "--coreset-ratio", "0.01",
               "--quick", "--batch", "1", "--no-progress"])
    assert rc == 0
    err = capfd.readouterr().err
    assert "the accuracy rows compare models trained on different images" in err  # the run saw all of tiny_data
    assert "Selecting Coreset" not in err  # anomalib's own coreset bar obeys --no-progress too
    res = json.loads((out / "bench.json").read_text())
    assert set(res["rows"]) == {"cmg", "patchcore"}
    for row in res["rows"].values():
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
        assert set(row["per_kind"]) == set(res["kinds"]) and len(res["kinds"]) == 2
        assert row["train_s"] and row["train_s"] > 0
    # anomalib's AUROC and sklearn's on the same scores (PatchCore's and CMG's)
    assert max(res["metric_agreement_max_abs_diff"].values()) < 1e-4
    for mode in ("served_cmg", "ort_inprocess", "anomalib_torch_patchcore"):
        b1 = res["modes"][mode]["batch1"]
        assert b1["throughput"] > 0 and b1["p99_ms"] >= b1["p50_ms"] > 0
    assert "anomalib_onnx_patchcore" in res["modes"], res["mode_notes"]
    assert res["mode_notes"]["anomalib_onnx_patchcore_max_abs_diff_vs_torch"] < 1e-3
    for key in ("cmg_vs_patchcore_auroc", "cmg_vs_patchcore_throughput"):
        assert res["ratios"][key]["median"] > 0
    auroc, speed = res["ratios"]["cmg_vs_patchcore_auroc"], res["ratios"]["cmg_vs_patchcore_throughput"]
    assert auroc["median"] == pytest.approx(res["rows"]["cmg"]["image_auroc"] / res["rows"]["patchcore"]["image_auroc"])
    assert speed["median"] == pytest.approx(statistics.median(p["a"] / p["b"] for p in speed["pairs"]))  # CMG / peer
    assert res["backbone"]["variant"] == "efficientnet_lite0" and res["backbone"]["cmg_ensemble"] == []
    assert "Backbones: same backbone and weights" in (out / "peer.md").read_text()
    assert (out / "peer.png").stat().st_size > 10_000 and (out / "peer.md").is_file()


def test_peer_ratio_is_a_over_b_interleaved() -> None:
    """Guards the peer bench's speed ratio: per pair A's throughput over B's, median over pairs."""
    import types

    from cmg_bench.peer import _ratio

    class Mode:
        def __init__(self, name: str, fps: list[float]) -> None:
            self.name, self.fps = name, iter(fps)

        def measure(self, concurrency, batch, window):
            return types.SimpleNamespace(throughput=next(self.fps))

    bar = types.SimpleNamespace(update=lambda n: None)
    got = _ratio(Mode("cmg", [30.0, 20.0, 45.0]), (4, 1), Mode("peer", [10.0, 10.0, 10.0]), (1, 1), None, 3, bar)
    assert [p["ratio"] for p in got["pairs"]] == pytest.approx([3.0, 2.0, 4.5]) and got["median"] == pytest.approx(3.0)
    assert got["a"] == {"mode": "cmg", "concurrency": 4, "batch": 1} and got["b"]["mode"] == "peer"
