"""`cmg build`: configs for all three targets validated against the contract and the graphs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from toy_graphs import write_toy_export
from tritonclient.grpc import model_config_pb2 as mc

from cmg import model_config as mcfg
from cmg.checksum import file_sha256
from cmg.contract import (
    ANOMALY_MAP,
    CMLE_ENCODER,
    ENSEMBLES,
    KEEP_MASK,
    ONNX_MODELS,
    THRESHOLD,
    Contract,
)
from cmg.errors import CMGError
from cmg_build import config as cfgmod
from cmg_build import k8s, repository
from cmg_build.tensorrt import missing_prerequisites

CONTRACT = Contract(32, 32, 4, 8)
CMG = [sys.executable, "-m", "cmg_app.cli"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_toy_export(run / "onnx", CONTRACT, threshold=0.45)
    return run


def _build(toy_run, tmp_path, target, **kw):
    return repository.build(toy_run, target, tmp_path / "repo", **kw), tmp_path / "repo"


def _as_built(spec, report: dict):
    """The contract spec a built model is checked against: the cpu target's fused `cmg` is a
    plain model (no steps) with the ensemble's inputs and outputs."""
    import dataclasses

    return dataclasses.replace(spec, steps=()) if report["models"][spec.name].get("fused") else spec


def test_cpu_target_layout_and_report(toy_run, tmp_path):
    report, repo = _build(toy_run, tmp_path, "cpu", max_batch=8)
    specs = CONTRACT.models
    for name in ONNX_MODELS:
        cfg = cfgmod.validate_config(repo / name / "config.pbtxt", specs[name], repo / name / "1" / "model.onnx")
        assert cfg.backend == "python" and cfg.max_batch_size == 8
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert (repo / name / "1" / "model.py").read_text() == repository.MODEL_PY.read_text()
    enc = mcfg.read(repo / CMLE_ENCODER / "config.pbtxt")
    assert next(i for i in enc.input if i.name == THRESHOLD).optional
    for name in ENSEMBLES:
        cfg = cfgmod.validate_config(repo / name / "config.pbtxt", _as_built(specs[name], report))
        assert next(i for i in cfg.input if i.name == THRESHOLD).optional
    # cpu: `cmg` is the fused graph in the Python backend, `cmg_exact` an ensemble.
    assert mcfg.read(repo / "cmg" / "config.pbtxt").backend == "python"
    assert mcfg.read(repo / "cmg_exact" / "config.pbtxt").platform == "ensemble"
    # cpu: the encoder graph holds the default; the ensemble carries none (THRESHOLD optional).
    assert mcfg.default_threshold(mcfg.read(repo / "cmg" / "config.pbtxt")) is None
    on_disk = json.loads((repo / "build_report.json").read_text())
    assert on_disk["target"] == "cpu" and on_disk["max_batch"] == 8 and on_disk["contract"] == CONTRACT.to_dict()
    assert on_disk["parity"][CMLE_ENCODER]["batches"] == [1, 7]
    assert on_disk["versions"]["onnxruntime"] and on_disk["versions"]["tritonclient"]
    assert on_disk["files"]["cmer_scorer/1/model.onnx"] == file_sha256(repo / "cmer_scorer/1/model.onnx")
    assert on_disk["tensorrt_readiness"]["problems"] == {m: [] for m in ONNX_MODELS}
    assert report["threshold"] == pytest.approx(0.45)


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_onnxruntime_target(toy_run, tmp_path, kind):
    _, repo = _build(toy_run, tmp_path, "onnxruntime", kind=kind)
    want = mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    for name in ONNX_MODELS:
        cfg = cfgmod.validate_config(repo / name / "config.pbtxt", CONTRACT.models[name], repo / name / "1/model.onnx")
        assert cfg.platform == "onnxruntime_onnx" and cfg.instance_group[0].kind == want
        assert not any(i.optional for i in cfg.input)  # ORT backend refuses optional inputs when batching
        # CPU sessions get the cpu target's share of the cores (the backend's default is all of them)
        threads = cfg.parameters.get(mcfg.ORT_INTRA_OP_THREADS)
        assert (threads is None) if kind == "gpu" else int(threads.string_value) >= 1
        # GPU instances warm up at batch 1 and the largest batch before they report ready
        warm = [(w.batch_size, sorted(w.inputs)) for w in cfg.model_warmup]
        inputs = sorted(t.name for t in cfg.input)
        assert warm == ([(1, inputs), (cfg.max_batch_size, inputs)] if kind == "gpu" else [])
    # Every step is an ORT model (no Python step, no host hop); THRESHOLD is required end to end
    # and the calibrated default travels in the ensembles' config for clients to send.
    enc = onnx.load(str(repo / CMLE_ENCODER / "1/model.onnx"))
    assert THRESHOLD not in {t.name for t in enc.graph.initializer}
    assert sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()) == sorted(CONTRACT.models)
    for name in ENSEMBLES:
        ens = mcfg.read(repo / name / "config.pbtxt")
        assert [s.model_name for s in ens.ensemble_scheduling.step] == list(CONTRACT.models[name].steps)
        assert not next(i for i in ens.input if i.name == THRESHOLD).optional
        assert mcfg.default_threshold(ens) == pytest.approx(0.45)
        for step in ens.ensemble_scheduling.step:
            backend = mcfg.read(repo / step.model_name / "config.pbtxt")
            assert backend.platform == "onnxruntime_onnx" and not backend.backend


