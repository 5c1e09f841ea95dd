"""Several cameras over several real tritonservers, and a model update under a running stream.

3 sources x 2 servers with one server SIGKILLed mid-stream (and started again on its
ports): every frame of every source once, in order, no error line, and the restarted
server takes frames again after its probe. A `cmg deploy` mid-stream: no error line,
versions 1 then 2 in the lines, version 1 unloaded at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cmg import contract as C
from cmg.errors import CMGError
from cmg.locks import OutputLock
from cmg_build.server import TritonServer, free_port
from cmg_clients.planning import plan_sources, source_name
from cmg_clients.servers import ServerPool
from cmg_clients.sources import Source, SourceItem, open_source
from cmg_clients.stream import StreamOptions, run_streams


def _lines(out: Path) -> list[dict]:
    return [json.loads(s) for s in out.read_text().splitlines() if s.strip()]


def _count(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


# -- no server needed -------------------------------------------------------------------
def test_source_names_and_plan(tmp_path):
    assert source_name("cam1=synth:tiny?n=3") == ("cam1", "synth:tiny?n=3")
    assert source_name("synth:tiny?n=3&seed=4") == ("synth_tiny_seed4", "synth:tiny?n=3&seed=4")
    assert source_name("/data/line2/") == ("line2", "/data/line2/")
    assert source_name("/videos/cam.mp4") == ("cam", "/videos/cam.mp4")
    plan = plan_sources(["a=synth:tiny", "b=synth:tiny"], tmp_path / "o")
    assert [(n, p.name) for n, _, p in plan] == [("a", "a.jsonl"), ("b", "b.jsonl")]
    with pytest.raises(CMGError, match="would both write"):
        plan_sources(["synth:tiny", "synth:tiny?fps=3"], tmp_path / "o")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CMGError, match="is a file"):
        plan_sources(["a=synth:tiny", "b=synth:tiny"], tmp_path / "f")


def test_pool_picks_least_in_flight_and_avoids_down_servers():
    import asyncio

    async def check() -> None:
        pool = ServerPool(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], C.CMG, 1.0)
        try:
            a, b, c = pool.servers
            a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
            assert pool.pick() is b
            b.up = False
            assert pool.pick() is c and pool.pick(avoid=c) is a
            a.up = c.up = False
            assert pool.pick() is b  # none up: the least busy, its failure counts as a retry
        finally:
            await pool.close()

    asyncio.run(check())
    with pytest.raises(CMGError, match="given twice"):
        ServerPool(["127.0.0.1:5", "grpc://127.0.0.1:5"], C.CMG, 1.0)


def test_a_down_servers_old_channels_are_closed_not_kept():
    """A down --url is probed every 0.5 s for ever, each failed probe on a fresh channel; every
    replaced channel was kept to the stream's end (2 a second, ~5 GB a day). Closed once the
    calls on it are past their deadline: the count stays bounded however long it is down."""
    import asyncio

    async def probe_for(seconds: float) -> tuple[list[int], int]:
        pool = ServerPool([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], C.CMG, 0.2, probe_s=0.01)
        try:
            for server in pool.servers:  # down at the start: probed, as the handshake leaves them
                server.up = False
            pool.start_probes()
            await asyncio.sleep(seconds)
            return [len(server.channel._old) for server in pool.servers], pool.reconnects
        finally:
            await pool.close()

    kept, reconnects = asyncio.run(probe_for(5.0))
    assert reconnects >= 20, reconnects  # a reset every min_interval_s (0.25 s) a server
    # what a deadline (0.2 s) and the grace after it span, at one reset per 0.25 s, and one more
    assert max(kept) <= 6, (kept, reconnects)


def test_a_stream_decodes_a_few_frames_at_a_time(tmp_path):
    """Frames were decoded as many at once as the window and the thread pool allowed (up to
    32, across sources): a 9000 x 9000 float TIFF costs ~1.9 GB a decode, 7 GB for four."""
    import asyncio

    from cmg.frames import FrameError
    from cmg_clients.scorer import Progress, Scorer, StreamSummary
    from cmg_clients.servers import DECODES

    running, most, lock = 0, 0, threading.Lock()

    def load(size: tuple[int, int]):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        raise FrameError("unreadable")  # an error line: no server needed

    async def stream(n: int) -> list[dict]:
        pool = ServerPool([f"127.0.0.1:{free_port()}"], C.CMG, 1.0)
        lines: list[dict] = []
        runs = []
        try:
            for name in ("a", "b"):  # two sources share the pool's decodes
                opts = StreamOptions(url=pool.servers[0].url, source=name, out=tmp_path / f"{name}.jsonl",
                                     window=16)
                scorer = Scorer(opts, pool, (8, 8), StreamSummary(out=str(opts.out)))
                jobs = [(i, SourceItem(f"{name}{i}", name, load)) for i in range(n)]
                runs.append(scorer.run(jobs, lines.append, None, Progress(n, 0, False)))
            await asyncio.gather(*runs)
        finally:
            await pool.close()
        return lines

    lines = asyncio.run(stream(12))
    assert len(lines) == 24 and all(line["error"] == "unreadable" for line in lines)
    assert most <= DECODES <= 8, most


# -- real servers -----------------------------------------------------------------------
def _unloadable_run(run: Path, dst: Path) -> Path:
    """A copy of `run` whose scorer graph holds an operator no runtime has (a custom domain):
    the ONNX checker and `cmg build` accept it (the cpu target does not run the graph, and the
    fused `cmg` carries the node along), the server's load fails."""
    import hashlib

    import onnx
    from onnx import helper

    shutil.copytree(run / "onnx", dst / "onnx")
    (dst / "metrics.json").write_text((run / "metrics.json").read_text())
    meta = json.loads((dst / "onnx" / "export.json").read_text())
    path = dst / "onnx" / meta["models"][C.CMER_SCORER]["file"]
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("NoSuchOp", [C.IMAGE], ["cmg_test_unused"], domain="cmg.test"))
    model.opset_import.append(helper.make_opsetid("cmg.test", 1))
    onnx.save(model, str(path))
    meta["models"][C.CMER_SCORER]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / "onnx" / "export.json").write_text(json.dumps(meta))
    return dst


