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
import atexit
import contextlib
import errno
import functools
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from cmg.argtypes import port_int, positive_float, positive_int
from cmg.contract import CMG, NUMPY_DTYPES, Contract
from cmg.endpoints import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    LOOPBACK,
    is_loopback,
)
from cmg.errors import CMGError
from cmg.locks import reading


def _pytriton_root() -> Path | None:
    """pytriton/tritonserver of the importable nvidia-pytriton wheel, if any (wherever it is
    installed: this venv, --user, a .pth path)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return root
    return None


def _stub_env(env: dict[str, str]) -> dict[str, str]:
    """Put this interpreter's bin dir first on PATH: the Python stub embeds the first python3 there."""
    bin_dir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *parts])
    if sys.prefix != sys.base_prefix:  # a venv: say so, as an activated venv would
        env["VIRTUAL_ENV"] = sys.prefix
    env.pop("PYTHONHOME", None)
    return env


def python_lib_dirs() -> list[str]:
    """Where this Python's libpython is, when it is a shared build: the Python-backend stubs
    link it, and a pyenv or conda Python keeps it off the system's library path (every stub
    then died, and the server waited for them until the start-up timeout)."""
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and Path(libdir).is_dir()):
        return []
    system = ("/lib", "/usr/lib", "/lib64", "/usr/lib64")  # the loader's own: naming one would only reorder it
    return [] if libdir.rstrip("/").startswith(system) else [libdir]


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
    ld += [p for p in python_lib_dirs() if p not in ld]  # after the user's own: theirs win
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


# -- no orphaned servers ------------------------------------------------------------------
# A tritonserver must not outlive the command that started it, however that command ends:
# - normal exit, an exception, Ctrl-C, SIGTERM (cmg_app.cli turns SIGTERM into
#   KeyboardInterrupt so `finally` blocks run): the caller's cleanup(), and an atexit hook
#   for any server still registered here (e.g. interrupted while it was starting);
# - SIGKILL of the parent (nothing of it runs): Linux's PR_SET_PDEATHSIG, set by util-linux's
#   `setpriv --pdeathsig` just before it execs the server, sends the server SIGTERM when its
#   parent dies; it stops its Python stubs and exits (--exit-timeout-secs 10). Not a
#   preexec_fn: that makes the child of a threaded process run the interpreter's at-fork
#   hooks before exec (filelock's segfaulted there in a CI run, and the server never
#   started). Its work folder is removed by the next server started here
#   (`sweep_stale_work_dirs`: the folder names its owner's pid).
# The server runs in its own process group (start_new_session), so the caller's terminal
# signals reach it once, and stop()/kill() end the server with its stubs.
_LIVE: weakref.WeakSet = weakref.WeakSet()
WORK_PREFIX = "cmg-triton-"
OWNER_FILE = "owner"


def _process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a pid reused by
    another process apart from the one that wrote an owner file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _owner_alive(text: str) -> bool:
    try:
        pid_s, _, started = text.strip().partition(" ")
        pid = int(pid_s)
    except ValueError:
        return True  # unreadable: not ours to judge
    now = _process_start_time(pid)
    return now is not None and (not started or now == started)


def sweep_stale_work_dirs() -> list[Path]:
    """Remove work folders and shared-memory regions whose owning process has died (a
    SIGKILLed `cmg serve` or bench could not remove its own). Only what this code made:
    folders with an owner file, regions named with our prefix and the owner's pid."""
    removed: list[Path] = []
    if not Path("/proc/self/stat").exists():  # no way to tell a live owner from a dead one
        return removed
    # /tmp too: where TMPDIR is no place for the stubs (a space in it) the work folder is there
    folders = [f for base in dict.fromkeys([Path(tempfile.gettempdir()), Path("/tmp")])
               for f in base.glob(f"{WORK_PREFIX}*")]
    for folder in folders:
        owner = folder / OWNER_FILE
        try:
            text = owner.read_text()
        except OSError:
            if _old_kept_log(folder):  # a failed start's evidence, kept for a week, then it goes too
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        if not _owner_alive(text):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for region in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        pid, started, *_ = region.name[len(SHM_PREFIX):].split("-") + ["", ""]
        if not _owner_alive(f"{pid} {started}"):
            region.unlink(missing_ok=True)
            removed.append(region)
    return removed + sweep_orphaned_triton_regions() + sweep_orphaned_python_envs()