def test_tensorrt_configs_without_tensorrt(toy_run, tmp_path):
    if missing_prerequisites() is None:
        pytest.skip("TensorRT and a GPU are present: the engine-build test covers this host")
    with pytest.raises(CMGError, match="tensorrt target: .*trtexec.sh"):
        _build(toy_run, tmp_path, "tensorrt", max_batch=16, opt_batch=4)
    repo = tmp_path / "repo"
    for name in ONNX_MODELS:
        cfg = cfgmod.validate_config(repo / name / "config.pbtxt", CONTRACT.models[name], repo / name / "1/model.onnx")
        assert cfg.platform == "tensorrt_plan" and cfg.optimization.cuda.graphs
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    script = (repo / "trtexec.sh").read_text()
    assert script.count("trtexec --onnx=") == 3 and "--fp16" in script
    assert "nvcr.io/nvidia/tensorrt:24.10-py3" in script  # a plan loads only in the TensorRT that built it
    assert subprocess.run(["bash", "-n", str(repo / "trtexec.sh")]).returncode == 0
    assert 'cd -- "$(dirname -- "$0")"' in script  # an OUT named -trt had run trtexec in the caller's folder
    assert "IMAGE:1x32x32x3" in script and "IMAGE:4x32x32x3" in script and "IMAGE:16x32x32x3" in script
    report = json.loads((repo / "build_report.json").read_text())
    assert len(report["trtexec"]) == 3 and report["engines_missing"]


