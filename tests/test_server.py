"""Real tritonserver (nvidia-pytriton binary + Python backend) on a cpu-target repository of toy graphs."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from toy_graphs import engine_shaped_repo, reference, scorer_graph, write_toy_export
from tritonclient.utils import InferenceServerException

from cmg import model_config as mcfg
from cmg.contract import CMER_SCORER, ENSEMBLES, IMAGE, PATCH_SCORES, THRESHOLD, Contract
from cmg.errors import CMGError
from cmg_build import repository
from cmg_build import server as server_mod
from cmg_build.server import TritonServer, find_tritonserver, python_backend_dir
from cmg_clients import core

pytestmark = pytest.mark.slow
CONTRACT = Contract(32, 32, 4, 8)
THR = 0.45
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    write_toy_export(root / "run" / "onnx", CONTRACT, threshold=THR)
    repository.build(root / "run", "cpu", root / "repo", max_batch=8, cpu_threads=1)
    return root / "repo"


@pytest.fixture(scope="module")
def server(toy_repo):
    srv = TritonServer(toy_repo).start(timeout=180)
    yield srv
    srv.cleanup()


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, CONTRACT.height, CONTRACT.width, 3), dtype=np.uint8)


def _infer(url: str, model: str, images: np.ndarray, threshold: float | None = None) -> dict[str, np.ndarray]:
    """Ensembles through the client core (as every client sends them); a composing model by hand."""
    client = grpcclient.InferenceServerClient(url)
    if model in ENSEMBLES:
        return core.decode(client.infer(model, core.build_inputs(grpcclient, images, threshold),
                                        outputs=core.requested_outputs(grpcclient)))
    inputs = [grpcclient.InferInput(IMAGE, list(images.shape), "UINT8")]
    inputs[0].set_data_from_numpy(images)
    result = client.infer(model, inputs)
    names = [o.name for o in client.get_model_metadata(model).outputs]
    return {n: result.as_numpy(n) for n in names}


def test_find_tritonserver_env():
    binary, env = find_tritonserver()
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert env["PATH"].split(os.pathsep)[0] == str(VENV_BIN)  # the stub embeds the first python3 on PATH
    if not shutil.which("tritonserver"):
        assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]


def test_the_stubs_find_a_shared_pythons_library(monkeypatch, tmp_path):
    """The Python-backend stubs link libpython: a pyenv or conda Python keeps it off the
    system's library path, so the server's environment names it; a stub that still cannot
    load a library fails the start at once instead of after the whole timeout."""
    import sysconfig

    if shutil.which("tritonserver"):
        pytest.skip("tritonserver on PATH: the official image's environment is its own")
    values = {"Py_ENABLE_SHARED": 1, "LIBDIR": str(tmp_path)}
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: values.get(name))
    assert str(tmp_path) in find_tritonserver()[1]["LD_LIBRARY_PATH"].split(os.pathsep)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/mylibs")
    assert find_tritonserver()[1]["LD_LIBRARY_PATH"].split(os.pathsep)[-2:] == ["/opt/mylibs", str(tmp_path)]
    values["LIBDIR"] = "/usr/lib/x86_64-linux-gnu"  # a system Python: the loader's own folder, not named
    assert "/usr/lib/x86_64-linux-gnu" not in find_tritonserver()[1]["LD_LIBRARY_PATH"]
    values["LIBDIR"], values["Py_ENABLE_SHARED"] = str(tmp_path), 0  # a static build: no libpython to find
    assert str(tmp_path) not in find_tritonserver()[1]["LD_LIBRARY_PATH"].split(os.pathsep)

    log = tmp_path / "server.log"
    log.write_text("I1207 10:00:00.000000 1 server.cc:1] starting\n/backends/python/triton_python_backend_stub: "
                   "error while loading shared libraries: libpython3.12.so.1.0: cannot open shared object file\n")
    server = TritonServer(tmp_path, log_file=log)
    try:
        assert "libpython3.12.so.1.0" in server._fatal_log_line()
    finally:
        server.cleanup(keep_log=True)


def test_python_backend_dir(tmp_path):
    if shutil.which("tritonserver"):
        pytest.skip("tritonserver on PATH brings its own backends")
    backends = python_backend_dir(tmp_path)
    names = {p.name for p in (backends / "python").iterdir()}
    assert names == {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}


def test_a_repository_for_another_backend_is_refused_before_the_server_starts(tmp_path):
    """The onnxruntime / tensorrt targets serve in the official image; the bundled server has
    only the Python backend, which Triton would say as "unable to find backend library"."""
    if shutil.which("tritonserver"):
        pytest.skip("tritonserver on PATH brings its own backends")
    for name, line in (("scorer", 'platform: "onnxruntime_onnx"'), ("cmg", 'platform: "ensemble"'),
                       ("fused", 'backend: "python"')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\n{line}\n')
    assert server_mod.backends_needed(tmp_path) == {"onnxruntime", "python"}
    with pytest.raises(CMGError, match="needs Triton's onnxruntime backend.*official image.*--target cpu"):
        server_mod.check_repository(tmp_path)
    (tmp_path / "scorer" / "config.pbtxt").unlink()
    (tmp_path / "scorer" / "1").mkdir()  # a model whose config Triton completes: its backend is not read here
    server_mod.check_repository(tmp_path)


@pytest.mark.parametrize("model", ENSEMBLES)
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_ensembles_serve_toy_graphs(server, model, threshold):
    images = _frames(5, seed=1)
    got = _infer(server.grpc_url, model, images, threshold)
    want = reference(CONTRACT, images, THR if threshold is None else threshold, exact=model == "cmg_exact")
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)


def test_optional_threshold_changes_decision(server):
    images = _frames(4, seed=2)
    low = _infer(server.grpc_url, "cmg", images, 0.0)["IS_ANOMALY"]
    high = _infer(server.grpc_url, "cmg", images, 1.0)["IS_ANOMALY"]
    assert low.all() and not high.any()


def test_concurrent_mixed_requests_are_split_back(server):
    """Requests with and without THRESHOLD batched together each get their own rows."""
    jobs = [(_frames(1 + i % 3, seed=10 + i), None if i % 2 else 0.2 + 0.05 * i) for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda j: _infer(server.grpc_url, "cmg", *j), jobs))
    for (images, thr), got in zip(jobs, results, strict=True):
        want = reference(CONTRACT, images, THR if thr is None else thr)
        np.testing.assert_allclose(got["ANOMALY_SCORE"], want["ANOMALY_SCORE"], atol=1e-5)
        assert np.array_equal(got["IS_ANOMALY"], want["IS_ANOMALY"])


def test_http_agrees_with_grpc(server):
    images = _frames(2, seed=3)
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput(IMAGE, list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    scores = client.infer("cmg", [inp]).as_numpy("ANOMALY_SCORE")
    np.testing.assert_array_equal(scores, _infer(server.grpc_url, "cmg", images)["ANOMALY_SCORE"])


@pytest.mark.parametrize("model", ["cmg", CMER_SCORER, "cmle_encoder"])
@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_bad_input_is_invalid_arg_naming_the_tensor(server, model, bad):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    if bad == "dtype":
        arr = np.zeros((1, CONTRACT.height, CONTRACT.width, 3), np.float32)
    else:
        arr = np.zeros((1, CONTRACT.height + 1, CONTRACT.width, 3), np.uint8)
    inp = grpcclient.InferInput(IMAGE, list(arr.shape), "FP32" if bad == "dtype" else "UINT8")
    inp.set_data_from_numpy(arr)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [inp])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'IMAGE'" in info.value.message()
    assert client.is_server_ready()  # still serving afterwards
    _infer(server.grpc_url, "cmg", _frames(1))


def test_metrics_endpoint_counts_requests(server):
    import urllib.request

    _infer(server.grpc_url, "cmg", _frames(1))
    text = urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success{model="cmg"'))
    assert float(line.rsplit(" ", 1)[1]) >= 1


def _broken_repo(tmp_path: Path) -> Path:
    """A repository whose only model has no model.py: tritonserver fails to load it."""
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken" backend: "python" max_batch_size: 1\n'
                                                 'input [{name: "X" data_type: TYPE_FP32 dims: [1]}]\n'
                                                 'output [{name: "Y" data_type: TYPE_FP32 dims: [1]}]\n')
    return repo


def test_start_failure_reports_log_tail(tmp_path):
    repo = _broken_repo(tmp_path)
    from cmg.errors import CMGError

    srv = TritonServer(repo)
    t0 = time.monotonic()
    with pytest.raises(CMGError, match="tritonserver (exited with code|failed to start)") as info:
        srv.start(timeout=120)
    assert "model.py" in str(info.value) and time.monotonic() - t0 < 60
    assert not srv.is_running()
    srv.cleanup()


# Once in a fresh-clone CI run (not reproduced in 2 reruns of the file) tritonserver exited with
# code 1 during start-up here, with no model or port error in its log: one rerun, so a
# repeatable failure still fails; the cause is open (issue 25 note).
@pytest.mark.flaky(reruns=1)
def test_explicit_mode_loads_new_version(toy_repo, tmp_path):
    import onnx

    repo = tmp_path / "repo"
    shutil.copytree(toy_repo, repo)
    images = _frames(2, seed=4)
    with TritonServer(repo, model_control_mode="explicit", load_models=[CMER_SCORER]) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        assert client.is_model_ready(CMER_SCORER) and not client.is_model_ready("cmg")
        v1 = _infer(srv.grpc_url, CMER_SCORER, images)[PATCH_SCORES]
        np.testing.assert_allclose(v1, reference(CONTRACT, images, THR)[PATCH_SCORES], atol=1e-5)
        # A new version appears while serving (here: the inverted scorer), then is loaded.
        v2dir = repo / CMER_SCORER / "2"
        v2dir.mkdir()
        shutil.copyfile(repo / CMER_SCORER / "1" / "model.py", v2dir / "model.py")
        onnx.save(scorer_graph(CONTRACT, CMER_SCORER, invert=True), str(v2dir / "model.onnx"))
        with pytest.raises(InferenceServerException, match="restricted"):  # the repository's key opens it
            client.load_model(CMER_SCORER)
        client.load_model(CMER_SCORER, headers=srv.admin_headers())
        assert client.is_model_ready(CMER_SCORER, "2")
        v2 = _infer(srv.grpc_url, CMER_SCORER, images)[PATCH_SCORES]
        np.testing.assert_allclose(v2, reference(CONTRACT, images, THR, exact=True)[PATCH_SCORES], atol=1e-5)


def test_explicit_mode_keys_the_model_repository_api(toy_repo, tmp_path, tiny_run):
    """Triton's load API takes uploaded files, Python-backend code included: in explicit mode
    (what `cmg deploy` needs) a caller without the repository's key loads nothing, and
    `cmg deploy` from another repository's key is refused with a reason."""
    from cmg_build.deploy import deploy
    from cmg_build.server import ADMIN_KEY_FILE

    repo = tmp_path / "repo"
    shutil.copytree(toy_repo, repo)
    with TritonServer(repo, model_control_mode="explicit", load_models=[CMER_SCORER]) as srv:
        key_file = repo / ADMIN_KEY_FILE
        assert (key_file.stat().st_mode & 0o777) == 0o600 and key_file.read_text().strip() == srv.admin_key
        plain, wide, other = TritonServer(repo), TritonServer(repo, address="0.0.0.0"), TritonServer(
            repo, address="127.0.0.2")
        try:  # mode none on loopback (all of 127/8): nothing restricted; beyond it: the shared-memory API
            for local in (plain, other):
                assert not [a for a in local.command() if "restricted" in a] and local.admin_headers() is None
            assert wide.admin_key == srv.admin_key  # one key per repository
            assert f"--http-restricted-api=shared-memory,logging,trace:cmg-admin-key={wide.admin_key}" in wide.command()
        finally:
            plain.cleanup(), wide.cleanup(), other.cleanup()
        code = 'raise SystemExit("ran code sent by a client")\n'
        config = '{"backend": "python", "max_batch_size": 0, "input": [], "output": []}'
        for protocol, client in (("grpc", grpcclient.InferenceServerClient(srv.grpc_url)),
                                 ("http", httpclient.InferenceServerClient(srv.http_url))):
            with pytest.raises(InferenceServerException, match="restricted"):
                client.load_model("uploaded", config=config, files={"file:1/model.py": code.encode()})
            with pytest.raises(InferenceServerException, match="restricted"):
                client.unload_model(CMER_SCORER)
            with pytest.raises(InferenceServerException, match="restricted"):
                client.update_log_settings({"log_verbose_level": 1})
            assert client.is_model_ready(CMER_SCORER), protocol
            names = client.get_model_repository_index(headers=srv.admin_headers(protocol))
            assert CMER_SCORER in str(names)
        other = tmp_path / "other"
        shutil.copytree(toy_repo, other)
        (other / ADMIN_KEY_FILE).write_text("another repository's key\n")
        (other / "build_report.json").write_text("{}")
        with pytest.raises(CMGError, match="refused .*admin key"):
            deploy(tiny_run, other, srv.grpc_url)
        assert not (repo / "uploaded").exists()