def _server(repo: Path, log: Path, ports: list[int] | None = None, **kw) -> TritonServer:
    ports = ports or [free_port() for _ in range(3)]
    return TritonServer(repo, *ports, log_file=log, **kw)


class _Gated(Source):
    """Frames of `inner`; from frame `gate` on, a frame is read only once `event` is set, so
    the last frames are sent after the deploy however long it takes (frames before keep
    flowing during it). The wait is in the frame's load, which runs in a worker thread."""

    def __init__(self, inner: Source, gate: int, event: threading.Event) -> None:
        self.inner, self.gate, self.event, self.count = inner, gate, event, inner.count

    def items(self, start: int = 0):
        for seq, item in enumerate(self.inner.items(start), start):
            if seq < self.gate:
                yield item
                continue

            def load(size, item=item):
                assert self.event.wait(300), "deploy never finished"
                return item.load(size)

            yield SourceItem(item.frame_id, item.source, load, item.extra)


def _stream_in_thread(urls: list[str], options: list[StreamOptions]) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def go() -> None:
        try:
            result["summaries"], result["servers"] = run_streams(urls, options)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, result


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("key", ["intra_op_threads", "intra_op_thread_count"])
def test_deploy_keeps_the_served_repository_settings(key):
    """The ONNX Runtime threads (the cpu target's and the ORT backend's) and the GPU warmup are
    the repository's (its machine's cores, `--cpu-threads`), not the run's: a deploy from a
    machine with other cores, or into a repository an older version built without them, must
    not refuse on them."""
    from cmg import model_config as mcfg
    from cmg_build.config import add_warmup
    from cmg_build.deploy import _with_served_settings

    assert key in mcfg.THREAD_PARAMETERS

    def config(threads: str | None, warm: bool = False) -> str:
        cfg = mcfg.mc.ModelConfig(name="cmer_scorer", backend="python", max_batch_size=8)
        cfg.input.add(name="IMAGE", data_type=mcfg.mc.TYPE_UINT8, dims=[8, 8, 3])
        if threads is not None:
            cfg.parameters[key].string_value = threads
        if warm:
            add_warmup(cfg, 8)
        return mcfg.text(cfg)

    kept = mcfg.parse(_with_served_settings(config("3"), config("1")))
    assert kept.parameters[key].string_value == "3"
    assert _with_served_settings(config("3"), config("1")) == config("3")
    assert _with_served_settings(config(None), config("1", warm=True)) == config(None)  # built before both
    assert _with_served_settings(config("2", warm=True), config("1")) == config("2", warm=True)