PYTHON_ENV_BASE = Path("/tmp")  # the Python backend's own folder per server, at a fixed place


def sweep_orphaned_python_envs(min_age_s: float = 86400) -> list[Path]:
    """The Python backend makes /tmp/python_env_XXXXXX at each start and removes it only when
    it shuts down cleanly: every server killed (or stopped while starting) left one, 190 in
    this project's /tmp. Empty ones untouched for a day go (rmdir: never anything inside),
    while no tritonserver runs here: a live one's folder looks the same."""
    removed: list[Path] = []
    if _tritonserver_running():
        return removed
    for folder in PYTHON_ENV_BASE.glob("python_env_*"):
        if _age_s(folder) > min_age_s:
            with contextlib.suppress(OSError):  # not empty, or gone meanwhile: left as it is
                folder.rmdir()
                removed.append(folder)
    return removed


KEPT_LOG_DAYS = 7  # how long a failed start's log stays in its temporary folder


def _old_kept_log(folder: Path) -> bool:
    """A work folder that `cleanup(keep_log=True)` reduced to its log, untouched for a week."""
    try:
        entries = list(folder.iterdir())
        return (len(entries) == 1 and entries[0].name == "tritonserver.log"
                and time.time() - entries[0].stat().st_mtime > KEPT_LOG_DAYS * 86400)
    except OSError:
        return False


def sweep_orphaned_triton_regions(min_age_s: float = 3600) -> list[Path]:
    """Regions with the Python backend's default name that no process maps and nobody has
    touched for an hour: left by SIGKILLed servers started elsewhere (or by this project
    before it named its own); each costs at least 1 MiB of /dev/shm until reboot."""
    regions = [r for r in SHM_DIR.glob(f"{TRITON_SHM_DEFAULT}*") if _age_s(r) > min_age_s]
    if not regions:
        return []
    mapped = _mapped_shm_names()
    if mapped is None:
        return []
    removed = []
    for region in regions:
        if region.name not in mapped:
            region.unlink(missing_ok=True)
            removed.append(region)
    return removed


