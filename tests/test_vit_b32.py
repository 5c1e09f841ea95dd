"""The path users with weights take: `cmg train --config vit-b32 --teacher-weights FILE`.

The weights file is written here from a randomly initialised open_clip model (torch.save of
its state dict, the layout of open_clip's released `open_clip_pytorch_model.bin`), so the
loading code is open_clip's own and nothing is downloaded. The slow test takes the full
224 px ViT-B-32 from that file through training, export, the TensorRT op check, the cpu
build, the real tritonserver and one frame over gRPC; its config (`cmg_bench.vit_b32.ci_config`,
also behind the vit-b32 speed figures in docs/results.md) shrinks only step counts and the CMER grid
(each grid cell costs one more ViT pass per image).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmg import contract as C
from cmg.config import TeacherConfig, resolve_config
from cmg.errors import CMGError
from cmg_app.cli import main
from cmg_bench.vit_b32 import ARCH, ci_config, random_open_clip_weights, sample_folder
from cmg_train.teacher.model import build_teacher


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict[str, Path]:
    """Files a user could pass by mistake: another architecture's weights, the same cut
    short, a text file, a pickle that is no state dict."""
    d = tmp_path_factory.mktemp("bad_weights")
    other = random_open_clip_weights(d / "rn50.pt", "RN50")
    data = other.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("laion2b_s34b_b79k\n")
    torch.save([1, 2, 3], d / "list.pt")
    return {"other": other, "truncated": d / "truncated.pt", "text": d / "notes.txt", "list": d / "list.pt"}


@pytest.mark.slow  # each builds a ViT-B-32 before open_clip reads the file (~2 s), and RN50 weights are written
@pytest.mark.parametrize("which, message", [
    ("other", r"teacher weights .*: not an open_clip ViT-B-32 checkpoint \(.*another shape.*keys missing.*\); "
              r"is it the file of another architecture"),
    ("truncated", r"not an open_clip weights file \(truncated.*PytorchStreamReader failed"),
    ("text", r"not an open_clip weights file"),
    ("list", r"not an open_clip weights file .*AttributeError"),
])
def test_wrong_weights_file_is_one_clear_error(bad_weights, which, message):
    cfg = TeacherConfig(source="open_clip", arch=ARCH, checkpoint=str(bad_weights[which]))
    with pytest.raises(CMGError, match=message) as info:
        build_teacher(cfg, 224)
    assert "\n" not in str(info.value) and str(bad_weights[which]) in str(info.value)


def test_open_clip_teacher_without_weights_downloads_nothing():
    with pytest.raises(CMGError, match="needs weights: give --teacher-weights FILE"):
        build_teacher(TeacherConfig(source="open_clip", arch=ARCH), 224)


def test_the_shipped_vit_config_asks_for_no_download():
    values = yaml.safe_load(resolve_config("vit-b32").read_text())
    assert values["teacher"]["pretrained"] is None and values["teacher"]["checkpoint"] is None


@pytest.mark.parametrize("args, message", [
    (["--teacher-weights", "{d}/missing.pt"], "teacher weights not found: .*missing.pt"),
    (["--teacher-weights", "{d}"], "not a file"),
    pytest.param(["--teacher-weights", "{other}"], "not an open_clip ViT-B-32 checkpoint", marks=pytest.mark.slow),
    ([], "needs weights: give --teacher-weights FILE"),
])
def test_cli_bad_weights_exit_2_with_one_line(tiny_data_small, request, tmp_path, capsys, args, message):
    if any("{other}" in a for a in args):
        args = [a.format(other=request.getfixturevalue("bad_weights")["other"]) for a in args]
    args = [a.format(d=tmp_path) for a in args]
    config = ci_config(tmp_path / "vit.yaml")  # vit-b32 with a CMLE minimum the 12 images meet
    rc = main(["train", "--config", str(config), "--data", str(tiny_data_small), "--out", str(tmp_path / "run"),
               "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("cmg train: error: ")
    assert re.search(message, err[0]), err[0]


def test_teacher_weights_refused_for_a_config_without_an_open_clip_teacher(tiny_data_small, tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(b"")
    rc = main(["train", "--config", "tiny", "--data", str(tiny_data_small), "--out", str(tmp_path / "run"),
               "--teacher-weights", str(tmp_path / "w.pt")])
    assert rc == 2 and "config 'tiny' has no open_clip teacher (teacher.source backbone)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_data_small(tmp_path_factory) -> Path:
    return sample_folder(tmp_path_factory.mktemp("vit_data") / "data")


@pytest.mark.slow
def test_vit_b32_from_a_weights_file_trains_exports_builds_and_serves(tiny_data_small, tmp_path, capsys):
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    from cmg.dataset import MVTecFolder
    from cmg_build.server import TritonServer
    from cmg_clients import core

    times: dict[str, float] = {}
    t = time.perf_counter()
    weights = random_open_clip_weights(tmp_path / "open_clip_pytorch_model.bin")
    times["weights"] = time.perf_counter() - t
    run, repo = tmp_path / "run", tmp_path / "repo"
    steps = {
        "train": ["train", "--config", str(ci_config(tmp_path / "vit.yaml")), "--data", str(tiny_data_small),
                  "--out", str(run), "--teacher-weights", str(weights), "--no-progress"],
        "export": ["export", "--run", str(run)],
        "build": ["build", "--run", str(run), "--target", "cpu", "--out", str(repo)],
    }
    for name, argv in steps.items():
        t = time.perf_counter()
        assert main(argv) == 0, capsys.readouterr().err
        times[name] = time.perf_counter() - t

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"]["source"] == "open_clip"
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["teacher"]["config"]["checkpoint"] == str(weights.resolve())
    # The teacher carries the file's weights, not a fresh random draw.
    saved = torch.load(weights, map_location="cpu")
    assert torch.equal(state["teacher"]["state_dict"]["visual.conv1.weight"], saved["visual.conv1.weight"])
    del state, saved

    export = json.loads((run / "onnx" / "export.json").read_text())
    assert (export["contract"]["height"], export["contract"]["width"]) == (224, 224)
    worst = max(v.get("relative_diff", 0.0) for rep in export["parity"].values() for v in rep.values()
                if isinstance(v, dict))
    assert worst <= 1e-3  # cmg_train.export.PARITY_RULE
    report = json.loads((repo / "build_report.json").read_text())
    assert report["tensorrt_readiness"]["problems"] == {m: [] for m in report["tensorrt_readiness"]["problems"]}

    ds = MVTecFolder(tiny_data_small)
    frame = ds.frames(ds.samples("test")[-1:], (224, 224))
    t = time.perf_counter()
    server = TritonServer(repo, log_file=tmp_path / "server.log")
    try:
        server.start()
        times["serve_start"] = time.perf_counter() - t
        client = grpcclient.InferenceServerClient(server.grpc_url)
        served = core.decode(client.infer(C.CMG, core.build_inputs(grpcclient, frame),
                                          outputs=core.requested_outputs(grpcclient)))
    finally:
        server.cleanup()
    # The same frame through the exported graphs in this process: what was served is them.
    scorer = ort.InferenceSession(str(run / "onnx" / f"{C.CMER_SCORER}.onnx"), providers=["CPUExecutionProvider"])
    (patch,) = scorer.run([C.PATCH_SCORES], {C.IMAGE: frame})
    encoder = ort.InferenceSession(str(run / "onnx" / f"{C.CMLE_ENCODER}.onnx"), providers=["CPUExecutionProvider"])
    (score,) = encoder.run([C.ANOMALY_SCORE], {C.IMAGE: frame, C.PATCH_SCORES: patch})
    assert served[C.ANOMALY_SCORE].shape == (1, 1) and np.isfinite(served[C.ANOMALY_SCORE]).all()
    np.testing.assert_allclose(served[C.PATCH_SCORES], patch, atol=1e-5)
    np.testing.assert_allclose(served[C.ANOMALY_SCORE], score, atol=1e-5)
    assert bool(served[C.IS_ANOMALY][0, 0]) == bool(score[0, 0] > report["threshold"])
    print("vit-b32 path timings (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))
    for big in (weights, run, repo):  # ~2.5 GB of ViT weights, graphs and copies: not for pytest's kept temp dirs
        shutil.rmtree(big) if big.is_dir() else big.unlink()
