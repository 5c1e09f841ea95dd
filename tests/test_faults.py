"""The fault matrix against the real tritonserver: a `cmg stream` of synth:tiny frames keeps
exactly one non-error line per frame, in order, with the scores of a clean run, through

  SIGTERM / SIGINT to tritonserver, SIGTERM / SIGINT to `cmg serve` (then restarted on the
  same ports), SIGKILL of the server, a model unload + reload, a SIGKILL of the client
  followed by --resume, and a torn last line followed by --resume;

plus --resume --retry-errors, killed while it rewrites the file. Each server fault gets its
own server on free loopback ports, started and stopped here; the client runs as its own
process so it can be killed like a real one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg import contract as C
from cmg_build.server import TritonServer, admin_headers, free_port
from cmg_clients.stream import StreamOptions, run_stream

pytestmark = pytest.mark.slow

N = 240
SOURCE = f"synth:tiny?n={N}&seed=5"
FAULT_AT = 60  # lines written before the fault is injected


def _lines(out: Path) -> list[dict]:
    return [json.loads(s) for s in out.read_text().splitlines() if s.strip()]


def _count(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


@pytest.fixture(scope="module")
def clean(triton, tmp_path_factory) -> dict[str, float]:
    """frame_id -> score of an undisturbed stream of the same frames."""
    out = tmp_path_factory.mktemp("clean") / "clean.jsonl"
    summary = run_stream(StreamOptions(url=triton.grpc_url, source=SOURCE, out=out, progress=False))
    assert summary.results == N and summary.errors == 0 and summary.retries == 0
    return {r["frame_id"]: r["score"] for r in _lines(out)}


def _client(url: str, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cmg_app.cli", "stream", "--url", url, "--source", SOURCE, "--out", str(out),
           "--fps", "50", "--window", "16", "--timeout", "5", "--backoff-max", "1", "--max-retries", "120",
           "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_lines(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while _count(out) < n:
        assert proc.poll() is None, f"client ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"only {_count(out)} lines after {timeout}s"
        time.sleep(0.02)
    return _count(out)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, dict, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    summary = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    return proc.returncode, summary, stderr


def _assert_complete(out: Path, clean: dict[str, float]) -> None:
    lines = _lines(out)
    assert len(lines) == N, f"{len(lines)} lines for {N} frames"
    assert [r["seq"] for r in lines] == list(range(N)), "order or duplicates"
    assert len({r["frame_id"] for r in lines}) == N
    errors = [r for r in lines if "error" in r]
    assert not errors, errors[:3]
    got = np.array([r["score"] for r in lines])
    want = np.array([clean[r["frame_id"]] for r in lines])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


class Served:
    """One server for one fault: tritonserver through TritonServer, or `cmg serve` as a
    process, on fixed free loopback ports so a restart comes back where the client looks."""

    def __init__(self, repo: Path, via_cli: bool, log: Path) -> None:
        self.repo, self.via_cli, self.log = repo, via_cli, log
        self.ports = [free_port() for _ in range(3)]
        self.url = f"127.0.0.1:{self.ports[1]}"
        self.server: TritonServer | None = None
        self.cli: subprocess.Popen | None = None

    def start(self) -> None:
        if not self.via_cli:
            if self.server is None:
                self.server = TritonServer(self.repo, *self.ports, model_control_mode="explicit",
                                           load_models=[C.CMG], log_file=self.log)
            self.server.start(timeout=180)
            return
        cmd = [sys.executable, "-m", "cmg_app.cli", "serve", "--repository", str(self.repo),
               "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
               "--metrics-port", str(self.ports[2]), "--model-control-mode", "explicit",
               "--load-model", C.CMG, "--log-file", str(self.log)]
        self.cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.cli.stdout.readline()
            seen.append(line)
            if not line or line.strip().startswith("metrics"):
                break
        assert "".join(seen).strip().endswith(f"127.0.0.1:{self.ports[2]}"), "".join(seen)

    def signal(self, sig: int) -> None:
        """Send `sig`, wait until the server has gone (graceful: exit status 0)."""
        if self.via_cli:
            assert self.cli is not None
            self.cli.send_signal(sig)
            assert self.cli.wait(timeout=60) == 0
            self.cli.stdout.close()
            return
        assert self.server is not None and self.server._proc is not None
        proc = self.server._proc
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, "tritonserver did not stop gracefully"
        self.server.stop()  # reap the group, close the log

    def kill(self) -> None:
        assert self.server is not None
        self.server.kill()

    def unload_reload(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        headers = admin_headers(self.repo)  # explicit mode: the repository's key opens load/unload
        try:
            client.unload_model(C.CMG, unload_dependents=True, headers=headers)
            deadline = time.monotonic() + 60
            while client.is_model_ready(C.CMG) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            client.load_model(C.CMG, headers=headers)
        finally:
            client.close()

    def stop(self) -> None:
        if self.cli is not None and self.cli.poll() is None:
            self.cli.send_signal(signal.SIGTERM)
            try:
                self.cli.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.cli.kill()
                self.cli.wait()
        if self.cli is not None and self.cli.stdout and not self.cli.stdout.closed:
            self.cli.stdout.close()
        if self.server is not None:
            self.server.cleanup()


SERVER_FAULTS = ["sigterm_tritonserver", "sigint_tritonserver", "sigterm_cmg_serve", "sigint_cmg_serve",
                 "sigkill_server", "unload_reload"]


@pytest.mark.parametrize("fault", SERVER_FAULTS)
def test_stream_through_server_fault(fault, cpu_repo, clean, tmp_path):
    # A linked copy: explicit mode writes the admin key into the repository it serves, and the
    # session's repository is shared with every other test
    repo = shutil.copytree(cpu_repo, tmp_path / "repo", copy_function=os.link)
    served = Served(repo, via_cli=fault.endswith("cmg_serve"), log=tmp_path / "server.log")
    served.start()
    out = tmp_path / "out.jsonl"
    proc = _client(served.url, out)
    try:
        at = _wait_lines(proc, out, FAULT_AT)
        assert at < N, "the stream finished before the fault; the test proves nothing"
        if fault.startswith(("sigterm", "sigint")):
            served.signal(signal.SIGTERM if fault.startswith("sigterm") else signal.SIGINT)
            time.sleep(0.3)  # the client meets a server that is gone, not one restarting
            served.start()
        elif fault == "sigkill_server":
            served.kill()
            time.sleep(0.3)
            served.start()
        else:
            served.unload_reload()
        rc, summary, stderr = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        served.stop()
    assert rc == 0, stderr
    assert summary["retries"] > 0, "the client never saw the fault"
    assert summary["frames"] == N and summary["errors"] == 0 and summary["errors_in_out"] == 0
    _assert_complete(out, clean)


@pytest.mark.parametrize("fault", ["sigkill_client_resume", "torn_last_line"])
def test_stream_client_killed_then_resumed(fault, triton, clean, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _client(triton.grpc_url, out)
    try:
        _wait_lines(proc, out, FAULT_AT)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    head = out.read_bytes()
    if not head.endswith(b"\n"):  # the kill itself tore a line: cut it like the client will
        head = head[: head.rfind(b"\n") + 1]
    kept = head.count(b"\n")
    assert FAULT_AT <= kept < N
    if fault == "torn_last_line":
        with out.open("ab") as fh:
            fh.write(b'{"seq": %d, "frame_id": "0000' % kept)
    rc, summary, stderr = _finish(_client(triton.grpc_url, out, "--resume"))
    assert rc == 0, stderr
    assert summary["skipped"] == kept and summary["frames"] == N - kept
    assert out.read_bytes().startswith(head), "lines written before the kill changed"
    _assert_complete(out, clean)


# -- --resume --retry-errors ------------------------------------------------------------------
def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def test_retry_errors_rescores_error_lines_safely(triton, tmp_path, capsys):
    from cmg_app.cli import main
    from cmg_clients.client import CMGClient

    n, bad = 90, set(range(3, 90, 3))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        path = folder / f"f{i:03d}.png"
        if i in bad:
            path.write_bytes(b"camera hiccup")
        else:
            _png(path, i)
    out = tmp_path / "out.jsonl"
    base = ["stream", "--url", triton.grpc_url, "--source", str(folder), "--out", str(out), "--no-progress"]
    assert main(base) == 1  # error lines: exit 1
    before = out.read_bytes()
    old = _lines(out)
    assert {r["seq"] for r in old if "error" in r} == bad
    for i in bad:  # the camera delivers the frames again
        _png(folder / f"f{i:03d}.png", i)

    # Re-scored to the end on a copy: every error line fixed, none left in the file.
    twin = tmp_path / "twin.jsonl"
    twin.write_bytes(before)
    capsys.readouterr()
    assert main([*base[:-3], "--out", str(twin), "--no-progress", "--resume", "--retry-errors"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["rescored"] == done["fixed"] == len(bad) and done["errors_in_out"] == 0

    # Killed while re-scoring: OUT is the old file or the new one, never a mix or a stub.
    cmd = [sys.executable, "-m", "cmg_app.cli", *base, "--resume", "--retry-errors"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    middle = _lines(out)
    assert [r["seq"] for r in middle] == list(range(n))
    assert out.read_bytes() == before or not any("error" in r for r in middle)

    capsys.readouterr()
    assert main([*base, "--resume", "--retry-errors"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    new = _lines(out)
    assert [r["seq"] for r in new] == list(range(n)) and not any("error" in r for r in new)
    assert summary["errors_in_out"] == 0 and summary["frames"] == 0
    # Lines that were fine are byte-identical; re-scored ones carry the server's scores.
    for a, raw_a, raw_b in zip(old, before.splitlines(), out.read_bytes().splitlines(), strict=True):
        if a["seq"] not in bad:
            assert raw_a == raw_b
    with CMGClient(triton.grpc_url) as client:
        want = client.infer([folder / f"f{i:03d}.png" for i in sorted(bad)])
    np.testing.assert_allclose([new[i]["score"] for i in sorted(bad)], [r.score for r in want], atol=1e-5)
    assert not (tmp_path / "out.jsonl.rewrite.tmp").exists()