def test_a_repository_build_no_longer_makes_takes_no_new_version(tmp_path):
    from cmg_build.deploy import refuse_unbuildable

    with pytest.raises(CMGError, match="int8 onnxruntime repository on GPU instances"):
        refuse_unbuildable(tmp_path, "onnxruntime", "gpu", "int8")
    for target, kind, precision in (("onnxruntime", "cpu", "int8"), ("tensorrt", "gpu", "int8"),
                                    ("onnxruntime", "gpu", "fp32")):
        refuse_unbuildable(tmp_path, target, kind, precision)


def test_deploy_refusal_names_the_first_config_difference():
    from cmg_build.deploy import first_difference

    served = 'name: "cmg"\ninput {\n  dims: [64, 64, 3]\n}\nmax_batch_size: 8\n'
    wanted = 'name: "cmg"\ninput {\n  dims: [128, 128, 3]\n}\nmax_batch_size: 8\n'
    assert first_difference(served, wanted) == "served 'dims: [64, 64, 3]', this run 'dims: [128, 128, 3]'"
    assert first_difference(served, served + "x: 1\n") == "served '(nothing)', this run 'x: 1'"


@pytest.mark.slow
def test_three_sources_two_servers_one_killed(cpu_repo, tmp_path):
    n = 90
    a = _server(cpu_repo, tmp_path / "a.log").start()
    b = _server(cpu_repo, tmp_path / "b.log").start()
    try:
        plan = plan_sources([f"cam{i}=synth:tiny?n={n}&seed={i}" for i in range(3)], tmp_path / "out")
        options = [StreamOptions(url=a.grpc_url, source=src, out=out, fps=6, window=4, timeout_s=5,
                                 backoff_max_s=1, max_retries=60, progress=False) for _, src, out in plan]
        thread, result = _stream_in_thread([a.grpc_url, b.grpc_url], options)
        outs = [out for _, _, out in plan]
        _wait(lambda: sum(_count(o) for o in outs) >= 15 or "error" in result, 120, "stream did not start")
        b.kill()  # SIGKILL to the server's process group
        killed_at = [_count(o) for o in outs]
        b.start(timeout=180)  # same ports: the pool's probe finds it again
        back_at = [_count(o) for o in outs]
        thread.join(timeout=300)
        assert not thread.is_alive() and "error" not in result, result
    finally:
        a.cleanup()
        b.cleanup()
    for out, k, r in zip(outs, killed_at, back_at, strict=True):
        lines = _lines(out)
        assert [x["seq"] for x in lines] == list(range(n)), f"{out.name}: order or duplicates"
        assert len({x["frame_id"] for x in lines}) == n
        assert not [x for x in lines if "error" in x], out.name
        assert {x["model_version"] for x in lines} == {"1"}
        assert k < n and r < n, "the stream ended before the fault"
    servers = result["servers"]
    assert servers[b.grpc_url]["failures"] >= 1, servers
    after_return = [x["server"] for o, r in zip(outs, back_at, strict=True) for x in _lines(o)[r + 2:]]
    assert b.grpc_url in after_return, "the restarted server never got frames again"
    assert sum(s.retries for s in result["summaries"]) > 0, "no frame was ever re-sent"