def test_a_restricted_api_is_named_not_called_unreachable(toy_repo, tmp_path):
    """Refused for want of the admin key, the client had said the server was unreachable (gRPC
    answers UNAVAILABLE) and that it serves no models; now it names the restriction, and no
    retry is spent on it."""
    from cmg_clients import core as client_core
    from cmg_clients.client import CMGClient, InferError

    repo = tmp_path / "repo"
    shutil.copytree(toy_repo, repo)
    srv = TritonServer(repo, model_control_mode="explicit", load_models=[CMER_SCORER])
    srv.restricted.insert(0, "shared-memory")  # as a server bound beyond loopback has it
    with srv:
        srv.start()
        with pytest.raises(CMGError, match="lists its models only to callers with its admin key"):
            CMGClient(srv.grpc_url, model="cmg_exact")
        raw = grpcclient.InferenceServerClient(srv.grpc_url)
        with pytest.raises(InferenceServerException) as refused:
            raw.register_system_shared_memory("r", "/r", 64)
        assert client_core.classify(refused.value).kind == client_core.PERMANENT
        client = CMGClient.__new__(CMGClient)  # only its call wrapper: the toy repository has no cmg
        client.protocol, client.url, client.model, client.timeout_s = "grpc", srv.grpc_url, CMER_SCORER, 10.0
        with pytest.raises(InferError, match=r"score without --shm") as said:
            client._call("shared memory registration of /r", raw.register_system_shared_memory, "r", "/r", 64)
        assert "unreachable" not in str(said.value)


