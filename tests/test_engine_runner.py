"""The standalone engine runner's pure parts (CPU) and the GPU check script's CPU dry run.

The engines themselves run only where TensorRT 10 and a GPU exist (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmg import contract as C
from cmg.contract import Contract
from cmg.errors import CMGError
from cmg_build import engine_runner as er
from cmg_build.tensorrt import missing_prerequisites

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = Contract(32, 48, 4, 8, map_size=16)


def test_chain_tensors_link_the_engines_through_patch_scores():
    tensors = er.chain_tensors(CONTRACT)
    scorer, encoder = (CONTRACT.models[m] for m in CONTRACT.models[C.CMG].steps)
    assert C.PATCH_SCORES in {t.name for t in scorer.outputs} & {t.name for t in encoder.inputs}
    assert set(tensors) == {t.name for m in (scorer, encoder) for t in (*m.inputs, *m.outputs)}
    assert tensors[C.IMAGE] == ((32, 48, 3), np.dtype(np.uint8))
    assert tensors[C.ANOMALY_MAP] == ((16, 16), np.dtype(np.float32))
    exact = er.chain_tensors(CONTRACT, C.CMG_EXACT)
    assert exact[C.PATCH_SCORES] == tensors[C.PATCH_SCORES]


def test_profile_and_batch_sizes():
    prof = er.Profile(1, 8, 32)
    assert prof.check(32) == 32
    with pytest.raises(CMGError, match="batch 33 is outside the engine profile"):
        prof.check(33)
    assert er.batch_sizes((1, 8, 8, 64, 32), prof) == [1, 8, 32]
    with pytest.raises(CMGError, match="none of the batch sizes"):
        er.batch_sizes((64,), prof)


def test_buffers_are_sized_once_for_the_max_batch():
    assert er.buffer_bytes((32, 48, 3), np.uint8, 32) == 32 * 32 * 48 * 3
    assert er.buffer_bytes((1,), np.float32, 8) == 32
    assert er.buffer_bytes((0,), np.float32, 8) == 1  # CUDA refuses 0-byte allocations


def test_pinned_view_is_a_window_on_the_buffer_not_a_copy():
    raw = (ctypes.c_ubyte * er.buffer_bytes((4, 4), np.float32, 2))()
    view = er.pinned_view(ctypes.addressof(raw), (4, 4), np.float32, 2)
    assert view.shape == (2, 4, 4) and view.dtype == np.float32
    view[1, 3, 3] = 2.5
    assert np.frombuffer(raw, np.float32)[-1] == 2.5


def test_latency_stats_and_graph_fallback():
    stats = er.latency_stats([0.001] * 98 + [0.010, 0.020], batch=8)
    assert stats["p50_ms"] == pytest.approx(1.0) and stats["p99_ms"] > 9.0
    assert stats["frames_per_s"] == pytest.approx(8000.0)
    with pytest.raises(CMGError, match="no timed iterations"):
        er.latency_stats([], 1)
    cache = er.GraphCache()
    assert cache.use_graph(8, True) and not cache.use_graph(8, False)
    cache.failed[8] = "capture refused"
    assert not cache.use_graph(8, True) and cache.use_graph(1, True)


def test_open_repository_needs_a_tensorrt_repository(tmp_path):
    with pytest.raises(CMGError, match="no build_report.json"):
        er.open_repository(tmp_path)
    (tmp_path / "build_report.json").write_text(json.dumps({"target": "cpu"}))
    with pytest.raises(CMGError, match="--engines needs the tensorrt target"):
        er.open_repository(tmp_path)
    (tmp_path / "build_report.json").write_text(json.dumps(
        {"target": "tensorrt", "version": 1, "contract": CONTRACT.to_dict(), "threshold": 0.5, "max_batch": 8}))
    with pytest.raises(CMGError, match="engines not built: .*cmer_scorer/1/model.plan"):
        er.open_repository(tmp_path)


@pytest.mark.skipif(missing_prerequisites() is None, reason="TensorRT and a GPU are present")
def test_bench_engines_says_what_is_missing(tmp_path, capsys):
    from cmg_app.cli import main

    assert main(["bench", "engines", "--repository", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "engines needs TensorRT and a GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tiny_run, tiny_data, tmp_path):
    """The real script end to end with the CPU switch: it trains nothing, skips what this host
    lacks with the reason, and leaves at most 8 files (what comes back from the lent machine)."""
    out = tmp_path / "gpu_out"
    data = tmp_path / "carried"  # what gpu_prepare.sh carries: the test split and its masks, no train/
    for part in ("test", "ground_truth"):
        shutil.copytree(tiny_data / part, data / part)
    env = {**os.environ, "OUT": str(out), "VENV": sys.prefix, "CMG_GPU_CARRY": str(tmp_path / "no_carry"),
           "CMG_GPU_CHECK_DEVICE": "cpu", "CMG_GPU_CHECK_ITERS": "3", "CMG_GPU_CHECK_BATCHES": "1,2",
           "CMG_GPU_CHECK_DATA": str(data)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tiny_run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    steps = (out / "steps.txt").read_text()
    assert "env ok" in steps and "torch ok" in steps and "accuracy ok" in steps and "trt_build SKIPPED" in steps
    result = json.loads((out / "torch.json").read_text())
    rows = result["modes"]["cpu_fp32"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 and r["frames_per_s"] > 0 for r in rows)
    assert set(result["skipped"]) == {"cuda_fp32", "cuda_fp16_autocast", "cuda_graphs_fp32"}
    # Nothing in the served forward that CUDA-graph capture refuses (a H2D copy of the map
    # blur's taps did, found on a lent H100): checked here on the CPU, on every run.
    assert result["capture_blockers"] == []
    accuracy = json.loads((out / "accuracy.json").read_text())
    ref = accuracy["modes"]["cpu_fp32"]  # the reference against itself: no change, a real AUROC
    assert 0.0 <= ref["auroc"] <= 1.0 and ref["max_abs_change"] == 0 and ref["flag_changes"] == 0
    assert accuracy["frames"] > 0 and set(accuracy["skipped"]) == {"cuda_fp32", "cuda_fp16_autocast"}


def test_rank_auroc_is_sklearns_with_ties():
    from sklearn.metrics import roc_auc_score

    from cmg_bench.gpu_check import rank_auroc

    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, 40)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, 40).astype(np.float32)  # many ties
        assert rank_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.slow
def test_gpu_check_accuracy_needs_only_what_the_gpu_machine_has(tiny_run, tiny_data, tmp_path):
    """The lent machine has torch, numpy, Pillow, onnx, onnxruntime, PyYAML and tqdm, and the
    carry has no room for sklearn, scipy, matplotlib or open_clip: the accuracy step runs
    with those made unimportable."""
    code = ("import sys\n"
            "for name in ('sklearn', 'scipy', 'matplotlib', 'open_clip', 'tritonclient'):\n"
            "    sys.modules[name] = None\n"
            "from pathlib import Path\n"
            "from cmg_bench.gpu_check import check_accuracy\n"
            "r = check_accuracy(Path(sys.argv[1]), Path(sys.argv[2]), 'cpu')\n"
            "print(r['modes']['cpu_fp32']['auroc'])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_run), str(tiny_data)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.0 <= float(proc.stdout.strip().splitlines()[-1]) <= 1.0