@pytest.mark.slow
def test_deploy_mid_stream(tiny_run, cpu_repo, tmp_path, monkeypatch, capsys):
    from cmg_build.deploy import deploy

    repo = tmp_path / "repo"
    shutil.copytree(cpu_repo, repo)
    server = _server(repo, tmp_path / "s.log", model_control_mode="explicit", load_models=[C.CMG]).start()
    try:
        n = 100
        out = tmp_path / "s.jsonl"
        deployed = threading.Event()
        source = _Gated(open_source(f"synth:tiny?n={n}&seed=9"), gate=80, event=deployed)
        opts = StreamOptions(url=server.grpc_url, source="gated", out=out, fps=10, window=4, timeout_s=5,
                             backoff_max_s=1, max_retries=60, progress=False, frames=source)
        thread, result = _stream_in_thread([server.grpc_url], [opts])
        _wait(lambda: _count(out) >= 10 or "error" in result, 120, "stream did not start")
        try:
            done = deploy(tiny_run, repo, server.grpc_url)
        finally:
            deployed.set()
        assert _count(out) < n - 10, "the stream ended before the deploy"
        assert (done["old_version"], done["new_version"]) == (1, 2)
        thread.join(timeout=300)
        assert not thread.is_alive() and "error" not in result, result
        lines = _lines(out)
        assert [x["seq"] for x in lines] == list(range(n)) and not [x for x in lines if "error" in x]
        versions = [x["model_version"] for x in lines]
        assert versions[0] == "1" and versions[-1] == "2", versions
        assert versions == sorted(versions), "a frame went back to version 1 after version 2"

        def old_gone() -> bool:
            index = server.model_states()
            return not [m for m in index if m.get("version") == "1" and m.get("state") not in ("UNAVAILABLE", None)]

        def ready() -> set[tuple[str, str]]:
            return {(m["name"], m.get("version")) for m in server.model_states() if m.get("state") == "READY"}

        _wait(old_gone, 60, "version 1 still loaded")
        # The fused graphs were loaded at version 2 to be checked, then unloaded: the server
        # runs what it ran before, one model (one stub process), now at version 2.
        _wait(lambda: ready() == {(C.CMG, "2")}, 60, "the fused graphs still loaded after the deploy")

        # A run the server cannot load: the old version keeps serving, the repository is as before.
        configs = {p: p.read_text() for p in repo.glob("*/config.pbtxt")}
        with pytest.raises(CMGError, match="failed, version 2 still serves: .*cmer_scorer") as info:
            deploy(_unloadable_run(tiny_run, tmp_path / "bad_run"), repo, server.grpc_url)
        assert "NoSuchOp" in str(info.value), info.value
        assert not list(repo.glob("*/3")) and configs == {p: p.read_text() for p in repo.glob("*/config.pbtxt")}
        _wait(lambda: ready() == {(C.CMG, "2")}, 60, "the fused graphs still loaded after the rollback")
        check = tmp_path / "after.jsonl"
        run_streams([server.grpc_url], [StreamOptions(url=server.grpc_url, source="synth:tiny?n=3", out=check,
                                                      progress=False)])
        assert [x.get("model_version") for x in _lines(check)] == ["2", "2", "2"]

        # Ctrl-C mid-deploy (here at the check of version 4: the server remembers the refused 3,
        # and a version number is never taken twice): undone before the interrupt goes on.
        from cmg_build import deploy as deploy_mod

        def interrupted(*_args, **_kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as mp:
            mp.setattr(deploy_mod, "_infer", interrupted)
            with pytest.raises(KeyboardInterrupt):
                deploy(tiny_run, repo, server.grpc_url)
        assert not list(repo.glob("*/4")) and configs == {p: p.read_text() for p in repo.glob("*/config.pbtxt")}
        assert not (repo / deploy_mod.RECOVERY).exists()
        _wait(lambda: ready() == {(C.CMG, "2")}, 60, "version 2 does not serve alone after the interrupt")
        # One deploy per repository at a time: a second is refused, naming the first.
        with OutputLock(repo, folder=True), pytest.raises(
                CMGError, match=f"being written by another `cmg deploy` or `cmg build` \\(pid {os.getpid()}"):
            deploy(tiny_run, repo, server.grpc_url)
        # A deploy SIGKILLed at its check (no undo runs: its staged configs, version 5, the fused
        # graphs it loaded and its record stay): the next deploy undoes it first, on disk and
        # on the server, instead of refusing every run from then on.
        killer = ("import os, signal, sys\nfrom pathlib import Path\nimport cmg_build.deploy as d\n"
                  "d._infer = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
                  "d.deploy(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])\n")
        killed = subprocess.run([sys.executable, "-c", killer, str(tiny_run), str(repo), server.grpc_url],
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert list(repo.glob("*/5")) and (repo / deploy_mod.RECOVERY).is_file()
        assert {C.CMER_SCORER, C.CMLE_ENCODER} <= {name for name, _ in ready()}, ready()
        done = deploy(tiny_run, repo, server.grpc_url)
        assert "an interrupted deploy of version 5 was undone first" in capsys.readouterr().err
        assert (done["old_version"], done["new_version"]) == (2, 6) and not (repo / deploy_mod.RECOVERY).exists()
        report = json.loads((repo / "build_report.json").read_text())  # what the engine runner and bench read
        assert report["version"] == 6 and report["run"] == str(tiny_run) and "cmg/6/model.onnx" in report["files"]
        assert [d["version"] for d in report["deployed"]] == [2, 6]
        _wait(lambda: ready() == {(C.CMG, "6")}, 60, "version 6 does not serve alone after the deploy")

        # A record cut off (a full disk) is named, not taken for a lost server.
        (repo / deploy_mod.RECOVERY).write_text('{"run": "x", "orig')
        with pytest.raises(CMGError, match="the record of an interrupted deploy cannot be read"):
            deploy(tiny_run, repo, server.grpc_url)
        (repo / deploy_mod.RECOVERY).unlink()

        # An int8 repository's next version is built int8 too, calibrated on --data when given.
        asked = {}

        def spy(*args, **kwargs):
            asked.update(kwargs)
            raise CMGError("stopped by the test")

        with monkeypatch.context() as mp:
            report["precision"] = {"precision": "int8"}
            mp.setattr(deploy_mod, "build", spy)
            (repo / "build_report.json").write_text(json.dumps(report))
            with pytest.raises(CMGError, match="stopped by the test"):
                deploy(tiny_run, repo, server.grpc_url, data=tmp_path / "moved")
        assert asked["precision"] == "int8" and asked["data"] == tmp_path / "moved"
    finally:
        server.cleanup()


@pytest.mark.slow
def test_deploys_keep_the_new_version_and_the_one_it_replaced(tiny_run, cpu_repo, tmp_path, capsys, monkeypatch):
    """Each deploy had left its full model set on disk for good (4 deploys: 21 MB -> 101 MB,
    versions 1 to 5 of every model, one of them served): now older versions go, and the
    next number is still above every one taken."""
    from cmg_build.deploy import deploy

    repo = tmp_path / "repo"
    shutil.copytree(cpu_repo, repo)
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))

    def on_disk() -> dict[str, set[str]]:
        return {name: {p.name for p in (repo / name).iterdir() if p.name.isdigit()} for name in models}

    server = _server(repo, tmp_path / "s.log", model_control_mode="explicit", load_models=[C.CMG]).start()
    try:
        for new in (2, 3, 4):
            done = deploy(tiny_run, repo, server.grpc_url)
            assert (done["old_version"], done["new_version"]) == (new - 1, new)
            assert on_disk() == {name: {str(new - 1), str(new)} for name in models}, on_disk()
        assert f"removed version folder(s) {models[0]}/2" in capsys.readouterr().err
        report = json.loads((repo / "build_report.json").read_text())
        assert not [f for f in report["files"] if f.split("/")[1:2] == ["2"]], "the report lists removed files"
        from cmg_build import deploy as deploy_mod
        from cmg_build.repository import DEPLOY_RECORD

        def refused(*_args, **_kwargs):
            raise PermissionError(13, "Permission denied", str(repo / models[0] / "3"))

        monkeypatch.setattr(deploy_mod, "drop_other_versions", refused)  # a failure after the switch: the
        assert deploy(tiny_run, repo, server.grpc_url)["new_version"] == 5  # deploy is done all the same
        assert not (repo / DEPLOY_RECORD).exists() and "removing older version folders failed" in capsys.readouterr().err
        assert json.loads((repo / "build_report.json").read_text())["deployed"][-1]["version"] == 5
    finally:
        server.cleanup()