def test_an_empty_admin_key_is_made_again_never_none(tmp_path):
    """A key file left empty (a crash between its create and its write) had put the key "None"
    on tritonserver's command line (anyone sending it got in) and failed the start."""
    from cmg_build.server import ADMIN_KEY_FILE, admin_headers, admin_key

    repo = tmp_path / "repo"
    repo.mkdir()
    assert admin_key(repo) is None and admin_headers(repo) == {}  # no key: no header (older servers)
    (repo / ADMIN_KEY_FILE).write_text("")
    assert admin_key(repo) is None
    key = admin_key(repo, create=True)
    assert key and (repo / ADMIN_KEY_FILE).read_text().strip() == key and admin_key(repo, create=True) == key
    assert [p.name for p in repo.iterdir()] == [ADMIN_KEY_FILE]  # no temporary file left
    server = TritonServer(repo, model_control_mode="explicit", require_models=False)
    try:
        restricted = [a for a in server.command() if "restricted" in a]
        assert restricted and all(a.endswith(f"=model-repository,logging,trace:cmg-admin-key={key}") for a in restricted)
    finally:
        server.cleanup()


def test_deploy_talks_to_a_server_that_restricts_nothing(toy_repo, tmp_path):
    """A server started by an older version (or by tritonserver itself) checks no key and its
    repository has none: deploy sends no header instead of refusing it."""
    from cmg_build.deploy import _client

    repo = tmp_path / "repo"
    shutil.copytree(toy_repo, repo)
    srv = TritonServer(repo, model_control_mode="explicit", load_models=[CMER_SCORER])
    srv.restricted, srv.admin_key = [], None  # as an older version started it
    (repo / ".cmg-admin-key").unlink()
    with srv:
        srv.start()
        client = _client(srv.grpc_url, repo)
        client.unload_model(CMER_SCORER)
        client.load_model(CMER_SCORER)
        assert client.is_model_ready(CMER_SCORER)