def _tritonserver_running() -> bool:
    """Some process here is a tritonserver (or /proc cannot tell: then say yes)."""
    try:
        for comm in Path("/proc").glob("[0-9]*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == "tritonserver":
                    return True
    except OSError:
        return True
    return False


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _mapped_shm_names() -> set[str] | None:
    """Names of the /dev/shm files some visible process maps; None when a Triton process's
    maps cannot be read (then nothing is judged orphaned). Other unreadable ones (a
    container's init) cannot hold a Python-backend region."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            try:
                comm = (maps.parent / "comm").read_text()
            except FileNotFoundError:
                continue
            except OSError:
                return None
            if "triton" in comm:
                return None
            continue
        for line in text.splitlines():
            path = line.rpartition(" ")[2]
            if path.startswith(f"{SHM_DIR}/"):
                names.add(path[len(str(SHM_DIR)) + 1:])
    return names


# -- the admin key --------------------------------------------------------------------
# Triton's model-repository API (load, unload, index) loads whatever a caller uploads,
# Python-backend code included, and its shared-memory API makes the server write into any
# /dev/shm object its account can write. A server in explicit mode (what `cmg deploy`
# needs) restricts the first to callers that send the repository's key (REPO/.cmg-admin-key,
# mode 0600: the serving account's), and a server bound beyond loopback restricts the second
# too (a remote client has no use for the server's /dev/shm). The key is on tritonserver's
# command line, so any account on the host can read it with `ps`: it keeps the network
# out, not the host's other users (serve under an account of its own for that).
ADMIN_HEADER = "cmg-admin-key"
ADMIN_KEY_FILE = ".cmg-admin-key"


def admin_key(repository: Path, create: bool = False) -> str | None:
    """REPO/.cmg-admin-key; None when there is none to read (missing or empty). With `create`
    a missing or empty one is written whole (a temporary file linked into place: a reader never
    sees it half-written), mode 0600; a repository this account cannot write gets a key
    nobody holds (nothing can be deployed into it anyway)."""
    import secrets

    path = Path(repository) / ADMIN_KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        key = None
    except OSError as exc:
        raise CMGError(f"cannot read {path} ({exc.strerror}): the model-repository API of a server in "
                       "explicit mode takes that key; run as the account that serves the repository") from exc
    else:
        with os.fdopen(fd) as f:
            key = f.read().strip() or None
    if key is not None or not create:
        return key
    key = secrets.token_urlsafe(32)
    tmp = path.with_name(f"{ADMIN_KEY_FILE}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        try:
            os.link(tmp, path)  # fails when another server of this repository made one first
        except FileExistsError:
            existing = admin_key(repository)
            if existing is not None:
                return existing
            os.replace(tmp, path)  # an empty one (a crash between create and write)
    except OSError:  # a read-only repository (a mounted volume)
        return key
    finally:
        tmp.unlink(missing_ok=True)
    return key  # linked or moved into place: the file holds it


def key_headers(key: str, protocol: str = "grpc") -> dict[str, str]:
    """The request header that carries `key` (Triton reads gRPC's under a prefix of its own)."""
    return {("triton-grpc-protocol-" if protocol == "grpc" else "") + ADMIN_HEADER: key}


def admin_headers(repository: Path, protocol: str = "grpc") -> dict[str, str]:
    """The header that opens the model-repository API of a server of `repository`; none when
    the repository has no key (a server started by an older version, or by `tritonserver`
    itself, restricts nothing)."""
    key = admin_key(repository)
    return key_headers(key, protocol) if key is not None else {}


# -- shared memory ---------------------------------------------------------------------
# The Python backend keeps each model instance's tensors in a POSIX shared-memory region
# (/dev/shm, 1 MiB at start, growing with the batch). tritonserver removes its regions
# when it stops, not when it is SIGKILLed; a full /dev/shm then kills the next server
# with SIGBUS (exit -7) while it starts. Each server names its regions with a prefix of
# its own (owner pid, start time, a counter) so kill() and the sweep can remove them.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "cmg-triton-shm-"
TRITON_SHM_DEFAULT = "triton_python_backend_shm_region_"
MIN_SHM_BYTES = 16 << 20  # a CPU repository's four Python models at a batch of 8, with room
_SHM_SEQ = itertools.count()


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm; None where there is none (not Linux)."""
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None


def _shm_advice() -> str:
    try:
        usage = shutil.disk_usage(SHM_DIR)
    except OSError:
        return "no /dev/shm"
    return (f"/dev/shm has {usage.free >> 20} MiB free of {usage.total >> 20} MiB; the Python backend keeps "
            "its tensors there: stop other servers or give the container more (docker run --shm-size=1g)")


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv where it can set the parent-death signal (2.33 and later), else None."""
    exe = shutil.which("setpriv") if sys.platform == "linux" else None
    if exe is None:
        return None
    try:
        shown = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return exe if "--pdeathsig" in shown else None


@atexit.register
def _stop_live_servers() -> None:
    """Last resort at interpreter exit: every server started here and not cleaned up goes.
    Silent whatever stops it: a Ctrl-C pressed again while a server stops (stop() has killed
    its group by then) had printed a traceback under the one-line "interrupted"."""
    for server in list(_LIVE):
        with contextlib.suppress(BaseException):
            server.cleanup()


def check_port(port: int, address: str, flag: str) -> None:
    """Refuse a port out of range or already taken before tritonserver is launched: its own
    message for a taken port comes lines above a misleading last one, and an out-of-range
    port was silently replaced by a random one for gRPC."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise CMGError(f"{flag} {port}: a port is a number in 1..65535")
    family = socket.AF_INET6 if ":" in (address or "") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
        try:
            s.bind((address or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CMGError(f"{flag} {port}: port {port} on {address} is already in use (another server? "
                               f"choose another port with {flag})") from None
            if exc.errno == errno.EACCES:
                raise CMGError(f"{flag} {port}: binding port {port} needs privileges; use a port >= 1024") from None
            raise CMGError(f"{flag} {port}: cannot bind {address}:{port} ({exc.strerror})") from None


# Triton's Python backend starts its stub through `bash -c` with the model's path unquoted, and
# the stub's Python reads paths as ASCII: a repository path with a space, a shell character or
# a non-ASCII letter fails to load (or hangs the start). Such a path is served through a link.
_STUB_SAFE = re.compile(r"[A-Za-z0-9._/+,=@:%-]+")


def stub_safe(path: Path | str) -> bool:
    """Whether the Python backend can be given `path` as it is."""
    return bool(_STUB_SAFE.fullmatch(str(path)))


def _ephemeral_low() -> int:
    """The lowest port the OS gives outgoing connections (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on the loopback interface, below the range the OS gives outgoing
    connections: a port the OS picks (bind to 0) lies in that range, so any client connecting
    anywhere could take it as its local port before the server binds it ("Socket already in
    use", seen in a CI run). Checked by binding it; the OS's pick when none is found."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    for _ in range(64):
        port = pick.randrange(max(1024, low - 12000), low) if low > 2048 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
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

    report = repository / "build_report.json"
    if not report.is_file():
        return None
    data = json.loads(report.read_text())
    contract = Contract.from_dict(data["contract"])
    max_batch = int(data.get("max_batch", 32))
    per_item = 0
    for name in contract.models[CMG].steps:
        spec = contract.models[name]
        for t in spec.inputs + spec.outputs:
            n = 1
            for d in t.dims:
                n *= d
            per_item += n * NUMPY_DTYPES[t.dtype].itemsize
    return max(64 << 20, 2 * per_item * max_batch * in_flight)


def _log_message(line: str) -> str:
    """A glog line without its `I1127 23:45:34.648978 9179 file.cc:12] ` prefix and quotes."""
    head, sep, rest = line.partition("] ")
    if sep and head[:1] in "IWE" and head[1:5].isdigit():
        return rest.strip().strip('"')
    return line.strip()


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
        require_models: bool = True,
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
        self.require_models = require_models
        sweep_stale_work_dirs()
        self.restricted = (["model-repository"] if model_control_mode == "explicit" else []) + (
            [] if is_loopback(address) else ["shared-memory"])
        if self.restricted:  # and what a caller could change about the server's own logs
            self.restricted += ["logging", "trace"]
        self.admin_key = admin_key(self.repository, create=True) if self.restricted else None
        # the stub binary is assembled here too: an unsafe TMPDIR falls back to /tmp
        self._work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX,
                                           dir=None if stub_safe(tempfile.gettempdir()) else "/tmp"))
        self._served = self.repository  # what tritonserver is given: a safe link to it where needed
        if not stub_safe(self.repository):
            self._served = self._work / "repository"
            self._served.symlink_to(self.repository, target_is_directory=True)
        started = _process_start_time(os.getpid()) or ""
        (self._work / OWNER_FILE).write_text(f"{os.getpid()} {started}\n")
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}-{started}-{next(_SHM_SEQ)}-"
        self._cleaned = False
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

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str] | None:
        """What opens this server's restricted APIs (None: none are restricted)."""
        return key_headers(self.admin_key, protocol) if self.admin_key else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def work_dir(self) -> Path:
        """The temporary folder (assembled backends, default log); removed by cleanup()."""
        return self._work

    def command(self) -> list[str]:
        binary, _ = find_tritonserver()
        cmd = [
            str(binary),
            f"--model-repository={self._served}",
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
        cmd.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        cmd += [f"--load-model={m}" for m in self.load_models]
        if self.restricted:  # (the admin key above)
            apis = ",".join(self.restricted)
            cmd += [f"--http-restricted-api={apis}:{ADMIN_HEADER}={self.admin_key}",
                    f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={self.admin_key}"]
        if self.model_control_mode == "explicit":
            # A version that failed to load (a refused `cmg deploy`) would keep a strict server
            # "not ready" for good although every loaded model serves; clients check the
            # readiness of the model they call, which stays exact.
            cmd.append("--strict-readiness=false")
        if self.cuda_pool_bytes and gpu_present():
            cmd.append(f"--cuda-memory-pool-byte-size=0:{self.cuda_pool_bytes}")
        return cmd + self.extra_args

    # -- lifecycle -------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def is_ready(self) -> bool:
        """Server ready over HTTP (all models in `none` mode loaded)."""
        import tritonclient.http as httpclient  # heavy (gevent): only the HTTP queries need it

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
    FATAL_MARKERS = ("Failed to preinitialize Python stub", "failed to load all models",
                     "error while loading shared libraries")  # a stub that cannot start: Triton waits
    # Error lines that say nothing about the models (every CPU-only start logs them).
    NOISE = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory")

    def _this_start_log(self) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _fatal_log_line(self) -> str | None:
        for line in self._this_start_log().splitlines():
            if any(m in line for m in self.FATAL_MARKERS):
                return _log_message(line)
        return None

    def model_error_lines(self, limit: int = 12) -> list[str]:
        """The server's own error lines of this start that name a model (what failed and why)."""
        out = []
        for line in self._this_start_log().splitlines():
            severity_error = len(line) > 5 and line[0] == "E" and line[1:5].isdigit()
            if not (severity_error or "failed to load" in line or "UNAVAILABLE:" in line):
                continue
            if any(n in line for n in self.NOISE) or ("model" not in line.lower() and not severity_error):
                continue
            message = _log_message(line) if severity_error else line.strip(" |")
            if message not in out:
                out.append(message)
        # Lines that name a model first (stable): an unrelated error (a gRPC epoll error on a
        # busy machine, seen once) may be logged before the one that says what failed.
        out.sort(key=lambda m: "model" not in m.lower())
        return out[:limit]

    def port_error_line(self) -> str | None:
        """The server's own line saying an endpoint could not bind (port taken between our
        check and its start), e.g. `failed to start GRPC service: ... already in use`."""
        for line in self._this_start_log().splitlines():
            low = line.lower()
            if "failed to start" in low and "service" in low:
                return _log_message(line).strip()
        return None

    def _start_error(self, what: str) -> CMGError:
        """CMGError naming the failing model (from the server's log) and where the log is;
        a port the server could not bind wins (later lines about models are its consequence)."""
        port = self.port_error_line()
        if port:
            return CMGError(f"{what}: {port} (log {self.log_file})")
        lines = self.model_error_lines()
        first = lines[0] if lines else (self._fatal_log_line() or "see the log")
        return CMGError(f"{what}: {first} (log {self.log_file})",
                        details="\n".join(lines) if len(lines) > 1 else (None if lines else self.log_tail()))

    def model_states(self) -> list[dict]:
        """The repository index: [{'name', 'version', 'state', 'reason'}] over HTTP."""
        import tritonclient.http as httpclient  # heavy (gevent): only the HTTP queries need it

        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0, network_timeout=10.0)
        try:
            return list(client.get_model_repository_index(headers=self.admin_headers("http")))
        finally:
            client.close()

    def _check_models(self) -> None:
        """A server with nothing to serve is a failed start, not a ready one."""
        try:
            index = self.model_states()
        except Exception as exc:  # noqa: BLE001 - the server went away between the checks
            raise self._start_error(f"tritonserver on {self.repository} stopped answering ({exc})") from exc
        if not index:
            raise CMGError(f"no models in {self.repository}: a model repository has one folder per model "
                           "with a config.pbtxt (`cmg build --run RUN --out REPO` writes one)")
        if self.model_control_mode != "explicit" and not any(m.get("state") == "READY" for m in index):
            found = ", ".join(f"{m.get('name')} {m.get('state', '?')}" for m in index)
            raise self._start_error(f"no model of {self.repository} loaded (found {found})")

    def start(self, timeout: float = 120) -> TritonServer:
        """Launch and wait until ready with at least one model; CMGError naming the failing
        model (the server's own log lines) when it dies, refuses its models or times out."""
        if self.is_running():
            return self
        if ":" in (self.address or ""):  # tritonserver joins address and port unbracketed: "::1:8001" fails
            raise CMGError(f"--address {self.address}: IPv6 addresses are not supported by this launcher; "
                           "use 127.0.0.1 (this machine) or 0.0.0.0 (every interface)")
        ports = (("--http-port", self.http_port), ("--grpc-port", self.grpc_port), ("--metrics-port", self.metrics_port))
        for i, (flag, port) in enumerate(ports):
            same = [other for other, p in ports[:i] if p == port]
            if same:  # tritonserver says why only in its log, after 25 lines of usage text
                raise CMGError(f"{same[0]} and {flag} are both {port}: each service needs a port of its own")
            check_port(port, self.address, flag)
        drop_bytecode_cache(self.repository)
        free = shm_free_bytes()
        if free is not None and free < MIN_SHM_BYTES:
            raise CMGError(f"not enough shared memory to start tritonserver: {_shm_advice()}")
        cmd = self.command()
        _, env = find_tritonserver()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # The models load under a reader's lock on the repository: a `cmg build` swapping its
        # entries meanwhile had this server load one run's scorer beside another's encoder.
        with reading(self.repository, refusal=f"repository {self.repository} is being written by `cmg build` or "
                     "`cmg deploy` (pid {pid}, lock {lock}): start the server when it ends"):
            for attempt in (1, 2):
                self._launch(cmd, env)
                try:
                    return self._wait_ready(timeout)
                except CMGError:
                    if attempt == 1 and self._aborted_in_grpc_poller():
                        print("tritonserver aborted in gRPC's poller while starting (epoll_wait: Bad file descriptor, "
                              "an upstream fault seen on busy machines): starting it again", file=sys.stderr)
                        continue
                    raise
                except BaseException:  # Ctrl-C or SIGTERM while starting: the server goes too
                    if self.is_running():
                        self.stop(timeout=10)
                    raise
        raise AssertionError("unreachable")

    def _launch(self, cmd: list[str], env: dict[str, str]) -> None:
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_start = self._log_handle.tell()  # scan only this start's lines for fatal errors
        # Own session: signals to the caller's terminal do not reach the server twice,
        # and kill() can end the server together with its Python stubs. The death signal
        # follows the thread that forks: only the main thread (which lives as long as the
        # process) asks for it; a server started from another thread relies on the atexit hook.
        setpriv = _setpriv() if threading.current_thread() is threading.main_thread() else None
        self._proc = subprocess.Popen(
            [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd,
            stdout=self._log_handle, stderr=subprocess.STDOUT, env=env, cwd=self._work, start_new_session=True,
        )
        _LIVE.add(self)

    def _aborted_in_grpc_poller(self) -> bool:
        """This start ended in SIGABRT after gRPC's event engine logged an epoll_wait error: a
        fault of tritonserver 2.51's gRPC on a busy machine (a CI run's server died so at
        start, once in about a thousand), not of the repository; worth one more start."""
        return (self._proc is not None and self._proc.returncode == -signal.SIGABRT
                and "epoll_wait error" in self._this_start_log())

    def _wait_ready(self, timeout: float) -> TritonServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._close_log()
                self._remove_shm()
                what = f"tritonserver exited with code {rc} while starting on {self.repository}"
                if rc == -signal.SIGBUS:  # a shared-memory page it could not get
                    what += f" (SIGBUS: {_shm_advice()})"
                raise self._start_error(what)
            ready = self.is_ready()
            fatal = self._fatal_log_line()  # also after "ready": a failure may be logged just before
            if fatal:
                error = self._start_error(f"tritonserver failed to start on {self.repository}")
                self.stop(timeout=10)
                raise error
            if ready:
                try:
                    if self.require_models:
                        self._check_models()
                except CMGError:
                    self.stop(timeout=10)
                    raise
                return self
            time.sleep(0.25)
        error = self._start_error(f"tritonserver not ready after {timeout:.0f}s on {self.repository}")
        self.stop()
        raise error

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, wait, then SIGKILL the process group if it hangs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._killpg(proc)
            except KeyboardInterrupt:  # Ctrl-C (again) while it stops: no more waiting, but no stub left
                self._killpg(proc)
                self._after_exit(proc)
                raise
        self._after_exit(proc)

    def kill(self) -> None:
        """Hard kill (server and stubs): tests use it to simulate the server going away."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._killpg(proc)
        self._after_exit(proc)

    def _after_exit(self, proc: subprocess.Popen | None) -> None:
        """What stop() and kill() leave behind them: no stub, no open log, no shared memory."""
        if proc is not None:
            self._reap_group(proc)
        self._close_log()
        self._remove_shm()

    def _remove_shm(self) -> None:
        """This server's regions, once its process has exited (a clean stop has removed them
        already; a SIGKILLed one leaves them)."""
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

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

    def cleanup(self, keep_log: bool = False) -> None:
        """Stop and remove the work dir (assembled backends); with `keep_log` a log that
        lives there stays (a failed start's evidence), everything else goes."""
        self.stop()
        self._cleaned = True
        _LIVE.discard(self)
        log_inside = self._work in self.log_file.parents
        has_log = self.log_file.is_file() and self.log_file.stat().st_size > 0
        if keep_log and log_inside and has_log and self._work.is_dir():
            for path in self._work.iterdir():  # the owner file goes too: a sweep leaves the log be
                if path != self.log_file:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
            return
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:  # a forgotten server must not outlive the test session
        try:
            if self.is_running():
                self.kill()
            if not self._cleaned:
                shutil.rmtree(self._work, ignore_errors=True)
        except BaseException:  # noqa: BLE001 - nothing leaves __del__: a Ctrl-C printed "Exception ignored in"
            pass


# -- CLI -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--repository", type=Path, required=True, help="Triton model repository (cmg build --out)")
    parser.add_argument("--http-port", type=port_int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=port_int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=port_int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--address", default=LOOPBACK, help="bind address (default loopback only)")
    parser.add_argument("--model-control-mode", choices=("none", "explicit", "poll"), default="none")
    parser.add_argument("--load-model", action="append", default=[], metavar="M",
                        help="model to load at start in explicit mode (repeatable)")
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("--timeout", type=positive_float, default=180, help="seconds to wait for readiness")
    parser.add_argument("--in-flight", type=positive_int, default=8,
                        help="in-flight requests the CUDA memory pool is sized for (GPU hosts)")


def is_training_output(folder: Path) -> bool:
    """A `cmg train` run folder or a `cmg export` folder: never a model repository (serving one
    fails on its files; building into one mixes model folders with a checkpoint)."""
    folder = Path(folder)
    return any((folder / f).is_file() for f in ("checkpoint.pt", "onnx/export.json", "export.json"))


def drop_bytecode_cache(repository: Path) -> None:
    """The default repository folder is also the `cmg_model_repository` package (model.py),
    so importing it leaves `__pycache__/` there, which Triton takes for a model and fails on.
    Only Python's own cache goes (a folder of .pyc files), rebuilt on the next import."""
    cache = Path(repository) / "__pycache__"
    if cache.is_dir() and all(p.suffix == ".pyc" for p in cache.iterdir()):
        shutil.rmtree(cache, ignore_errors=True)


def check_repository(repository: Path, control_mode: str = "none") -> None:
    """Refuse what is plainly not a model repository before starting a server on it."""
    repository = Path(repository)
    if not repository.exists():
        raise CMGError(f"model repository {repository} does not exist")
    if not repository.is_dir():
        raise CMGError(f"model repository {repository} is a file, not a folder")
    if is_training_output(repository):
        raise CMGError(f"{repository} is a training run or export folder, not a model repository: "
                       f"`cmg build --run {repository} --out REPO`, then `cmg serve --repository REPO`")
    if not any(p.is_dir() for p in repository.iterdir()):
        raise CMGError(f"no models in {repository}: a model repository has one folder per model "
                       "(`cmg build --run RUN --out REPO` writes one)")
    drop_bytecode_cache(repository)
    strays = sorted(p.name for p in repository.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and not (p / "config.pbtxt").is_file()
                    and not any(v.is_dir() and v.name.isdigit() for v in p.iterdir()))
    if strays and control_mode != "explicit":  # Triton loads every folder then, and stops on one that is no model
        raise CMGError(f"{repository} holds folders that are not models (no config.pbtxt, no version folder): "
                       f"{', '.join(strays)}; move them out of the repository (or serve with "
                       "--model-control-mode explicit, which loads only the models named)")
    if not shutil.which("tritonserver"):  # the nvidia-pytriton binary: its only backend is Python
        foreign = backends_needed(repository) - {"python"}
        if foreign:
            raise CMGError(
                f"{repository} needs Triton's {', '.join(sorted(foreign))} backend, and the tritonserver found "
                "here (nvidia-pytriton's, no tritonserver on PATH) has only the Python backend: serve it in the "
                "official image (nvcr.io/nvidia/tritonserver:24.10-py3, docs/guide.md 'Build targets'), "
                f"or build the run with `--target cpu` to serve it here")


# A model config's platform -> the Triton backend that runs it (ensembles need none).
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt",
                     "pytorch_libtorch": "pytorch", "tensorflow_savedmodel": "tensorflow"}


def backends_needed(repository: Path) -> set[str]:
    """The backends the repository's models name (`backend:` or `platform:`)."""
    needed = set()
    for config in Path(repository).glob("*/config.pbtxt"):
        text = config.read_text(errors="replace")
        backend = re.search(r'^\s*backend:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^\s*platform:\s*"([^"]+)"', text, re.M)
        if backend:
            needed.add(backend.group(1))
        elif platform and platform.group(1) in PLATFORM_BACKENDS:
            needed.add(PLATFORM_BACKENDS[platform.group(1)])
    return needed


def run(args: argparse.Namespace) -> int:
    if args.load_model and args.model_control_mode != "explicit":  # tritonserver would exit 1 after its start-up
        raise CMGError(f"--load-model {args.load_model[0]} needs --model-control-mode explicit (in mode "
                       f"{args.model_control_mode} Triton loads every model of the repository)")
    check_repository(args.repository, args.model_control_mode)
    pool = cuda_memory_pool_bytes(args.repository, args.in_flight) if gpu_present() else None
    server = TritonServer(
        args.repository, args.http_port, args.grpc_port, args.metrics_port,
        model_control_mode=args.model_control_mode, log_file=args.log_file,
        load_models=args.load_model, address=args.address, cuda_pool_bytes=pool,
    )
    stop = threading.Event()
    starting = threading.Event()
    on_term = signal.getsignal(signal.SIGTERM)  # the console script's: raises, so SIGTERM exits 143

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()
        if starting.is_set():  # start-up may take minutes (model loads): stop now, not once it is ready
            starting.clear()  # once: a second signal while the half-started server stops only sets `stop`
            if signum == signal.SIGTERM and callable(on_term):
                on_term(signum, frame)
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    failed = True
    try:
        starting.set()
        try:
            server.start(timeout=args.timeout)
        except KeyboardInterrupt:
            failed = False  # stopped by its user, not failed: no log kept
            raise
        finally:
            starting.clear()
        print(f"tritonserver ready on {server.repository} (pid {server.pid}, log {server.log_file})", flush=True)
        print(f"  grpc    {server.grpc_url}\n  http    {server.http_url}\n  metrics {server.metrics_url}", flush=True)
        while not stop.is_set():
            if not server.is_running():
                raise CMGError(f"tritonserver exited unexpectedly (log {server.log_file})",
                               details=server.log_tail())
            stop.wait(0.5)
        print("stopping tritonserver", flush=True)
        failed = False
    finally:
        # The backends folder always goes; a failed server's log stays where it was.
        server.cleanup(keep_log=failed)
    return 0
