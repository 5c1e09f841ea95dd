"""Client library and `cmg infer` against the real tritonserver (fixtures `triton`, `cpu_repo`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg import contract as C
from cmg.errors import CMGError
from cmg_app.cli import main
from cmg_build.server import free_port
from cmg_clients.client import CMGClient, InferError, normalize_url


def _frames(client: CMGClient, n: int, seed: int = 0) -> np.ndarray:
    h, w = client.size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _assert_same(a, b, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.score == pytest.approx(rb.score, abs=atol)
        assert ra.is_anomaly == rb.is_anomaly
        np.testing.assert_allclose(ra.anomaly_map, rb.anomaly_map, atol=atol)
        np.testing.assert_allclose(ra.patch_scores, rb.patch_scores, atol=atol)
        np.testing.assert_array_equal(ra.keep_mask, rb.keep_mask)


# -- no server needed -------------------------------------------------------------------
def test_client_modules_import_no_torch():
    code = (
        "import sys, cmg_clients.client, cmg_clients.infer, cmg_clients.stream, cmg_clients.overlay\n"
        "bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_deadline_reads_the_same_over_grpc_and_http():
    from cmg_clients import core

    for status in ("StatusCode.DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"):  # gRPC's, then the HTTP client's
        assert InferError("no answer", status, core.DEADLINE).server_gone


def test_overlay_files_are_one_per_image(tmp_path):
    """Same-named images of two lines (or `f.png` and `f.jpg`) had shared one overlay file."""
    from cmg_clients.infer import overlay_paths

    images = [tmp_path / "line1/test/hole/000.png", tmp_path / "line2/test/hole/000.png",
              tmp_path / "a/f.png", tmp_path / "a/f.jpg", tmp_path / "test/good/001.png"]
    got = overlay_paths(tmp_path / "ov", images)
    assert len(set(got.values())) == len(images)
    assert got[images[0]].name == "line1__test__hole__000.png"
    assert got[images[4]].name == "test__good__001.png"  # the last three parts where those are unique
    assert got[images[2]].name.endswith("f_png.png") and got[images[3]].name.endswith("f_jpg.png")
    deep = [tmp_path / ("Linie 3 " * 12) / ("Kamera ü " * 10) / f"{'bild ' * 14}{i}.png" for i in range(2)]
    names = [p.name for p in overlay_paths(tmp_path / "ov", deep).values()]  # within a name's 255 bytes, apart
    assert all(len(n.encode()) <= 255 and n.endswith(".png") for n in names) and len(set(names)) == 2


def test_normalize_url():
    assert normalize_url("grpc://127.0.0.1:9001/") == "127.0.0.1:9001"
    assert normalize_url("localhost", "http") == "localhost:8000"
    assert normalize_url("localhost") == "localhost:8001"
    assert normalize_url("http://localhost:8000/", "http") == "localhost:8000"
    with pytest.raises(CMGError):
        normalize_url("")
    with pytest.raises(CMGError, match=r"is a http URL but the client speaks grpc \(--http speaks HTTP\)"):
        normalize_url("http://10.0.0.5:8000")  # had failed later as "unreachable ... Socket closed"
    with pytest.raises(CMGError, match="is a https URL"):
        normalize_url("https://10.0.0.5:8000", "http")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_names_url(protocol):
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(CMGError, match=url.replace(".", r"\.")) as info:
        CMGClient(url, protocol, timeout_s=3)
    assert "unreachable" in str(info.value)


def test_infer_cli_unreachable_exits_2(capsys, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    rc = main(["infer", "--url", f"127.0.0.1:{free_port()}", "--timeout", "3", str(img)])
    assert rc == 2
    assert "unreachable" in capsys.readouterr().err


# -- real server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpc_client(triton):
    with CMGClient(triton.grpc_url) as client:
        yield client


def test_client_learns_contract_from_server(grpc_client, cpu_repo):
    """G from KEEP_MASK, M from ANOMALY_MAP: the tiny run serves a [16, 16] map on an 8 x 8 grid."""
    c = grpc_client.contract
    served = C.Contract.from_dict(json.loads((cpu_repo / "build_report.json").read_text())["contract"])
    assert (c.height, c.width, c.grid, c.map_size) == (served.height, served.width, served.grid, served.map_size)
    assert c.map_size != c.grid
    assert grpc_client.max_batch >= 1
    res = grpc_client.infer(_frames(grpc_client, 1))[0]
    assert res.anomaly_map.shape == (c.map_size, c.map_size) and res.anomaly_map.dtype == np.float32
    assert res.keep_mask.shape == (c.grid, c.grid) and res.keep_mask.dtype == np.uint8
    assert res.patch_scores.shape == (c.grid, c.grid)
    assert np.isfinite(res.score)
    # The anomaly map is zero wherever the keep-mask discarded the patch.
    r = c.map_size // c.grid
    keep = res.keep_mask.repeat(r, axis=0).repeat(r, axis=1)
    assert np.all(res.anomaly_map[keep == 0] == 0)


def test_model_not_ready_is_named(triton):
    with pytest.raises(CMGError, match="no_such_model"):
        CMGClient(triton.grpc_url, model="no_such_model")


def test_http_and_grpc_agree(triton, grpc_client):
    frames = _frames(grpc_client, 5, seed=1)
    with CMGClient(triton.http_url, "http") as http:
        _assert_same(grpc_client.infer(frames), http.infer(frames))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_agrees_and_cleans_up(triton, grpc_client, protocol):
    n = grpc_client.max_batch + 3  # two requests: a full batch reuses the region, then a short one
    frames = _frames(grpc_client, n, seed=2)
    plain = grpc_client.infer(frames, threshold=0.0)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    client = CMGClient(url, protocol, shm=True)
    names = [name for name, *_ in client._shm_regions]
    assert len(names) == 2 and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    try:
        _assert_same(plain, client.infer(frames, threshold=0.0))
    finally:
        client.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    status = grpc_client._client.get_system_shared_memory_status(as_json=True)
    assert not set(names) & set(status.get("regions", {})), "regions still registered with the server"


def _registered(grpc_client) -> set[str]:
    return set(grpc_client._client.get_system_shared_memory_status(as_json=True).get("regions", {}))


@pytest.mark.parametrize("protocol,shm", [("grpc", False), ("grpc", True), ("http", False), ("http", True)])
def test_one_client_shared_by_threads(triton, grpc_client, protocol, shm):
    """Each thread gets its own frame's answer: shm requests take turns on the one pair of
    regions (they returned another thread's scores before), HTTP gets a connection per
    thread (gevent refused another thread's, and hung when four shared one)."""
    import threading

    frames = _frames(grpc_client, 4, seed=11)
    want = [r.score for r in grpc_client.infer(frames)]
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    got: dict[int, list] = {}
    with CMGClient(url, protocol, shm=shm) as client:
        def work(t: int) -> None:
            try:
                got[t] = [client.infer(frames[t])[0].score for _ in range(6)]
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                got[t] = [repr(exc)]

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a thread hung"
    for t in range(4):
        assert got[t] == pytest.approx([want[t]] * 6, abs=1e-5), (t, got[t])


def test_an_http_client_used_by_a_thread_per_request_keeps_its_descriptors_and_threads(triton, grpc_client):
    """A connection per calling thread left each ended thread's gevent hub behind (an epoll
    and an eventfd, a resolver thread), after close() too: a thread per request ran out of
    file descriptors. The client's own threads make its HTTP calls, and close() ends them."""
    import gc
    import threading

    def fds_and_threads() -> tuple[int, int]:
        gc.collect()
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    frame = _frames(grpc_client, 1, seed=15)
    before = fds_and_threads()
    with CMGClient(triton.http_url, "http") as client:
        client.infer_arrays(frame)
        for _ in range(60):
            worker = threading.Thread(target=client.infer_arrays, args=(frame,))
            worker.start()
            worker.join(60)
        fds, threads = fds_and_threads()
        assert fds <= before[0] + 6 and threads <= before[1] + 3, (before, (fds, threads))
    deadline = time.monotonic() + 5  # a joined thread leaves /proc/self/task a moment later
    after = fds_and_threads()
    while (after[0] > before[0] or after[1] > before[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = fds_and_threads()
    assert after[0] <= before[0] and after[1] <= before[1], ("close() left threads or descriptors", before, after)


def test_a_forked_child_gets_its_own_http_threads_even_mid_call():
    """A fork while an HTTP call held the client's lock (a pre-forking server, multiprocessing)
    left the lock held in the child: its first HTTP call hung for ever."""
    from cmg_clients.client import _HTTPThreads

    pool = _HTTPThreads(lambda: None)
    with pool._lock:  # a call starting its thread, in another thread of the parent
        pid = os.fork()
        if pid == 0:
            os._exit(0 if pool._lock.acquire(timeout=2) and not pool._threads else 1)
    assert os.waitpid(pid, 0)[1] == 0


def test_a_child_forked_without_pythons_hooks_gets_its_own_http_threads():
    """uWSGI forks its workers in C, without Python's fork hooks: a client made in the master
    had a thread the worker does not have, and the worker's first HTTP call waited for ever."""
    import ctypes

    from cmg_clients.client import _HTTPThreads

    class Echo:
        def echo(self, value):
            return value

        def close(self):
            pass

    pool = _HTTPThreads(Echo)
    assert pool.echo(1) == 1  # the parent's thread
    pid = ctypes.CDLL(None).fork()
    if pid == 0:
        done = threading.Event()
        threading.Thread(target=lambda: (pool.echo(2), done.set()), daemon=True).start()
        os._exit(0 if done.wait(5) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    pool.close(5)


def test_a_shm_region_is_judged_only_once_its_maker_could_lock_it(tmp_path, monkeypatch):
    """A region file a starting client has made but not yet locked looked abandoned to another
    client's sweep, which removed it under its maker."""
    from cmg_clients import client as client_mod

    region = tmp_path / "cmg_1_x_held_in"
    region.write_bytes(b"")
    with client_mod._abandoned(region) as dead:
        assert not dead  # just made
    now = time.time()
    monkeypatch.setattr(client_mod.time, "time", lambda: now + client_mod.SHM_MAKING_S + 1)
    with client_mod._abandoned(region) as dead:
        assert dead  # unlocked, and old enough to have been locked


@pytest.mark.slow
def test_shm_client_outlives_a_server_restart_and_dead_clients_regions_go(cpu_repo, tmp_path):
    """A restarted server forgets registrations: the client registers its regions again.
    A client process that ends without close() unregisters at exit; one that dies leaves
    registrations whose /dev/shm files are gone, and the next shm client drops them."""
    from cmg_build.server import TritonServer

    server = TritonServer(cpu_repo, log_file=tmp_path / "server.log").start()
    script = ("import os, sys\nfrom cmg_clients.client import CMGClient\n"
              "c = CMGClient(sys.argv[1], shm=True)\n"
              "print(' '.join(n for n, *_ in c._shm_regions), flush=True)\n"
              "if sys.argv[2] == 'die':\n    os._exit(0)\n")

    def client_process(how: str) -> set[str]:
        done = subprocess.run([sys.executable, "-c", script, server.grpc_url, how],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return set(done.stdout.split())

    try:
        with CMGClient(server.grpc_url) as plain, CMGClient(server.grpc_url, shm=True) as client:
            frames = _frames(plain, 3, seed=12)
            want = plain.infer(frames)
            _assert_same(want, client.infer(frames))
            server.kill()
            server.start()
            _assert_same(want, client.infer(frames))  # the regions registered again

            exited = client_process("exit")
            assert exited and not exited & _registered(plain), "unregistered at interpreter exit"
            died = client_process("die")
            deadline = time.monotonic() + 30  # the resource tracker unlinks the dead one's files
            while any(os.path.exists(f"/dev/shm/{n}") for n in died) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert died <= _registered(plain)
            with CMGClient(server.grpc_url, shm=True) as fresh:
                mine = {n for n, *_ in fresh._shm_regions}
                assert _registered(plain) >= mine and not died & _registered(plain)
            assert {n for n, *_ in client._shm_regions} <= _registered(plain), "a live client's regions stay"
    finally:
        server.cleanup()


def test_a_shm_client_killed_with_its_process_group_leaves_no_region(triton, grpc_client, monkeypatch):
    """kill -9 of a client's process group also kills multiprocessing's resource tracker, which
    would have unlinked its /dev/shm files: they stayed, registered and mapped by the server,
    and the next shm client (which dropped only regions whose file was gone) kept them. Now
    the next one removes a dead owner's regions and leaves a live one's (another process's)."""
    import signal

    from cmg_clients import client as client_mod

    monkeypatch.setattr(client_mod, "SHM_MAKING_S", 0.0)  # judged by their lock alone, however young
    script = ("import sys, time\nimport numpy as np\nfrom cmg_clients.client import CMGClient\n"
              "c = CMGClient(sys.argv[1], shm=True)\nc.infer(np.zeros((1, *c.size, 3), np.uint8))\n"
              "print(' '.join(n for n, *_ in c._shm_regions), flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script, triton.grpc_url], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        names = set(owner.stdout.readline().split())
        assert len(names) == 2 and names <= _registered(grpc_client)
        with CMGClient(triton.grpc_url, shm=True):  # its owner lives: its regions stay
            assert names <= _registered(grpc_client) and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the client and its resource tracker
        owner.wait(30)
    assert names <= _registered(grpc_client) and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    with CMGClient(triton.grpc_url, shm=True) as fresh:
        _assert_same(grpc_client.infer(_frames(grpc_client, 2)), fresh.infer(_frames(grpc_client, 2)))
        assert not names & _registered(grpc_client), "a dead owner's regions still registered"
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names), "a dead owner's files still there"


def test_a_forked_child_leaves_the_parents_shm_regions_and_close_waits_for_a_request(triton, grpc_client):
    """A pre-forking server's worker inherited the exit hook and the client: its exit (or its
    close()) unregistered and deleted the regions its parent still used. And close() from
    another thread tore the regions down under a request in flight (a TypeError)."""
    import threading

    from cmg_clients import client as client_mod

    frames = _frames(grpc_client, 2, seed=13)
    want = grpc_client.infer(frames)
    with CMGClient(triton.grpc_url, shm=True) as client:
        names = [n for n, *_ in client._shm_regions]
        pid = os.fork()
        if pid == 0:  # the child: what its exit would run, and an explicit close()
            client_mod._close_live_shm_clients()
            client.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names) and set(names) <= _registered(grpc_client)
        _assert_same(want, client.infer(frames))

        real = client._infer_shm
        started = threading.Event()

        def slow(*a, **k):
            started.set()
            time.sleep(0.5)
            return real(*a, **k)

        client._infer_shm = slow
        got: dict = {}
        worker = threading.Thread(target=lambda: got.setdefault("r", client.infer(frames)))
        worker.start()
        started.wait(10)
        client.close()  # waits for the request on the regions
        worker.join(30)
    _assert_same(want, got["r"])
    assert not set(names) & _registered(grpc_client)


def test_an_unclosed_http_client_is_collected_and_its_regions_go(triton, grpc_client):
    """The thread's connection finalizer held a bound method: an HTTP client dropped without
    close() lived (with its /dev/shm regions) as long as the thread that used it, here the
    main thread, so for ever; gRPC clients were collected."""
    import gc
    import weakref

    frame = _frames(grpc_client, 1, seed=14)
    for shm, fail in ((False, False), (True, False), (True, True)):
        client = CMGClient(triton.http_url, "http", shm=shm)
        client.infer(frame)
        if fail:  # an idle HTTP thread kept its last call's error, whose traceback held the client
            with pytest.raises(InferError):
                client._call("a missing model's metadata", client._client.get_model_metadata, "no_such_model")
        names = [n for n, *_ in client._shm_regions]
        gone = weakref.ref(client)
        del client
        gc.collect()
        assert gone() is None, f"an unclosed HTTP client (shm={shm}) outlived its last reference"
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
        assert not set(names) & _registered(grpc_client)


def test_close_and_the_exit_hook_return_when_the_server_does_not_answer(triton, grpc_client):
    """Unregistering had no deadline over gRPC: close() of an shm client, and the exit hook of
    a script that ended without it, hung for ever on a server that does not answer (SIGSTOP).
    Now one timeout_s, a warning, and the local regions are destroyed all the same."""
    import signal
    import threading
    import warnings

    script = ("import sys\nfrom cmg_clients.client import CMGClient\n"
              "c = CMGClient(sys.argv[1], shm=True, timeout_s=2)\n"
              "print(' '.join(n for n, *_ in c._shm_regions), flush=True)\nsys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", script, triton.grpc_url], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    client = CMGClient(triton.grpc_url, shm=True, timeout_s=2)
    names = [n for n, *_ in client._shm_regions] + child.stdout.readline().split()
    assert len(names) == 4, names
    caught: list = []

    def close() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            client.close()
        caught.extend(str(w.message) for w in seen)

    os.kill(triton.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        closing = threading.Thread(target=close, daemon=True)
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "close() hung on a server that does not answer"
        assert time.monotonic() - t0 < 8
        assert any("could not unregister" in m for m in caught), caught
        t0 = time.monotonic()
        child.stdin.close()  # the script ends without close(): the exit hook closes
        child.wait(30)
        assert time.monotonic() - t0 < 10
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names), "the local regions are destroyed"
    finally:
        os.kill(triton.pid, signal.SIGCONT)
        if child.poll() is None:
            child.kill()
            child.wait()
        for name in set(names) & _registered(grpc_client):  # what the stopped server kept
            grpc_client._client.unregister_system_shared_memory(name)


def test_a_grpc_client_answers_again_within_seconds_of_its_servers_return(triton, grpc_client):
    """gRPC's reconnect backoff (growing to 2 minutes, shared by the process's channels with
    the same options) kept a client answering "Connection refused" for ~20 s after its
    server was back. While the port takes connections and drops them (a server not there
    yet: each try is seen, so the gaps do not depend on when the server returns), the
    client's channel tries again at least once a second (1, 1.6, 2.6, 4.1 s ... before);
    then the real server is back on the same ports and the same client answers at once."""
    import socket
    import threading

    frame = _frames(grpc_client, 1, seed=15)
    with CMGClient(triton.grpc_url, timeout_s=5) as client:
        want = client.infer(frame)
        triton.kill()
        tries: list[float] = []
        try:
            with socket.socket() as port:
                port.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                port.bind((triton.address, triton.grpc_port))
                port.listen(16)

                def drop() -> None:
                    with contextlib.suppress(OSError):  # the listening socket closed: done
                        while True:
                            conn, _ = port.accept()
                            tries.append(time.monotonic())
                            conn.close()

                threading.Thread(target=drop, daemon=True).start()
                until = time.monotonic() + 8
                while time.monotonic() < until:
                    with pytest.raises(InferError):
                        client.infer(frame)
                    time.sleep(0.2)
                port.shutdown(socket.SHUT_RDWR)
        finally:
            triton.start()  # same ports
        gaps = np.diff(tries)
        assert len(tries) >= 4 and gaps.max() < 2.0, f"connection tries {len(tries)}, gaps {gaps.round(2)} s"
        back = time.monotonic()
        while True:
            try:
                got = client.infer(frame)
                break
            except InferError:
                if time.monotonic() - back > 60:
                    raise
                time.sleep(0.1)
        assert time.monotonic() - back < 3, f"answered {time.monotonic() - back:.1f} s after the server was back"
    _assert_same(want, got)


def test_the_guides_python_example_runs(triton, tiny_data, tmp_path):
    """docs/guide.md's `CMGClient` example, as printed there, against the real server (only
    its URL and folder replaced)."""
    guide = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()
    section = guide.split("## Scoring from your own Python code", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:8001" in code and "line3/test" in code
    code = code.replace("127.0.0.1:8001", triton.grpc_url).replace("line3/test", str(tiny_data / "test"))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("frame (") and len([x for x in lines if "'score':" in x]) == 3, done.stdout
    assert lines[-1] == "InferError: transient True", done.stdout
    assert Image.open(tmp_path / "overlay.png").size[0] >= 64


def test_an_empty_batch_of_any_size_or_dtype_scores_nothing(grpc_client):
    assert grpc_client.infer(np.zeros((0, 100, 90, 3), np.uint8)) == []
    assert grpc_client.infer(np.zeros((0, 8, 8, 3), np.float32)) == []


def test_a_float_batch_is_one_scale_for_the_client(grpc_client):
    """CMGClient.frames read each frame of a float array on its own 0..1 / 0..255 scale."""
    h, w = grpc_client.size
    batch = np.zeros((2, h, w, 3), np.float32)
    batch[0] = 200.0
    batch[1, :4, :4] = 1.0  # nearly black
    frames = grpc_client.frames(batch)
    assert frames[0].max() == 200 and frames[1].max() == 1


def test_an_unreadable_image_is_a_cmg_error(grpc_client, tmp_path):
    """The guide's `except CMGError` covers bad input: a missing or unreadable image raised
    FrameError, a ValueError only, past it."""
    with pytest.raises(CMGError, match="missing.png"):
        grpc_client.infer(tmp_path / "missing.png")
    with pytest.raises(CMGError, match="not an image format"):
        grpc_client.infer(b"not an image")


def test_batching_matches_single_requests(grpc_client):
    frames = _frames(grpc_client, 6, seed=3)
    batched = grpc_client.infer(frames, batch_size=4)
    single = [grpc_client.infer(f[None])[0] for f in frames]
    _assert_same(batched, single)


def test_threshold_overrides_calibration(grpc_client):
    frames = _frames(grpc_client, 4, seed=4)
    low = grpc_client.infer(frames, threshold=-1e9)
    high = grpc_client.infer(frames, threshold=1e9)
    assert all(r.is_anomaly for r in low) and not any(r.is_anomaly for r in high)
    assert [r.score for r in low] == pytest.approx([r.score for r in high], abs=1e-6)


def test_images_go_through_the_contract_frame(grpc_client, tmp_path):
    """A file of another size is resized by cmg.frames exactly as an in-memory image is."""
    from cmg.frames import to_frame

    h, w = grpc_client.size
    big = np.random.default_rng(5).integers(0, 256, (h * 2 + 3, w + 5, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    from_file = grpc_client.infer([path])
    from_frame = grpc_client.infer(to_frame(big, (h, w))[None])
    _assert_same(from_file, from_frame, atol=0)


@pytest.mark.parametrize(
    ("dtype", "shape_fn", "needle"),
    [
        ("FP32", lambda h, w: [1, h, w, 3], "data-type"),
        ("UINT8", lambda h, w: [1, h + 1, w, 3], "shape"),
        ("UINT8", lambda h, w: [1, h, w], "shape"),
    ],
)
def test_malformed_requests_get_invalid_arg_naming_tensor(triton, grpc_client, dtype, shape_fn, needle):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    h, w = grpc_client.size
    shape = shape_fn(h, w)
    data = np.zeros(shape, dtype=triton_to_np_dtype(dtype))
    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        inp = grpcclient.InferInput(C.IMAGE, shape, dtype)
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as info:
            raw.infer(C.CMG, [inp])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'IMAGE'" in info.value.message() and needle in info.value.message()
    finally:
        raw.close()
    hraw = httpclient.InferenceServerClient(triton.http_url)
    try:
        inp = httpclient.InferInput(C.IMAGE, shape, dtype)
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as info:
            hraw.infer(C.CMG, [inp])
        assert info.value.status() == "400" and "'IMAGE'" in info.value.message()
    finally:
        hraw.close()
    # ...and the server is still serving.
    assert np.isfinite(grpc_client.infer(_frames(grpc_client, 1))[0].score)


def test_client_reports_triton_message_with_tensor(grpc_client):
    h, w = grpc_client.size
    bad = np.zeros((1, h + 1, w, 3), np.uint8)
    with pytest.raises(InferError, match="IMAGE") as info:
        grpc_client.infer_arrays(bad)
    assert info.value.status == "StatusCode.INVALID_ARGUMENT"


def _success_count(metrics_url: str, model: str) -> float:
    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_count_requests(triton, grpc_client):
    before = _success_count(triton.metrics_url, C.CMG)
    for _ in range(3):
        grpc_client.infer(_frames(grpc_client, 1))
    deadline = time.monotonic() + 10
    while _success_count(triton.metrics_url, C.CMG) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _success_count(triton.metrics_url, C.CMG) == before + 3


def test_cmg_infer_cli(triton, grpc_client, tmp_path, capsys):
    h, w = grpc_client.size
    rng = np.random.default_rng(6)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (h + 7, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    overlays = tmp_path / "overlays"
    rc = main([
        "infer", "--url", triton.grpc_url, "--batch", "2", "--threshold=-1e9",
        "--overlays", str(overlays), str(folder), str(tmp_path / "missing.png"),
    ])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 1  # two bad inputs, the rest answered
    assert [Path(r["file"]).name for r in lines] == ["broken.png", "img0.png", "img1.png", "img2.png", "missing.png"]
    errors = {Path(r["file"]).name: r["error"] for r in lines if "error" in r}
    assert set(errors) == {"broken.png", "missing.png"}
    assert "broken.png" in errors["broken.png"] and "missing.png" in errors["missing.png"]
    good = [r for r in lines if "error" not in r]
    expected = grpc_client.infer([folder / f"img{i}.png" for i in range(3)], threshold=-1e9)
    for rec, res in zip(good, expected, strict=True):
        assert rec["score"] == pytest.approx(res.score, abs=1e-5)
        assert rec["is_anomaly"] is True and rec["latency_ms"] > 0
        with Image.open(rec["overlay"]) as im:
            assert im.format == "PNG" and im.size[0] >= w

    # A missed defect's map is what one looks at: every image's overlay on request, none by default.
    rc = main(["infer", "--url", triton.grpc_url, "--threshold=1e9", "--overlays", str(tmp_path / "all"),
               "--overlays-for", "all", str(folder / "img0.png")])
    (rec,) = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 0 and rec["is_anomaly"] is False and Path(rec["overlay"]).is_file()
    rc = main(["infer", "--url", triton.grpc_url, "--threshold=1e9", "--overlays", str(tmp_path / "flagged"),
               str(folder / "img0.png")])
    (rec,) = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 0 and "overlay" not in rec

    # HTTP + shared memory gives the same scores.
    rc = main(["infer", "--http", "--url", triton.http_url, "--shm", str(folder / "img0.png")])
    (rec,) = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 0 and rec["score"] == pytest.approx(good[0]["score"], abs=1e-5)

    # Images after an option are images too, and a quoted pattern is expanded as stream's is.
    rc = main(["infer", str(folder / "img0.png"), "--url", triton.grpc_url, str(folder / "img[12].png")])
    names = [Path(json.loads(s)["file"]).name for s in capsys.readouterr().out.splitlines()]
    assert rc == 0 and names == ["img0.png", "img1.png", "img2.png"]
    assert main(["infer", "--url", triton.grpc_url, str(folder / "*.jpg")]) == 2
    assert f"glob {folder / '*.jpg'} matches no files" in capsys.readouterr().err


def test_an_overlay_not_written_is_said_in_its_line_and_the_score_stands(tmp_path):
    """`cmg infer` and `cmg stream` name the picture in the frame's line, or why it is missing."""
    from cmg_clients.core import Result
    from cmg_clients.overlay import overlay_into

    res = Result(score=1.5, is_anomaly=True, anomaly_map=np.ones((4, 4), np.float32),
                 patch_scores=np.ones((2, 2), np.float32), keep_mask=np.ones((2, 2), np.uint8))
    frame = np.zeros((8, 8, 3), np.uint8)
    line = {"score": 1.5}
    assert overlay_into(line, frame, res, tmp_path / "ov" / "a.png") and line["overlay"] == str(tmp_path / "ov" / "a.png")
    (tmp_path / "afile").write_text("")
    line = {"score": 1.5}
    assert not overlay_into(line, frame, res, tmp_path / "afile" / "b.png")  # a folder that is a file
    assert line["score"] == 1.5 and "overlay" not in line and line["overlay_error"].startswith(
        ("FileExistsError", "NotADirectoryError"))