def _port_open(url: str) -> bool:
    host, port = url.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def _ready_text(proc: subprocess.Popen, timeout: float = 180) -> str:
    """What `cmg serve` printed up to its last ready line (the metrics address), or until it exited."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("metrics"):
            break
    return "".join(lines)


def test_cmg_serve_cli_without_activated_venv(toy_repo):
    """`.venv/bin/cmg serve` with a PATH that lacks the venv: stub still imports onnxruntime; SIGTERM stops it."""
    from cmg_build.server import free_port

    ports = [str(free_port()) for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    cmd = [str(VENV_BIN / "cmg"), "serve", "--repository", str(toy_repo), "--http-port", ports[0],
           "--grpc-port", ports[1], "--metrics-port", ports[2]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out = _ready_text(proc)
        assert f"grpc    127.0.0.1:{ports[1]}" in out, out
        got = _infer(f"127.0.0.1:{ports[1]}", "cmg", _frames(1))
        assert got["ANOMALY_SCORE"].shape == (1, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _port_open(f"127.0.0.1:{ports[1]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_and_kill(toy_repo):
    srv = TritonServer(toy_repo).start(timeout=180)
    assert srv.is_ready()
    regions = list(server_mod.SHM_DIR.glob(f"{srv.shm_prefix}*"))
    assert regions, "the Python backend's shared memory does not carry this server's prefix"
    srv.kill()
    assert not srv.is_running() and not srv.is_ready()
    # tritonserver removes its regions only on a clean stop: a SIGKILLed one leaks them
    # (a full /dev/shm then kills the next server with SIGBUS while it starts)
    assert not any(r.exists() for r in regions)
    srv.start(timeout=180)  # restart on the same ports (the stream tests do this)
    assert srv.is_ready()
    srv.stop()
    assert not srv.is_running() and not _port_open(srv.grpc_url)
    srv.cleanup()


def test_gpu_target_ensemble_has_no_python_step_and_clients_send_the_default(tmp_path):
    """The onnxruntime/tensorrt ensembles are scorer -> encoder only, THRESHOLD required; run here
    with the two ONNX models on the Python backend (this server has no ORT/TensorRT backend):
    the client library fills in the config's calibrated default, a raw request without
    THRESHOLD is refused by Triton itself, an explicit THRESHOLD is used as sent."""
    from cmg.errors import CMGError
    from cmg_clients.client import CMGClient

    repo = engine_shaped_repo(tmp_path, CONTRACT, THR)
    assert all(len(mcfg.read(repo / m / "config.pbtxt").model_warmup) == 2 for m in CONTRACT.models["cmg"].steps)
    ens = mcfg.read(repo / "cmg" / "config.pbtxt")
    assert [s.model_name for s in ens.ensemble_scheduling.step] == list(CONTRACT.models["cmg"].steps)
    assert not next(t for t in ens.input if t.name == THRESHOLD).optional
    assert mcfg.default_threshold(ens) == pytest.approx(THR)
    images = _frames(3, seed=5)
    with TritonServer(repo) as srv:
        with CMGClient(srv.grpc_url, "grpc") as client:
            assert client.default_threshold == pytest.approx(THR)
            for thr in (None, 0.9):
                got = client.infer_arrays(images, thr)
                want = reference(CONTRACT, images, THR if thr is None else thr)
                np.testing.assert_allclose(got["ANOMALY_SCORE"], want["ANOMALY_SCORE"], atol=1e-5)
                assert np.array_equal(got["IS_ANOMALY"], want["IS_ANOMALY"])
            with pytest.raises(CMGError, match="not a finite number"):
                client.infer_arrays(images, float("nan"))
            client.default_threshold = 0.9  # set: sent whenever the caller gives none
            assert np.array_equal(client.infer_arrays(images)["IS_ANOMALY"],
                                  reference(CONTRACT, images, 0.9)["IS_ANOMALY"])
            client.default_threshold = None  # the calibrated one again
            assert client.default_threshold == pytest.approx(THR)
        raw = grpcclient.InferenceServerClient(srv.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            raw.infer("cmg", core.build_inputs(grpcclient, images))  # no THRESHOLD
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert THRESHOLD in info.value.message()


# -- non-finite THRESHOLD: INVALID_ARG from the server itself --------------------------------
def _raw_inputs(mod, images: np.ndarray, threshold: np.ndarray, patch_scores: bool = False) -> list:
    """Built by hand on purpose: the client core refuses a non-finite threshold before sending."""
    img = mod.InferInput(IMAGE, list(images.shape), "UINT8")
    img.set_data_from_numpy(images)
    thr = mod.InferInput(THRESHOLD, list(threshold.shape), "FP32")
    thr.set_data_from_numpy(threshold)
    inputs = [img, thr]
    if patch_scores:
        ps = mod.InferInput(PATCH_SCORES, [len(images), CONTRACT.grid, CONTRACT.grid], "FP32")
        ps.set_data_from_numpy(np.zeros((len(images), CONTRACT.grid, CONTRACT.grid), np.float32))
        inputs.append(ps)
    return inputs


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", [*ENSEMBLES, "cmle_encoder"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_threshold_is_invalid_arg(server, protocol, model, value):
    mod, url = (grpcclient, server.grpc_url) if protocol == "grpc" else (httpclient, server.http_url)
    client = mod.InferenceServerClient(url)
    thr = np.array([[0.5], [value]], np.float32)  # one bad item spoils the request
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, _raw_inputs(mod, _frames(2), thr, patch_scores=model == "cmle_encoder"))
    assert info.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
    assert "'THRESHOLD' must be finite" in info.value.message()
    # the same request with finite values is answered
    client.infer(model, _raw_inputs(mod, _frames(2), np.array([[0.5], [1e30]], np.float32),
                                    patch_scores=model == "cmle_encoder"))


def test_non_finite_threshold_fails_only_its_own_request(server):
    """Good and NaN requests batched together by Triton: only the NaN one is refused."""
    def one(i: int):
        thr = np.full((1, 1), np.nan if i % 3 == 0 else 0.4, np.float32)
        try:
            grpcclient.InferenceServerClient(server.grpc_url).infer("cmg", _raw_inputs(grpcclient, _frames(1, i), thr))
            return "ok"
        except InferenceServerException as exc:
            return exc.status()

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, range(12)))
    assert got == ["StatusCode.INVALID_ARGUMENT" if i % 3 == 0 else "ok" for i in range(12)]


def test_request_without_image_is_refused_as_invalid(server):
    """The cpu target's fused `cmg` names the missing IMAGE. Known limit of the ensembles
    (`cmg_exact`): Triton 2.51 counts inputs only when a model has an optional one, so an
    ensemble request carrying THRESHOLD alone reaches the scheduler and gets its 'unexpected
    deadlock' wording. It is still INVALID_ARGUMENT, answered at once (no hang)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    thr = grpcclient.InferInput(THRESHOLD, [1, 1], "FP32")
    thr.set_data_from_numpy(np.full((1, 1), 0.5, np.float32))
    for model, inputs, needle in (("cmg", [thr], "input 'IMAGE' is required by cmg"),
                                  ("cmg_exact", [thr], "deadlock"),
                                  ("cmg", [], "missing required input(s) ['IMAGE']")):
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs, client_timeout=30)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and needle in info.value.message(), model


