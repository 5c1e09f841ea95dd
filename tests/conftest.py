"""Session fixtures: ONE tiny trained run shared by every test that needs models.

Chain: tiny_data (synth) -> tiny_run (train) -> tiny_onnx (export) -> cpu_repo (build) ->
triton (real tritonserver on free loopback ports). Set CMG_TEST_CACHE=DIR to reuse the
artifacts across pytest sessions while developing; CI builds them fresh.

Under pytest-xdist (`./dev test` runs two workers) the workers share one cache folder and
each artifact is made once, under a file lock: the second worker waits for the first's run
instead of training its own. Each worker starts its own tritonserver.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config) -> None:
    """Ctrl-C reaches the processes the tests start, however the suite was launched. A shell
    that starts a command in the background (`nohup ./dev test &`, a CI runner's `cmd &`)
    gives it SIGINT ignored, and every child inherits that: the test that stops `cmg stream`
    with SIGINT then waited out its 60 s while the stream went on (the stream relies on
    asyncio's own Ctrl-C handling, which Python installs only where SIGINT is not ignored).
    A Python-level handler here is reset to the default in each child at exec."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Tests that use these train a model or talk to a server started for them: marked slow
# here too, so `-m "not slow"` is quick even where a test forgot its marker.
SLOW_FIXTURES = {"tiny_run", "tiny_onnx", "cpu_repo", "triton"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    env = os.environ.get("CMG_TEST_CACHE")
    if env:
        path = Path(env)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "cmg"  # the run's base folder: every worker's
    else:
        return tmp_path_factory.mktemp("cmg")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def made_once(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold CACHE/.NAME.lock while an artifact is checked for and made: one maker per artifact."""
    with FileLock(str(cache_dir / f".{name}.lock")):
        yield


@pytest.fixture(scope="session")
def tiny_data(cache_dir) -> Path:
    from cmg_data.synth import synthesize

    out = cache_dir / "data"
    with made_once(cache_dir, "data"):
        if not (out / "synth.json").exists():
            synthesize(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tiny_data) -> Path:
    from cmg.config import load_config, resolve_config
    from cmg_train.train import train_run

    out = cache_dir / "run"
    with made_once(cache_dir, "run"):
        if (out / "checkpoint.pt").exists():
            return out
        # Trained from the cache folder with a *relative* data path, as a user would type it:
        # the run must still work from any other directory (test_train checks it).
        here = Path.cwd()
        os.chdir(cache_dir)
        try:
            train_run(load_config(resolve_config("tiny")), Path(tiny_data.name), out, progress=False)
        finally:
            os.chdir(here)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run) -> Path:
    from cmg_train.export import export_run

    out = tiny_run / "onnx"
    with made_once(tiny_run.parent, "onnx"):
        if not (out / "export.json").exists():
            export_run(tiny_run)
    return out


@pytest.fixture(scope="session")
def cpu_repo(cache_dir, tiny_run, tiny_onnx) -> Path:
    from cmg_build.repository import build

    out = cache_dir / "repo_cpu"
    with made_once(cache_dir, "repo_cpu"):
        if not (out / "build_report.json").exists():
            build(tiny_run, "cpu", out)
    return out


@pytest.fixture(scope="session")
def triton(cpu_repo, tmp_path_factory):
    """The real tritonserver on free loopback ports, shared by the session. A test that
    kills it restarts it (same ports) before it ends."""
    from cmg_build.server import TritonServer

    server = TritonServer(cpu_repo, log_file=tmp_path_factory.mktemp("triton") / "server.log")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(autouse=True)
def _triton_alive(request):
    """The shared server up again before each test that uses it: a test that failed between
    killing it and starting it again had failed every later test on its worker as well
    ("unreachable"), hiding its own cause among them."""
    server = request.getfixturevalue("triton") if "triton" in request.fixturenames else None
    if server is not None and not server.is_running():
        server.start()
    yield
    if server is not None and not server.is_running():  # after too: a module's fixtures come before
        server.start()
