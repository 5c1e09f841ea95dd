"""`cmg serve`: start the real `tritonserver` on a model repository.

The binary is the one on PATH (official Triton image) or the one shipped in the
`nvidia-pytriton` wheel. The wheel's Python backend needs an assembled backend
directory (library + utils + the stub built for this Python) and an environment in
which the stub's embedded interpreter finds this venv: the stub takes its Python from
the first `python3` on PATH, so the venv's bin goes first (PYTHONPATH alone was not
enough). Imports no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from cmg.errors import CMGError

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
LOOPBACK = "127.0.0.1"


def _pytriton_root() -> Path | None:
    """site-packages/pytriton/tritonserver of the installed nvidia-pytriton wheel, if any."""
    site = Path(sysconfig.get_paths()["purelib"])
    root = site / "pytriton" / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _stub_env(env: dict[str, str]) -> dict[str, str]:
    """Put this interpreter's bin dir first on PATH: the Python stub embeds the first python3 there."""
    bin_dir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *parts])
    if sys.prefix != sys.base_prefix:  # a venv: say so, as an activated venv would
        env["VIRTUAL_ENV"] = sys.prefix
    env.pop("PYTHONHOME", None)
    return env


def find_tritonserver() -> tuple[Path, dict[str, str]]:
    """The tritonserver binary and the environment to run it in.

    PATH wins (official image, whose backends live in /opt/tritonserver/backends);
    else the nvidia-pytriton binary with its bundled shared libraries.
    """
    env = _stub_env(dict(os.environ))
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), env
    root = _pytriton_root()
    if root is None:
        raise CMGError(
            "tritonserver not found: not on PATH and the nvidia-pytriton wheel is not installed "
            "(pip install 'nvidia-pytriton>=0.7,<0.8')"
        )
    libs = root.parent.parent / "nvidia_pytriton.libs"
    ld = [str(libs)] if libs.is_dir() else []
    ld += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    return root / "bin" / "tritonserver", env


def python_backend_dir(work_dir: Path) -> Path | None:
    """Assemble WORK/backends/python from the pytriton wheel (library, utils, stub for this Python).

    Returns the --backend-directory to pass, or None when tritonserver comes from PATH
    (the official image has its own backends directory).
    """
    if shutil.which("tritonserver"):
        return None
    root = _pytriton_root()
    if root is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise CMGError(f"nvidia-pytriton has no Python-backend stub for Python {version} (has: {', '.join(have)})")
    target = work_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    src = root / "backends" / "python"
    for path in (src / "libtriton_python.so", src / "triton_python_backend_utils.py", stub):
        dest = target / path.name
        if not dest.exists():
            dest.symlink_to(path)
    return target.parent