# -- start-up failures, empty repositories, temporary folders --------------------------------
def test_start_failure_names_the_model_and_keeps_the_log(tmp_path):
    from cmg.errors import CMGError

    repo = _broken_repo(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    res = subprocess.run([str(VENV_BIN / "cmg"), "serve", "--repository", str(repo), "--http-port",
                          str(_free()), "--grpc-port", str(_free()), "--metrics-port", str(_free())],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("cmg serve: error: tritonserver") and "broken/1/model.py" in last, res.stderr
    log = Path(last.rsplit("(log ", 1)[1].rstrip(")"))
    assert log.is_file() and "broken" in log.read_text(), "the log the message names must still be there"
    assert log.parent.name.startswith("cmg-triton-") and log.parent.parent == tmp_path / "tmp"
    assert [p.name for p in log.parent.iterdir()] == [log.name], "only the log stays, not the backends"
    # The library says the same, without the CLI.
    srv = TritonServer(repo)
    with pytest.raises(CMGError, match="broken/1/model.py"):
        srv.start(timeout=120)
    srv.cleanup()


def _free() -> int:
    from cmg_build.server import free_port

    return free_port()


def test_repository_without_models_is_not_ready(tmp_path):
    from cmg.errors import CMGError

    (tmp_path / "repo").mkdir()
    srv = TritonServer(tmp_path / "repo")
    with pytest.raises(CMGError, match="no models in"):
        srv.start(timeout=120)
    assert not srv.is_running()
    srv.cleanup()


def test_serve_with_log_file_removes_its_temporary_folder(toy_repo, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    ports = [str(_free()) for _ in range(3)]
    cmd = [str(VENV_BIN / "cmg"), "serve", "--repository", str(toy_repo), "--http-port", ports[0],
           "--grpc-port", ports[1], "--metrics-port", ports[2], "--log-file", str(tmp_path / "server.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line.strip().startswith("metrics"):
                break
        assert any(p.name.startswith("cmg-triton-") for p in tmp.iterdir()), "the backends folder is made"
        proc.send_signal(signal.SIGINT)
        try:  # a stop takes seconds; 120 s leaves room for a loaded CI host (one 60 s timeout seen, cause unknown)
            assert proc.wait(timeout=120) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            log = (tmp_path / "server.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"cmg serve did not stop within 120 s of SIGINT; its output after ready:\n"
                        f"{proc.communicate()[0][-2000:]}\nserver.log tail:\n{log}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [p.name for p in tmp.iterdir() if p.name.startswith("cmg-triton-")]  # (tritonserver writes .ses)
    assert not left, f"left behind: {left}"
    assert (tmp_path / "server.log").stat().st_size > 0


# -- no orphaned servers, ports (issue 25) -----------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`: a server and its stubs, found by
    group, never by name (other tests run servers of their own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and int(stat[2]) == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def _children(pid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and (s := _proc_stat(int(e.name))) and int(s[1]) == pid and s[0] != "Z"]


def _wait_gone(pgid: int, timeout: float = 45) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _serve(repo: Path, ports: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    """`cmg serve` until ready; (process, tritonserver pid from its ready line)."""
    cmd = [str(VENV_BIN / "cmg"), "serve", "--repository", str(repo), "--http-port", ports[0],
           "--grpc-port", ports[1], "--metrics-port", ports[2]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    text = _ready_text(proc)
    assert "ready" in text, text
    return proc, int(text.split("(pid ", 1)[1].split(",", 1)[0])


def test_sigkilled_serve_leaves_no_server_and_its_folder_goes(toy_repo, tmp_path):
    """SIGKILL of `cmg serve` (nothing of it runs): tritonserver and its stubs stop (parent-death
    signal), the next `cmg serve` on the same ports starts and removes the dead one's folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    ports = [str(_free()) for _ in range(3)]
    first, server_pid = _serve(toy_repo, ports, env)
    try:
        assert server_pid in _group_members(server_pid)
        work = [p for p in tmp.iterdir() if p.name.startswith("cmg-triton-")]
        assert len(work) == 1
        first.kill()
        first.wait(timeout=30)
        assert _wait_gone(server_pid) == [], "tritonserver outlived a SIGKILLed cmg serve"
        second, second_pid = _serve(toy_repo, ports, env)  # the ports are free again
        try:
            assert not work[0].exists(), "the dead serve's temporary folder was not removed"
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
            assert _wait_gone(second_pid) == []
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server_pid, signal.SIGKILL)
    assert not [p for p in tmp.iterdir() if p.name.startswith("cmg-triton-")]


def test_sigterm_to_bench_soak_stops_its_server_and_removes_its_folder(tiny_run, tiny_onnx, tmp_path):
    """`cmg bench soak` SIGTERMed mid-stream: no tritonserver (or stub) of it left, its
    temporary folder gone, exit 143."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "bench"
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [str(VENV_BIN / "cmg"), "bench", "soak", "--minutes", "1", "--run", str(tiny_run), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        soak = out / "soak.jsonl"
        while not (soak.exists() and soak.read_bytes().count(b"\n") >= 20):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the soak never started streaming"
            groups |= {int(_proc_stat(c)[2]) for c in _children(proc.pid) if _proc_stat(c)}
            time.sleep(0.1)
        groups |= {int(_proc_stat(c)[2]) for c in _children(proc.pid) if _proc_stat(c)}
        groups.discard(os.getpgid(proc.pid))
        assert groups, "no server started by the bench was found"
        assert [p for p in tmp.iterdir() if p.name.startswith("cmg-triton-")]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = {g: _wait_gone(g) for g in groups}
        for g, pids in left.items():
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(g, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "cmg bench: terminated (SIGTERM)", err
    assert all(not pids for pids in left.values()), f"left running: {left}"
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("cmg-triton-")]


def test_port_taken_is_named_in_the_last_line(toy_repo, tmp_path, monkeypatch, capsys):
    """Checked before launching: one line naming the port, exit 2 (no misleading CUDA line),
    and no temporary folder left (there is no log to keep)."""
    import tempfile

    from cmg_app.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["serve", "--repository", str(toy_repo), "--grpc-port", str(port),
                   "--http-port", str(_free()), "--metrics-port", str(_free())])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("cmg serve: error: --grpc-port"), err
    assert f"port {port}" in err[-1] and "already in use" in err[-1]
    assert not list(tmp_path.glob("cmg-triton-*"))


def test_one_port_for_two_services_or_an_ipv6_address_is_refused_before_launching(toy_repo, tmp_path, monkeypatch,
                                                                                   capsys):
    import tempfile

    from cmg_app.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port, other = _free(), _free()
    assert main(["serve", "--repository", str(toy_repo), "--http-port", str(port), "--grpc-port", str(port),
                 "--metrics-port", str(other)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"cmg serve: error: --http-port and --grpc-port are both {port}: each service needs a port of its own"
    assert main(["serve", "--repository", str(toy_repo), "--address", "::1"]) == 2
    assert "--address ::1: IPv6 addresses are not supported" in capsys.readouterr().err
    # tritonserver itself refuses it, but only after its start-up, as "exited with code 1"
    assert main(["serve", "--repository", str(toy_repo), "--load-model", "cmg"]) == 2
    assert "--load-model cmg needs --model-control-mode explicit" in capsys.readouterr().err
    assert not list(tmp_path.glob("cmg-triton-*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_a_slow_start_stops_serve_at_once(toy_repo, tmp_path, signum, code):
    """A model whose initialize takes a minute: Ctrl-C or SIGTERM while it loads stops the
    server within seconds (not at --timeout), exits 130 / 143, and leaves no folder or log."""
    slow = tmp_path / "repo"
    shutil.copytree(toy_repo, slow)
    for model_py in slow.glob("*/1/model.py"):
        text = model_py.read_text()
        model_py.write_text(text.replace("    def initialize(self, args: dict) -> None:\n",
                                         "    def initialize(self, args: dict) -> None:\n        time.sleep(120)\n", 1)
                            .replace("\nimport ", "\nimport time\nimport ", 1))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    ports = [str(_free()) for _ in range(3)]
    cmd = [str(VENV_BIN / "cmg"), "serve", "--repository", str(slow), "--http-port", ports[0],
           "--grpc-port", ports[1], "--metrics-port", ports[2], "--timeout", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp.glob("cmg-triton-*/tritonserver.log")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the stubs are in initialize now
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "not ready after" not in err, err
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("cmg-triton-")]


def test_port_taken_after_the_check_is_named_from_the_server_log(toy_repo, monkeypatch):
    """A port taken between the check and the bind: the server's own bind line is the error,
    not the model lines it logs afterwards."""
    import cmg_build.server as server_mod
    from cmg.errors import CMGError

    monkeypatch.setattr(server_mod, "check_port", lambda *args: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = TritonServer(toy_repo, http_port=port)
        try:
            with pytest.raises(CMGError, match=rf"failed to start HTTP service.*127\.0\.0\.1:{port}.*in use"):
                srv.start(timeout=120)
        finally:
            srv.cleanup()


def test_start_error_names_the_model_line_before_unrelated_errors(tmp_path):
    """A busy machine once logged a gRPC epoll error before the model's own failure: the
    error message must still say which model failed."""
    log = tmp_path / "server.log"
    log.write_text(
        "I1203 18:20:01.000 1 server.cc:1] starting\n"
        "E1203 18:20:02.000 1 ev_epoll1_linux.cc:2] (event_engine) poller encountered epoll_wait error: "
        "Bad file descriptor\n"
        "E1203 18:20:03.000 1 model_lifecycle.cc:3] failed to load 'cmer_scorer' version 1: Internal: "
        "SyntaxError in model.py\n")
    srv = TritonServer(tmp_path, log_file=log)
    srv._log_start = 0  # what start() records: this start's lines begin here
    message = str(srv._start_error("tritonserver failed to start"))
    assert "failed to load 'cmer_scorer'" in message and "model.py" in message and "epoll" not in message


def test_dead_owners_shared_memory_goes_and_a_live_owners_stays(tmp_path):
    """Regions left by a SIGKILLed owner process are removed by the next server made here."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid, started = os.getpid(), server_mod._process_start_time(os.getpid())
    stale = server_mod.SHM_DIR / f"{server_mod.SHM_PREFIX}{dead.pid}-1-0-stale"
    live = server_mod.SHM_DIR / f"{server_mod.SHM_PREFIX}{pid}-{started}-999-live"
    for region in (stale, live):
        region.write_bytes(b"x")
    try:
        TritonServer(tmp_path).cleanup()
        assert not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_python_bytecode_cache_goes_and_other_stray_folders_are_named(toy_repo, tmp_path):
    """The default repository folder is the `cmg_model_repository` package too: importing it
    leaves __pycache__/ there, which Triton takes for a model and fails to start on. That
    cache goes; a folder of the user's is named, not removed."""
    from cmg.errors import CMGError

    repo = tmp_path / "repo"
    shutil.copytree(toy_repo, repo)
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\x00")
    server_mod.check_repository(repo)
    assert not (repo / "__pycache__").exists()
    (repo / "notes").mkdir()
    with pytest.raises(CMGError, match="folders that are not models \\(no config.pbtxt, no version folder\\): notes"):
        server_mod.check_repository(repo)
    assert (repo / "notes").is_dir()
    server_mod.check_repository(repo, "explicit")  # loads only the models named: a stray folder is no matter
    (repo / "notes" / "1").mkdir()  # a model whose config Triton completes itself (ONNX, TensorRT)
    server_mod.check_repository(repo)


def test_a_failed_starts_kept_log_goes_after_a_week(tmp_path, monkeypatch):
    """cleanup(keep_log=True) leaves a folder holding only the log (no owner file, so the
    dead-owner sweep never took it): the sweep removes it once untouched for a week, and
    leaves a recent one, and a folder with anything else in it, alone."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    week = server_mod.KEPT_LOG_DAYS * 86400
    old, recent, other = (tmp_path / f"{server_mod.WORK_PREFIX}{name}" for name in ("old", "recent", "other"))
    for folder in (old, recent, other):
        folder.mkdir()
        (folder / "tritonserver.log").write_text("E failed to load")
    (other / "notes.txt").write_text("someone's")
    for log in (old / "tritonserver.log", other / "tritonserver.log"):
        os.utime(log, (time.time() - week - 60, time.time() - week - 60))
    removed = server_mod.sweep_stale_work_dirs()
    assert old in removed and not old.exists()
    assert recent.exists() and other.exists()


def test_a_dead_owners_work_folder_in_tmp_goes_whatever_tmpdir_is(tmp_path, monkeypatch):
    """Where TMPDIR is no place for the stubs (a space in it) a server's work folder is in
    /tmp, which the sweep did not look at: a killed owner's stayed."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sp ace"))
    folder = Path(tempfile.mkdtemp(prefix=server_mod.WORK_PREFIX, dir="/tmp"))
    (folder / server_mod.OWNER_FILE).write_text("999999999 1\n")  # no such process
    try:
        assert folder in server_mod.sweep_stale_work_dirs() and not folder.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_python_backend_folders_of_killed_servers_go_when_empty_and_a_day_old(tmp_path, monkeypatch):
    """The Python backend's /tmp/python_env_XXXXXX stays after every server that did not shut
    down cleanly (190 of them here); an empty one a day old goes, anything else stays."""
    monkeypatch.setattr(server_mod, "PYTHON_ENV_BASE", tmp_path)
    monkeypatch.setattr(server_mod, "_tritonserver_running", lambda: False)  # another worker's may run
    old, full, recent = (tmp_path / f"python_env_{name}" for name in ("old", "full", "recent"))
    for folder in (old, full, recent):
        folder.mkdir()
    (full / "env").write_text("x")
    for folder in (old, full):
        os.utime(folder, (time.time() - 90000, time.time() - 90000))
    assert server_mod.sweep_orphaned_python_envs() == [old]
    assert not old.exists() and full.exists() and recent.exists()
    os.utime(recent, (time.time() - 90000, time.time() - 90000))
    monkeypatch.setattr(server_mod, "_tritonserver_running", lambda: True)  # a live server's looks the same
    assert server_mod.sweep_orphaned_python_envs() == [] and recent.exists()


def test_orphaned_default_named_regions_go_and_mapped_or_recent_ones_stay(tmp_path):
    """Python-backend regions with Triton's default name (servers SIGKILLed elsewhere, or by
    this project before it named its own) go when no process maps them and they are old."""
    old = time.time() - 7200
    names = {k: server_mod.SHM_DIR / f"{server_mod.TRITON_SHM_DEFAULT}cmgtest-{k}-{os.getpid()}"
             for k in ("orphan", "recent", "mapped")}
    for path in names.values():
        path.write_bytes(b"\0" * 4096)
    os.utime(names["orphan"], (old, old))
    os.utime(names["mapped"], (old, old))
    with open(names["mapped"], "r+b") as f:
        held = mmap.mmap(f.fileno(), 4096)
    try:
        TritonServer(tmp_path).cleanup()
        assert not names["orphan"].exists()
        assert names["recent"].exists() and names["mapped"].exists()
    finally:
        held.close()
        for path in names.values():
            path.unlink(missing_ok=True)


def test_full_shared_memory_is_refused_before_the_server_starts(toy_repo, monkeypatch):
    monkeypatch.setattr(server_mod, "shm_free_bytes", lambda: 1 << 20)  # as a 64 MiB container, filled
    srv = TritonServer(toy_repo)
    with pytest.raises(CMGError, match=r"not enough shared memory.*/dev/shm has \d+ MiB free.*--shm-size"):
        srv.start()
    assert srv.pid is None
    srv.cleanup()


def test_the_admin_key_is_long_and_the_first_one_linked_wins(tmp_path, monkeypatch):
    """Two servers of one repository starting at once: the key linked first is the one both
    use (the second's would lock the first out); a key is 256 bits; a key file that is a link
    is refused."""
    import secrets

    from cmg_build.server import ADMIN_KEY_FILE, admin_key

    (tmp_path / "a").mkdir()
    assert len(admin_key(tmp_path / "a", create=True)) >= 40
    real = secrets.token_urlsafe

    def another_server_first(n: int) -> str:
        (tmp_path / ADMIN_KEY_FILE).write_text("theirs\n")  # made meanwhile by another server
        return real(n)

    monkeypatch.setattr(secrets, "token_urlsafe", another_server_first)
    assert admin_key(tmp_path, create=True) == "theirs"
    assert (tmp_path / ADMIN_KEY_FILE).read_text().strip() == "theirs"
    monkeypatch.undo()
    linked = tmp_path / "linked"
    linked.mkdir()
    (tmp_path / "elsewhere").write_text("planted\n")
    (linked / ADMIN_KEY_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CMGError, match="cannot read"):
        admin_key(linked)


def test_a_repository_at_a_path_with_spaces_and_accents_is_served(toy_repo, tmp_path):
    """Users' folders look like `Linie 3 (neu)/模型`: Triton's Python backend starts its stub
    with the model's path unquoted in `bash -c` and reads it as ASCII (the load had hung, then
    failed); such a repository is served through a link in the server's own folder."""
    from cmg_build.server import stub_safe
    from cmg_clients.client import CMGClient

    repo = shutil.copytree(toy_repo, tmp_path / "Linie 3 (neu) $x ü 模型" / "repo")
    assert not stub_safe(repo) and stub_safe("/tmp/cmg-triton-x/repository")
    with TritonServer(repo) as srv:
        assert str(repo) not in " ".join(srv.command()) and srv.repository == repo.resolve()
        with CMGClient(srv.grpc_url, "grpc") as client:
            got = client.infer_arrays(_frames(2, seed=3))
        np.testing.assert_allclose(got["ANOMALY_SCORE"], reference(CONTRACT, _frames(2, seed=3), THR)["ANOMALY_SCORE"],
                                   atol=1e-5)


def test_a_ctrl_c_while_the_server_stops_still_reaps_its_group_and_goes_on(toy_repo):
    """Ctrl-C (again) while stop() waited for a slow server left it and its stubs running:
    now the group is killed and reaped, and the interrupt goes on (it is not swallowed)."""
    srv = TritonServer(toy_repo).start(timeout=180)
    pgid = srv.pid
    os.kill(pgid, signal.SIGSTOP)  # a server slow to stop: SIGTERM waits while it is stopped
    proc, real_wait = srv._proc, srv._proc.wait

    def ctrl_c_while_waiting(timeout=None):
        """The Ctrl-C, raised where stop() waits (a real SIGINT reaches only the main thread, and
        pytest-xdist runs tests in another)."""
        if timeout == 60:
            time.sleep(1)
            raise KeyboardInterrupt
        return real_wait(timeout=timeout)

    proc.wait = ctrl_c_while_waiting
    try:
        with pytest.raises(KeyboardInterrupt):
            srv.stop(timeout=60)
        assert _wait_gone(pgid, timeout=5) == []
    finally:
        proc.wait = real_wait
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        srv.cleanup()


def test_a_ctrl_c_at_exit_while_servers_stop_is_silent(toy_repo, monkeypatch):
    """The exit hooks (the atexit one, __del__) let only an Exception pass: a Ctrl-C there printed
    "Exception ignored in: TritonServer.__del__ ... KeyboardInterrupt" under "interrupted"."""
    srv = TritonServer(toy_repo)  # not started: its stop is what a Ctrl-C meets

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(srv, "is_running", interrupted)
    monkeypatch.setattr(srv, "cleanup", interrupted)
    # this server alone: the hook stops every live one, and the session's shared server is one
    monkeypatch.setattr(server_mod, "_LIVE", weakref.WeakSet([srv]))
    try:
        server_mod._stop_live_servers()
        srv.__del__()
    except KeyboardInterrupt:  # (left to pytest, it ends the whole session)
        pytest.fail("a Ctrl-C left an exit hook")
    finally:
        monkeypatch.undo()
        srv.cleanup()


def test_a_start_that_aborts_in_grpcs_poller_is_tried_once_more(toy_repo, tmp_path, monkeypatch, capsys):
    """tritonserver 2.51's gRPC once aborted at start on a busy CI machine ("Epoll1Poller
    encountered epoll_wait error: Bad file descriptor", SIGABRT): one more start, said; any
    other abort is the error it was. (A small wrapper plays the abort: it cannot be caused.)"""
    import shlex

    srv = TritonServer(toy_repo)
    real = srv.command()
    tries = tmp_path / "tries"

    def aborting(line: str, times: int) -> str:
        return (f"echo x >> {tries}; if [ $(wc -l < {tries}) -le {times} ]; then echo '{line}'; kill -ABRT $$; fi; "
                f"exec {shlex.join(real)}")

    epoll = "E1207 ev_epoll1_linux.cc:2] (event_engine) Epoll1Poller:0x1 encountered epoll_wait error: Bad file descriptor"
    monkeypatch.setattr(srv, "command", lambda: ["bash", "-c", aborting(epoll, 1)])
    try:
        srv.start(timeout=120)
        assert srv.is_ready() and len(tries.read_text().split()) == 2
        assert "starting it again" in capsys.readouterr().err
    finally:
        srv.cleanup()
    tries.unlink()
    other = TritonServer(toy_repo)
    monkeypatch.setattr(other, "command", lambda: ["bash", "-c", aborting("E1207 something else", 1)])
    try:
        with pytest.raises(CMGError, match="exited with code -6"):
            other.start(timeout=120)
        assert len(tries.read_text().split()) == 1
    finally:
        other.cleanup()


def test_free_ports_lie_below_the_range_outgoing_connections_take():
    """The OS's own pick (bind to 0) is in the ephemeral range: a client's connection could take
    it as its local port before the server bound it ("Socket already in use" in a CI run)."""
    from cmg_build.server import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < _ephemeral_low() for p in ports), ports
    assert len(ports) > 10  # spread, so two workers rarely pick one
