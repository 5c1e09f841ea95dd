"""`cmg bench tradeoff`: the summary's medians and ranges, the table, option errors, and a
real smoke run (two configs' runs served by two real tritonservers, interleaved rounds)."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest

from cmg.config import resolve_config
from cmg_app.cli import main
from cmg_bench.tradeoff import config_list, markdown, run_name, summarise


def _served(fps: float, vs: float) -> dict:
    return {"throughput": fps, "vs_first": vs, "best": {"concurrency": 4, "batch": 8, "throughput": fps},
            "batch1_p50_ms": 1000.0 / fps, "flops_per_frame": 2e9, "served_auroc": 0.8}


def test_summary_and_table_per_config_in_the_given_order():
    rows = [{"config": c, "seed": s, "image_auroc": a, "pixel_auroc": 0.95, "train_s": 100.0 + s,
             "per_defect": {"crack": a, "warp": a - 0.1}}
            for c, vals in (("small", (0.81, 0.80, 0.82)), ("small-fast", (0.66, 0.70, 0.64)))
            for s, a in enumerate(vals)]
    served = {"small": _served(16.0, 1.0), "small-fast": _served(200.0, 12.5)}
    s = summarise(("small", "small-fast"), rows, served)
    assert [r["config"] for r in s] == ["small", "small-fast"]
    assert s[1]["image_auroc"] == pytest.approx(0.66) and s[1]["image_auroc_range"] == pytest.approx([0.64, 0.70])
    assert s[0]["per_defect"]["warp"] == pytest.approx(0.71) and s[0]["train_s"] == pytest.approx(101.0)
    table = markdown(s, "line3", (0, 1, 2), target_fps=150)
    assert "| `small-fast` | 0.660 (0.640 to 0.700) | 0.950 (0.950 to 0.950) | 200.0 (c4 x b8) | 12.50x |" in table
    assert "At 150 frames/s or more: `small-fast`." in table
    assert "| `small` | 0.810 | 0.710 |" in table


def test_options_and_run_folders(tmp_path, capsys):
    assert config_list("small, small-fast,small") == ("small", "small-fast")
    assert run_name("configs/mine.yaml") == "mine" and run_name("small") == "small"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "tradeoff", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "x"])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err
    assert main(["bench", "tradeoff", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no train/good" in capsys.readouterr().err
    (tmp_path / "train" / "good").mkdir(parents=True)
    for path in (tmp_path / "a" / "mine.yaml", tmp_path / "b" / "mine.yml"):
        path.parent.mkdir()
        shutil.copy(resolve_config("tiny"), path)
    assert main(["bench", "tradeoff", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--configs", f"{tmp_path / 'a' / 'mine.yaml'},{tmp_path / 'b' / 'mine.yml'}"]) == 2
    assert "share a run folder" in capsys.readouterr().err
    assert main(["bench", "tradeoff", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--configs", "tiny,no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err and not (tmp_path / "o" / "runs").exists()


@pytest.mark.slow
def test_tradeoff_smoke(tiny_data, tiny_run, tiny_onnx, tmp_path, capsys):
    """The session's tiny run under two config names (nothing trained): both served at once by
    their own tritonserver, swept at c1 b1, re-measured in two interleaved rounds."""
    out = tmp_path / "tradeoff"
    for name in ("tiny", "twin"):
        shutil.copytree(tiny_run, out / "runs" / f"{name}_s0")
    twin = tmp_path / "twin.yaml"  # a config given as a path: its runs are OUT/runs/twin_sSEED
    shutil.copy(resolve_config("tiny"), twin)
    assert main(["bench", "tradeoff", "--data", str(tiny_data), "--configs", f"tiny,{twin}",
                 "--seeds", "0", "--concurrency", "1", "--batch", "1", "--window", "0.3", "--warmup", "0.1",
                 "--repeats", "2", "--target-fps", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "tradeoff.json").read_text())
    by = {r["config"]: r for r in report["summary"]}
    assert list(by) == ["tiny", str(twin)]
    assert by["tiny"]["image_auroc"] == pytest.approx(by[str(twin)]["image_auroc"])  # the same run
    for name, r in by.items():
        served = report["served"][name]
        assert len(served["rounds"]) == 2 and all(v > 0 for v in served["rounds"])
        assert r["served_auroc"] == pytest.approx(r["image_auroc"], abs=0.02)  # the served graph is the run
        assert r["flops_per_frame"] > 0 and r["batch1_p50_ms"] > 0
    assert by["tiny"]["vs_first"] == pytest.approx(1.0)
    rounds = [report["served"][name]["rounds"] for name in ("tiny", str(twin))]
    assert by[str(twin)]["vs_first"] == pytest.approx(np.median([t / f for f, t in zip(*rounds, strict=True)]))
    assert (out / "tradeoff.png").stat().st_size > 1000
    assert f"| `{twin}` |" in capsys.readouterr().out
    for served in report["served"].values():  # both servers stopped: nothing listens on their ports
        host, port = served["url"].rsplit(":", 1)
        with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
            pass