def free_port() -> int:
    """A free TCP port on the loopback interface (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def gpu_present() -> bool:
    """True when an NVIDIA device node exists (no CUDA import needed)."""
    return Path("/dev/nvidia0").exists()


def cuda_memory_pool_bytes(repository: Path, in_flight: int = 8) -> int | None:
    """Bytes for Triton's CUDA memory pool: ensemble intermediate tensors x in-flight requests.

    Intermediates of `cmg`: the frame passed to both steps, PATCH_SCORES, and the
    encoder's outputs, each for a full batch (max_batch from build_report.json). The
    pool must hold them so they never fall back to pinned host memory. Doubled for
    headroom, at least 64 MiB. None when the repository has no build report.
    """
    from cmg.contract import NUMPY_DTYPES, Contract

    report = repository / "build_report.json"
    if not report.is_file():
        return None
    data = json.loads(report.read_text())
    contract = Contract.from_dict(data["contract"])
    max_batch = int(data.get("max_batch", 32))
    per_item = 0
    for name in ("cmer_scorer", "cmle_encoder"):
        spec = contract.models[name]
        for t in spec.inputs + spec.outputs:
            n = 1
            for d in t.dims:
                n *= d
            per_item += n * NUMPY_DTYPES[t.dtype].itemsize
    return max(64 << 20, 2 * per_item * max_batch * in_flight)


class TritonServer:
    """A tritonserver child process on loopback ports; waits for readiness, stops cleanly."""

    def __init__(
        self,
        repository: Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        model_control_mode: str = "none",
        log_file: Path | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        load_models: tuple[str, ...] | list[str] = (),
        address: str = LOOPBACK,
        cuda_pool_bytes: int | None = None,
        verbose: int = 0,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise CMGError(f"model repository {self.repository} does not exist")
        if model_control_mode not in ("none", "explicit", "poll"):
            raise CMGError(f"model control mode {model_control_mode!r}: expected none, explicit or poll")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.model_control_mode = model_control_mode
        self.extra_args = list(extra_args)
        self.load_models = list(load_models)
        self.address = address
        self.cuda_pool_bytes = cuda_pool_bytes
        self.verbose = verbose
        self._work = Path(tempfile.mkdtemp(prefix="cmg-triton-"))
        self.log_file = Path(log_file) if log_file else self._work / "tritonserver.log"
        self._proc: subprocess.Popen | None = None
        self._log_handle = None
        self._log_start = 0

    # -- endpoints -------------------------------------------------------------------
    def _host(self) -> str:
        return LOOPBACK if self.address in ("0.0.0.0", "") else self.address

    @property
    def grpc_url(self) -> str:
        return f"{self._host()}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._host()}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self._host()}:{self.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        binary, _ = find_tritonserver()
        cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.verbose}",
        ]
        backends = python_backend_dir(self._work)
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        cmd += [f"--load-model={m}" for m in self.load_models]
        if self.cuda_pool_bytes and gpu_present():
            cmd.append(f"--cuda-memory-pool-byte-size=0:{self.cuda_pool_bytes}")
        return cmd + self.extra_args

    # -- lifecycle -------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def is_ready(self) -> bool:
        """Server ready over HTTP (all models in `none` mode loaded)."""
        import tritonclient.http as httpclient

        try:
            client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0)
            try:
                return bool(client.is_server_ready())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any connection error just means "not yet"
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # Log lines after which a starting server never becomes ready (a Python stub that
    # fails to preinitialize leaves tritonserver waiting instead of exiting).
    FATAL_MARKERS = ("Failed to preinitialize Python stub", "failed to load all models")

    def _fatal_log_line(self) -> str | None:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if any(m in line for m in self.FATAL_MARKERS):
                return line.strip()
        return None

    def start(self, timeout: float = 120) -> TritonServer:
        """Launch and wait until ready; CMGError with the log tail when it dies or times out."""
        if self.is_running():
            return self
        cmd = self.command()
        _, env = find_tritonserver()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_start = self._log_handle.tell()  # scan only this start's lines for fatal errors
        # Own session: signals to the caller's terminal do not reach the server twice,
        # and kill() can end the server together with its Python stubs.
        self._proc = subprocess.Popen(
            cmd, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env,
            cwd=self._work, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._close_log()
                raise CMGError(
                    f"tritonserver exited with code {rc} while starting on {self.repository} "
                    f"(log {self.log_file}):\n{self.log_tail()}"
                )
            if self.is_ready():
                return self
            fatal = self._fatal_log_line()
            if fatal:
                tail = self.log_tail()
                self.stop(timeout=10)
                raise CMGError(f"tritonserver failed to start on {self.repository}: {fatal} "
                               f"(log {self.log_file}):\n{tail}")
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise CMGError(f"tritonserver not ready after {timeout:.0f}s (log {self.log_file}):\n{tail}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, wait, then SIGKILL the process group if it hangs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._killpg(proc)
        if proc is not None:
            self._reap_group(proc)
        self._close_log()

    def kill(self) -> None:
        """Hard kill (server and stubs): tests use it to simulate the server going away."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._killpg(proc)
        if proc is not None:
            self._reap_group(proc)
        self._close_log()

    @staticmethod
    def _killpg(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    @staticmethod
    def _reap_group(proc: subprocess.Popen) -> None:
        """Stubs orphaned by a dead server exit on their own; make sure none outlives us."""
        for _ in range(40):
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def cleanup(self) -> None:
        """Stop and remove the work dir (assembled backends; the log unless placed elsewhere)."""
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:  # a forgotten server must not outlive the test session
        try:
            if self.is_running():
                self.kill()
        except Exception:  # noqa: BLE001
            pass


# -- CLI -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True, help="Triton model repository (cmg build --out)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--address", default=LOOPBACK, help="bind address (default loopback only)")
    parser.add_argument("--model-control-mode", choices=("none", "explicit", "poll"), default="none")
    parser.add_argument("--load-model", action="append", default=[], metavar="M",
                        help="model to load at start in explicit mode (repeatable)")
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness")
    parser.add_argument("--in-flight", type=int, default=8,
                        help="in-flight requests the CUDA memory pool is sized for (GPU hosts)")


def run(args: argparse.Namespace) -> int:
    pool = cuda_memory_pool_bytes(args.repository, args.in_flight) if gpu_present() else None
    server = TritonServer(
        args.repository, args.http_port, args.grpc_port, args.metrics_port,
        model_control_mode=args.model_control_mode, log_file=args.log_file,
        load_models=args.load_model, address=args.address, cuda_pool_bytes=pool,
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.start(timeout=args.timeout)
        print(f"tritonserver ready on {server.repository} (log {server.log_file})", flush=True)
        print(f"  grpc    {server.grpc_url}\n  http    {server.http_url}\n  metrics {server.metrics_url}", flush=True)
        while not stop.is_set():
            if not server.is_running():
                raise CMGError(f"tritonserver exited unexpectedly:\n{server.log_tail()}")
            stop.wait(0.5)
        print("stopping tritonserver", flush=True)
    finally:
        server.stop()
        if args.log_file is None:
            shutil.rmtree(server._work, ignore_errors=True)
    return 0