@pytest.mark.slow
def test_deploy_keeps_every_loaded_ensemble_at_one_version(tiny_run, cpu_repo, tmp_path, monkeypatch):
    """With cmg_exact loaded beside cmg, loading a step made Triton reload cmg_exact with the
    config it had last loaded ("latest"), not the pinned one on disk: for seconds it answered as
    the new version with the old teacher and the new encoder. And a deploy undone after its
    switch left the server's record of that version ("unloaded"), which refused every later
    deploy that took the same number."""
    from cmg import model_config as mcfg
    from cmg_build import deploy as deploy_mod

    repo = tmp_path / "repo"
    shutil.copytree(cpu_repo, repo)
    server = _server(repo, tmp_path / "s.log", model_control_mode="explicit",
                     load_models=[C.CMG, C.CMG_EXACT]).start()
    seen: list[str] = []
    pinned_to = {"1"}

    def allowed(name: str) -> set[str]:
        cfg = mcfg.read(repo / name / "config.pbtxt")
        if cfg.version_policy.HasField("specific"):
            return {str(v) for v in cfg.version_policy.specific.versions}
        return {max((p.name for p in (repo / name).iterdir() if p.name.isdigit()), key=int)}

    real_client = deploy_mod._client

    def watched(url, repo_):
        client = real_client(url, repo_)
        load = client.load_model

        def load_and_look(name, *a, **k):
            load(name, *a, **k)
            for ensemble in C.ENSEMBLES:  # an ensemble pinned to a version runs its steps at that version
                cfg = mcfg.read(repo / ensemble / "config.pbtxt")
                pins = list(cfg.version_policy.specific.versions)
                steps = {s.model_version for s in cfg.ensemble_scheduling.step}
                if pins and steps and steps != set(pins):  # (the fused cpu `cmg` has no steps)
                    seen.append(f"loading {name}: {ensemble} pinned to {pins} with its steps at {sorted(steps)}")
            pinned_to.update(allowed(C.CMG_EXACT))  # every version its config has allowed so far
            for m in client.get_model_repository_index().models:  # the ensemble as Triton holds it now
                if m.name == C.CMG_EXACT and m.state == "READY" and m.version not in pinned_to:
                    seen.append(f"after loading {name}: {m.name} {m.version} READY, its config never allowed it")

        client.load_model = load_and_look
        return client

    try:
        monkeypatch.setattr(deploy_mod, "_client", watched)
        def files() -> list[str]:  # (the Python backend compiles model.py where it runs)
            return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if "__pycache__" not in p.parts)

        before = files()
        copytree = shutil.copytree

        def interrupted(src, dst, *a, **k):  # Ctrl-C while the new version's files are copied in
            if Path(dst).is_relative_to(repo):
                raise KeyboardInterrupt
            return copytree(src, dst, *a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(deploy_mod.shutil, "copytree", interrupted)
            with pytest.raises(KeyboardInterrupt):  # undone first, then let go on
                deploy_mod.deploy(tiny_run, repo, server.grpc_url)
        assert files() == before and not seen, seen
        assert deploy_mod.deploy(tiny_run, repo, server.grpc_url)["new_version"] == 2
        assert not seen, seen
        real_infer = deploy_mod._infer

        def the_switch_fails(client, name, version, cfg, frame):
            if name in C.ENSEMBLES:
                raise RuntimeError("planted: the new version answers wrong")
            return real_infer(client, name, version, cfg, frame)

        with monkeypatch.context() as mp:
            mp.setattr(deploy_mod, "_infer", the_switch_fails)
            with pytest.raises(CMGError, match="as version 3 failed, version 2 still serves"):
                deploy_mod.deploy(tiny_run, repo, server.grpc_url)
        assert not list(repo.glob("*/3")) and not seen, seen
        done = deploy_mod.deploy(tiny_run, repo, server.grpc_url)  # the server remembers 3 as unloaded
        assert (done["old_version"], done["new_version"]) == (2, 4) and not seen, seen
        ready = {(m["name"], m.get("version")) for m in server.model_states() if m.get("state") == "READY"}
        assert {(C.CMG, "4"), (C.CMG_EXACT, "4")} <= ready and (C.CMG_EXACT, "2") not in ready, ready
    finally:
        server.stop()
        server.cleanup()


@pytest.mark.slow
def test_bench_one_vs_two_servers(tiny_run, tiny_onnx, tmp_path):
    from cmg_bench.servers import compare_servers

    res = compare_servers(tiny_run, tmp_path / "b", sources=2, per_source=12, repeats=1)
    assert [t["servers"] for t in res["tries"]] == [1, 2]
    assert all(t["frames"] == 24 for t in res["tries"])
    assert len(res["tries"][1]["per_server"]) == 2 and all(res["tries"][1]["per_server"].values())
    assert res["ratio_two_over_one"] > 0
    assert res["ratios"] == pytest.approx([res["tries"][1]["fps"] / res["tries"][0]["fps"]])  # two / one
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"servers.json", "servers.md", "servers.png"}