def test_skip_engines_is_a_success_that_writes_the_manifests_too(toy_run, tmp_path):
    """--skip-engines asks for configs and trtexec.sh only: exit 0 (it was exit 2, and --k8s
    was never reached)."""
    res = subprocess.run([*CMG, "build", "--run", str(toy_run), "--target", "tensorrt", "--out", str(tmp_path / "r"),
                          "--skip-engines", "--k8s", str(tmp_path / "k8s"), "--replicas", "9"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "no TensorRT engines (engine build skipped (--skip-engines)): run" in res.stdout
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "triton.yaml").read_text()))
    assert docs[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert docs[2]["spec"]["minReplicas"] == 9 and docs[2]["spec"]["maxReplicas"] == 9  # the default ceiling
    # the repository is mounted as its folder on the volume, and the pod template names the build
    template = docs[0]["spec"]["template"]
    assert template["spec"]["containers"][0]["volumeMounts"][0]["subPath"] == "r"
    report = json.loads((tmp_path / "r" / "build_report.json").read_text())
    assert template["metadata"]["annotations"]["cmg-triton/build"] == k8s.build_id(report["files"])
    assert "as its folder 'r'" in res.stdout


def test_manifests_for_the_cpu_target_say_what_the_stock_image_lacks(toy_run, tmp_path):
    res = subprocess.run([*CMG, "build", "--run", str(toy_run), "--out", str(tmp_path / "r"),
                          "--k8s", str(tmp_path / "k8s")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pip install onnxruntime" in res.stderr and "--target onnxruntime" in res.stderr
    res = subprocess.run([*CMG, "build", "--run", str(toy_run), "--target", "onnxruntime", "--out",
                          str(tmp_path / "o"), "--k8s", str(tmp_path / "k8s_o")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "onnxruntime" not in res.stderr, res.stderr


def test_the_cpu_target_refuses_gpu_instances(toy_run, tmp_path):
    """It built CPU instances and then asked Kubernetes for a GPU per pod."""
    with pytest.raises(CMGError, match="--kind gpu: the cpu target"):
        repository.build(toy_run, "cpu", tmp_path / "repo", kind="gpu")


def test_tensorrt_cli_exits_nonzero_with_message(toy_run, tmp_path):
    if missing_prerequisites() is None:
        pytest.skip("TensorRT and a GPU are present")
    res = subprocess.run([*CMG, "build", "--run", str(toy_run), "--target", "tensorrt", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "cmg build: error: tensorrt target:" in err[0] and "trtexec.sh" in err[0]
    assert (tmp_path / "r" / "trtexec.sh").is_file()


def test_tensorrt_engines_and_parity(toy_run, tmp_path):
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    report, repo = _build(toy_run, tmp_path, "tensorrt", max_batch=8, opt_batch=2)
    for name in ONNX_MODELS:
        assert (repo / name / "1" / "model.plan").stat().st_size > 0
    assert (repo / "trt_timing.cache").stat().st_size > 0
    from cmg_build.tensorrt import run_engine

    img = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    ref = ort.InferenceSession(str(repo / "cmer_scorer/1/model.onnx")).run(None, {"IMAGE": img})[0]
    got = run_engine(repo / "cmer_scorer/1/model.plan", {"IMAGE": img})["PATCH_SCORES"]
    assert np.abs(got - ref).max() < 2e-3  # FP16 engine
    enc_feeds = {"IMAGE": img, "PATCH_SCORES": ref, THRESHOLD: np.full((3, 1), 0.45, np.float32)}
    want = ort.InferenceSession(str(repo / "cmle_encoder/1/model.onnx")).run(None, enc_feeds)
    got = run_engine(repo / "cmle_encoder/1/model.plan", enc_feeds)
    assert np.abs(got["ANOMALY_SCORE"] - want[0]).max() < 2e-3
    assert report["engines"][CMLE_ENCODER]["fp16"]


@pytest.mark.parametrize("target", ["cpu", "onnxruntime"])
def test_anomaly_map_on_its_own_size(tmp_path, target):
    """ANOMALY_MAP [M, M] with M != G (as the tiny run serves): configs carry [M, M] for the map
    and [G, G] for the keep-mask and patch scores, and validate against the graphs."""
    contract = Contract(32, 32, 4, 8, map_size=8)
    run = tmp_path / "run"
    write_toy_export(run / "onnx", contract, threshold=0.45)
    report, repo = _build(run, tmp_path, target)
    specs = contract.models
    for name in ONNX_MODELS:
        cfgmod.validate_config(repo / name / "config.pbtxt", specs[name], repo / name / "1" / "model.onnx")
    for name in (CMLE_ENCODER, *ENSEMBLES):
        cfg = cfgmod.validate_config(repo / name / "config.pbtxt", _as_built(specs[name], report))
        dims = {t.name: list(t.dims) for t in cfg.output}
        assert dims[ANOMALY_MAP] == [8, 8] and dims[KEEP_MASK] == [4, 4], name
    assert json.loads((repo / "build_report.json").read_text())["contract"]["map_size"] == 8
    with pytest.raises(CMGError, match=ANOMALY_MAP):  # a [G, G]-map contract does not fit these graphs
        cfgmod.validate_config(repo / CMLE_ENCODER / "config.pbtxt", CONTRACT.models[CMLE_ENCODER])


def test_config_mismatch_names_the_tensor(toy_run, tmp_path):
    _, repo = _build(toy_run, tmp_path, "cpu")
    path = repo / "cmer_scorer" / "config.pbtxt"
    path.write_text(path.read_text().replace("dims: 32", "dims: 31", 1))
    with pytest.raises(CMGError, match="input 'IMAGE' dims"):
        cfgmod.validate_config(path, CONTRACT.models["cmer_scorer"])
    # Contract right but graph different: a graph built for another frame size.
    other = tmp_path / "other"
    write_toy_export(other, Contract(64, 64, 4, 8))
    good = repo / "cmle_encoder" / "config.pbtxt"
    with pytest.raises(CMGError, match="'IMAGE' dims .* in cmle_encoder.onnx"):
        cfgmod.validate_config(good, CONTRACT.models[CMLE_ENCODER], other / "cmle_encoder.onnx")
    path.write_text("name: 'cmer_scorer' max_batch_size: oops")
    with pytest.raises(CMGError, match="not a valid Triton ModelConfig"):
        mcfg.read(path)


@pytest.mark.parametrize("case", ["no_run", "no_export", "bad_hash", "nan_threshold", "a_file"])
def test_bad_run_folder_one_line_error(toy_run, tmp_path, case):
    run = tmp_path / "run"
    if case == "a_file":  # RUN/onnx/export.json given for RUN: had been told to `cmg export --run` that file
        write_toy_export(run / "onnx", CONTRACT)
        run = run / "onnx" / "export.json"
    if case == "nan_threshold":  # it would serve a model that flags nothing
        write_toy_export(run / "onnx", CONTRACT, threshold=float("nan"))
    if case == "no_export":
        (run / "onnx").mkdir(parents=True)
    elif case == "bad_hash":
        write_toy_export(run / "onnx", CONTRACT)
        (run / "onnx" / "cmer_scorer.onnx").write_bytes(b"not onnx")
    res = subprocess.run([*CMG, "build", "--run", str(run), "--out", str(tmp_path / "repo")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmg build: error: ")
    expect = {"no_run": "does not exist", "no_export": "export.json not found", "bad_hash": "sha256 differs",
              "nan_threshold": "threshold nan is not a finite number",
              "a_file": f"is a file: give the run folder ({tmp_path / 'run'})"}[case]
    assert expect in lines[0]


@pytest.mark.parametrize(("opt_batch", "want"), [(4, [4]), (1, [])])
def test_preferred_batch_size_is_the_opt_batch(toy_run, tmp_path, opt_batch, want):
    """Guards dynamic_batching.preferred_batch_size: --opt-batch above 1 is written (ONNX-backed models)."""
    _, repo = _build(toy_run, tmp_path, "cpu", max_batch=8, opt_batch=opt_batch)
    models = [mcfg.read(p) for p in sorted(repo.glob("*/config.pbtxt"))]
    backed = [m for m in models if m.platform != "ensemble"]
    assert {m.name for m in backed} >= set(ONNX_MODELS)
    for m in backed:
        assert list(m.dynamic_batching.preferred_batch_size) == want, m.name


def test_validation_refuses_a_wrongly_optional_input_and_a_wrong_first_step(tmp_path):
    """Guards validate_config: IMAGE marked optional, and an ensemble whose first step is another model."""
    from cmg.config import ServingConfig
    from cmg.contract import CMER_SCORER, CMG_EXACT, IMAGE

    spec = CONTRACT.models[CMLE_ENCODER]
    cfg = cfgmod.model_config(spec, "cpu", ServingConfig())
    next(t for t in cfg.input if t.name == IMAGE).optional = True
    with pytest.raises(CMGError, match="input 'IMAGE' marked optional but the contract requires it"):
        cfgmod.validate_config(mcfg.write(cfg, tmp_path / "enc"), spec)
    spec = CONTRACT.models[CMG_EXACT]
    cfg = cfgmod.model_config(spec, "cpu", ServingConfig())
    cfgmod.validate_config(mcfg.write(cfg, tmp_path / "ok"), spec)  # as generated: valid
    cfg.ensemble_scheduling.step[0].model_name = CMER_SCORER  # the one-pass scorer, not the teacher
    with pytest.raises(CMGError, match=r"steps \['cmer_scorer', 'cmle_encoder'\], contract says"):
        cfgmod.validate_config(mcfg.write(cfg, tmp_path / "exact"), spec)


def test_trtexec_names_a_timing_cache_outside_the_repository_by_its_whole_path(tmp_path):
    """Relative from OUT it broke when the repository moved or was mounted alone."""
    from cmg_build.repository import _script_path

    out = tmp_path / "repo"
    out.mkdir()
    assert _script_path(out / "trt_timing.cache", out) == "trt_timing.cache"
    assert _script_path(tmp_path / "caches" / "t.cache", out) == str(tmp_path / "caches" / "t.cache")


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_interrupted_build_leaves_the_repository_as_it_was(toy_run, tmp_path, monkeypatch):
    """Written in place, a build stopped midway left the new run's scorer beside the old run's
    encoder and fused `cmg`: two runs' models in one repository, and it served."""
    _, repo = _build(toy_run, tmp_path, "cpu", version=2)
    (repo / ".cmg-admin-key").write_text("key\n")  # a served repository's own files stay
    before = _tree(repo)
    other = tmp_path / "other"
    write_toy_export(other / "onnx", CONTRACT, threshold=0.7)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(repository, "_fused_cmg", stop)  # after the three step models are written
    with pytest.raises(KeyboardInterrupt):
        repository.build(other, "cpu", repo, version=2)
    assert _tree(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    report = repository.build(other, "cpu", repo, version=2)  # and a build that ends puts its models in
    assert report["threshold"] == pytest.approx(0.7) and (repo / ".cmg-admin-key").read_text() == "key\n"
    assert json.loads((repo / "build_report.json").read_text())["threshold"] == pytest.approx(0.7)


def test_a_build_keeps_the_repository_folder_and_what_a_server_wrote_into_it_meanwhile(toy_run, tmp_path,
                                                                                         monkeypatch):
    """OUT is the same folder after a build (a container that mounts it, or a server that polls
    it, sees the new models; a folder swapped in whole left the mount on the old, emptied
    one), and a file a server writes into OUT while the build runs (its admin key) stays."""
    _, repo = _build(toy_run, tmp_path, "cpu")
    (repo / ".cmg-admin-key").write_text("old key\n")
    inode = repo.stat().st_ino
    fused = repository._fused_cmg

    def server_writes_meanwhile(*args, **kwargs):
        (repo / ".cmg-admin-key").write_text("new key\n")
        return fused(*args, **kwargs)

    monkeypatch.setattr(repository, "_fused_cmg", server_writes_meanwhile)
    other = tmp_path / "other"
    write_toy_export(other / "onnx", CONTRACT, threshold=0.7)
    repository.build(other, "cpu", repo)
    assert repo.stat().st_ino == inode and (repo / ".cmg-admin-key").read_text() == "new key\n"
    assert json.loads((repo / "build_report.json").read_text())["threshold"] == pytest.approx(0.7)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_build_failing_while_it_puts_its_models_in_puts_the_old_ones_back(toy_run, tmp_path, monkeypatch):
    """The entries go in one by one, steps before ensembles, the report last and the old report
    out first; a failure among them (a model folder that is its own mount: EBUSY) had left the
    first new models beside the old ones under the old build's report."""
    from cmg import files

    _, repo = _build(toy_run, tmp_path, "cpu")
    before = _tree(repo)
    other = tmp_path / "other"
    write_toy_export(other / "onnx", CONTRACT, threshold=0.7)
    order: list[str] = []
    exchange = files._exchange

    def busy_encoder(a: Path, b: Path) -> bool:
        order.append(b.name)
        if b.name == "cmle_encoder":
            raise OSError(16, "Device or resource busy", str(b))
        return exchange(a, b)

    monkeypatch.setattr(files, "_exchange", busy_encoder)
    with pytest.raises(OSError, match="busy"):
        repository.build(other, "cpu", repo)
    assert _tree(repo) == before  # every entry put in was put back, the report too
    assert order[:2] == ["cmer_scorer", "cmer_teacher"] and "cmg" not in order  # steps first: the ensembles wait
    monkeypatch.undo()
    order.clear()
    monkeypatch.setattr(files, "_exchange", lambda a, b: order.append(b.name) or exchange(a, b))
    repository.build(other, "cpu", repo)
    assert order.index("cmle_encoder") < order.index("cmg") < order.index("cmg_exact")
    assert "build_report.json" not in order  # the old one went out first: the new one is a plain rename
    assert json.loads((repo / "build_report.json").read_text())["threshold"] == pytest.approx(0.7)


def test_a_build_that_cannot_stage_beside_its_repository_builds_in_place_and_says_so(toy_run, tmp_path,
                                                                                     monkeypatch, capsys):
    """OUT a mount point (even of the same file system: the rename is refused) or its parent
    read-only: the build writes in place as it did, its report gone first, and says so."""
    _, repo = _build(toy_run, tmp_path, "cpu")
    monkeypatch.setattr(repository, "can_stage_beside", lambda out: False)
    other = tmp_path / "other"
    write_toy_export(other / "onnx", CONTRACT, threshold=0.7)
    repository.build(other, "cpu", repo)
    assert "building in place" in capsys.readouterr().err
    assert json.loads((repo / "build_report.json").read_text())["threshold"] == pytest.approx(0.7)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo.tmp")]


def test_staging_beside_a_folder_is_tried_not_guessed(tmp_path, monkeypatch):
    """A bind mount shares its file system's device number, yet refuses the rename: the check
    renames an empty folder into OUT (and removes it) rather than compare devices."""
    import errno
    import os

    from cmg import files

    out = tmp_path / "repo"
    out.mkdir()
    assert files.can_stage_beside(out) and sorted(tmp_path.iterdir()) == [out] and not list(out.iterdir())
    real = os.rename

    def cross_device(a, b):
        if Path(b).parent == out:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)

    monkeypatch.setattr(files.os, "rename", cross_device)
    assert not files.can_stage_beside(out) and sorted(tmp_path.iterdir()) == [out]


def test_a_killed_builds_leftover_is_removed_by_the_next_build(toy_run, tmp_path):
    """A SIGKILLed build leaves its hidden copy beside OUT (no handler runs); under OUT's lock
    every such copy is a dead build's."""
    leftover = tmp_path / ".repo.tmp-4194304"
    (leftover / "cmg").mkdir(parents=True)
    _, repo = _build(toy_run, tmp_path, "cpu")
    assert not leftover.exists() and (repo / "build_report.json").is_file()


def test_a_build_into_the_working_folder_leaves_the_process_in_the_new_one(toy_run, tmp_path, monkeypatch):
    """`--out .`: the model folders are exchanged like any OUT's (the working folder, an old one,
    is gone after it), and a relative path (--k8s ../k8s) must still find its way."""
    _, repo = _build(toy_run, tmp_path, "cpu")
    (repo / "cmg").mkdir(exist_ok=True)
    monkeypatch.chdir(repo / "cmg")
    repository.build(toy_run, "cpu", Path(".."))
    assert Path("config.pbtxt").is_file() and Path("../build_report.json").is_file()


def test_a_build_over_an_interrupted_deploy_is_refused_until_the_deploy_is_undone(toy_run, tmp_path):
    """A deploy stopped midway leaves its record (the configs it replaced) and its staged
    version folders: a build over it kept both, and the next deploy's undo put the old
    build's configs over the new build's models (and the staged folders, a higher version,
    would serve as the latest)."""
    from cmg_build.deploy import RECOVERY

    _, repo = _build(toy_run, tmp_path, "cpu")
    (repo / RECOVERY).write_text('{"new": 2, "originals": {}, "live": []}')
    before = _tree(repo)
    with pytest.raises(CMGError, match=r"an interrupted `cmg deploy` left it staged .*run the same `cmg deploy` again"):
        repository.build(toy_run, "cpu", repo)
    assert _tree(repo) == before


def test_a_rebuild_removes_the_versions_a_deploy_left(toy_run, tmp_path, capsys):
    """`cmg deploy` leaves version 2 in the repository; a later build wrote version 1 beside
    it, and Triton (highest version) went on serving the deployed run."""
    _, repo = _build(toy_run, tmp_path, "cpu")
    for name in ("cmer_scorer", "cmle_encoder", "cmg"):
        (repo / name / "2").mkdir()
        (repo / name / "2" / "model.onnx").write_text("the deployed run's")
    _build(toy_run, tmp_path, "cpu")
    assert {p.name for p in repo.rglob("*") if p.is_dir() and p.name.isdigit()} == {"1"}
    assert "removed version folder(s) cmer_scorer/2" in capsys.readouterr().err


def test_a_failed_int8_build_leaves_no_scratch_folder(toy_run, tmp_path, monkeypatch):
    """The quantized graphs' temporary folder went only when the build succeeded."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CMGError) as failed:
        repository.build(toy_run, "cpu", tmp_path / "repo", precision="int8", data=tmp_path / "empty")
    # while the error is held (its frames keep the folder's object alive: a process that ends
    # with os._exit, as a pytest-xdist worker does, never ran its finalizer)
    assert failed.value and [p.name for p in scratch.iterdir() if p.name.startswith("cmg-int8-")] == []