@pytest.mark.parametrize("record", [
    {"new": "../../victim", "originals": {"cmg": "x"}},        # a version that is a path
    {"new": 2, "originals": {"../victim": "x"}},               # a model that is not the repository's
    {"new": 2, "originals": {"cmg": "x", "../victim": "x"}},   # ... beside one that is
    {"new": 0, "originals": {"cmg": "x"}},                     # no version 0 is ever deployed
    {"new": 2, "originals": {"cmg": ["not", "a", "config"]}},
    ["not", "a", "record"],
    {"new": 2, "originals": {"cmg": "x"}, "report": {"not": "text"}},  # checked before any file is touched
    {"new": 2, "originals": {"cmg": "x"}, "live": "cmg"},
])
def test_a_deploy_record_that_names_anything_but_the_repositorys_versions_undoes_nothing(tmp_path, record):
    """REPO/.cmg-deploy.json is joined into paths that are removed and written: a crafted one
    had deleted folders outside the repository."""
    from cmg_build import deploy as deploy_mod

    repo, victim = tmp_path / "a" / "repo", tmp_path / "a" / "victim"  # what "../" from the repository reaches
    (repo / "cmg" / "1").mkdir(parents=True)
    (repo / "cmg" / "config.pbtxt").write_text('name: "cmg"\n')
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (repo / deploy_mod.RECOVERY).write_text(json.dumps(record))
    with pytest.raises(CMGError, match="not a record this program writes"):
        deploy_mod.undo_interrupted(repo)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert (repo / "cmg" / "config.pbtxt").read_text() == 'name: "cmg"\n'


@pytest.mark.slow
def test_calibrated_threshold_follows_the_version_that_answers(tmp_path):
    """GPU targets send the ensemble's calibrated THRESHOLD (engines have no input defaults).
    When the ensemble moves to a version with another one (what `cmg deploy` does), a running
    stream and an open client flag each frame at the threshold of the version that answered
    it, not at the one read when they connected; and again when a deploy undone brings the
    older version back (its threshold known, no config to read)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from PIL import Image
    from toy_graphs import engine_shaped_repo, reference

    from cmg import model_config as mcfg
    from cmg.contract import Contract
    from cmg_clients.client import CMGClient

    contract, old_thr, new_thr = Contract(32, 32, 4, 8), 0.0, 2.0  # every toy score flagged / none
    repo = engine_shaped_repo(tmp_path, contract, old_thr)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(3)
    n = 45
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(frames_dir / f"f{i:03d}.png")
    server = _server(repo, tmp_path / "s.log", model_control_mode="explicit", load_models=[C.CMG]).start()
    try:
        client = CMGClient(server.grpc_url, "grpc")
        assert client.default_threshold == old_thr
        out = tmp_path / "s.jsonl"
        switched, undone = threading.Event(), threading.Event()
        source = _Gated(_Gated(open_source(str(frames_dir)), gate=35, event=undone), gate=20, event=switched)
        opts = StreamOptions(url=server.grpc_url, source="gated", out=out, fps=20, window=4, timeout_s=5,
                             progress=False, frames=source)
        thread, result = _stream_in_thread([server.grpc_url], [opts])
        original = (repo / C.CMG / "config.pbtxt").read_text()
        admin = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            _wait(lambda: _count(out) >= 10 or "error" in result, 120, "stream did not start")
            cfg = mcfg.read(repo / C.CMG / "config.pbtxt")  # the switch: version 2, its own threshold
            mcfg.set_default_threshold(cfg, new_thr)
            mcfg.write(cfg, repo / C.CMG)
            (repo / C.CMG / "2").mkdir()
            admin.load_model(C.CMG, headers=server.admin_headers())
            switched.set()
            _wait(lambda: _count(out) >= 25 or "error" in result, 120, "stream did not go on")
            got = client.infer_arrays(images[:4])  # connected at version 1, answered by version 2
            assert client.default_threshold == new_thr
            want = reference(contract, images[:4], new_thr)
            assert np.array_equal(got[C.IS_ANOMALY], want[C.IS_ANOMALY]) and not want[C.IS_ANOMALY].any()
            cfg = mcfg.parse(original)  # undone: version 1 again, pinned, with its threshold
            cfg.version_policy.specific.versions[:] = [1]
            mcfg.write(cfg, repo / C.CMG)
            admin.load_model(C.CMG, headers=server.admin_headers())
        finally:
            switched.set()
            undone.set()
            admin.close()
        thread.join(timeout=120)
        assert not thread.is_alive() and "error" not in result, result
        got = client.infer_arrays(images[:4])
        assert client.default_threshold == old_thr
        assert np.array_equal(got[C.IS_ANOMALY], reference(contract, images[:4], old_thr)[C.IS_ANOMALY])
        assert np.array_equal(client.infer_arrays(images[:4], new_thr)[C.IS_ANOMALY],
                              reference(contract, images[:4], new_thr)[C.IS_ANOMALY])  # a given one is kept
        client.close()
    finally:
        server.cleanup()
    lines = _lines(out)
    assert [x["seq"] for x in lines] == list(range(n)) and not [x for x in lines if "error" in x]
    by_version = {"1": old_thr, "2": new_thr}
    versions = [x["model_version"] for x in lines]
    assert "2" in versions and versions[-1] == "1", versions  # switched, then undone
    for x in lines:
        thr = by_version[x["model_version"]]
        assert x["threshold"] == thr, x
        assert x["is_anomaly"] == (x["score"] > thr), x
