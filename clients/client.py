"""Synchronous Triton client for the `cmg` ensembles (gRPC by default, HTTP on request).

The server is the source of truth for frame size, grid and batch limit: the client reads
them from the model's metadata and config, so no run folder is needed on the client host.
Requests, answers and retry rules come from `cmg_clients.core`. Imports no torch (tests
check it): it runs on line PCs that only have numpy and Pillow.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import functools
import glob
import os
import queue
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException

from cmg import contract as C
from cmg import model_config as mcfg
from cmg.contract import Contract
from cmg.dataset import IMAGE_SUFFIXES, image_name, visible
from cmg.errors import CMGError
from cmg.frames import DEFAULT_MAX_PIXELS, batch_to_uint8, load_frame, to_frame
from cmg_clients import core
from cmg_clients.core import (  # noqa: F401 - re-exported: the client's public names
    DEFAULT_PORTS,
    OUTPUTS,
    PROTOCOLS,
    Result,
    RetryPolicy,
    contract_from_metadata,
    normalize_url,
    results_from_arrays,
)

ImageLike = str | Path | bytes | np.ndarray | Image.Image
SHM_PREFIX = "cmg_"  # every region this client registers is named cmg_<pid>_<tag>_held_{in,out}
HELD = "_held_"  # in the names of regions whose owner holds a lock on their file (older clients' have none)
SHM_DIR = Path("/dev/shm")
_LIVE_SHM: weakref.WeakSet = weakref.WeakSet()  # shm clients not closed yet (closed at exit)


@atexit.register
def _close_live_shm_clients() -> None:
    """A script that ends without close() still unregisters its regions: the server would
    otherwise keep them mapped (deleted files, their memory held) until it restarts."""
    for client in list(_LIVE_SHM):
        with contextlib.suppress(Exception):
            client.close()


# A forked child (a pre-forking web server's worker) inherits the set: its exit must not
# unregister and delete the regions its parent still uses.
os.register_at_fork(after_in_child=_LIVE_SHM.clear)


class InferError(CMGError):
    """Triton refused or did not answer a request.

    `status` keeps Triton's code (e.g. StatusCode.INVALID_ARGUMENT); `kind` is the core's
    verdict (transient, deadline, permanent), so callers need not parse messages.
    """

    def __init__(self, message: str, status: str | None = None, kind: str = core.PERMANENT):
        super().__init__(message)
        self.status = status
        self.kind = kind

    @property
    def server_gone(self) -> bool:
        """The server did not answer at all (every further request would fail the same way)."""
        return self.kind in (core.TRANSIENT, core.DEADLINE) and self.status in (
            None, "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


class CMGClient:
    """Scores frames on a running Triton server.

    Batches are split into chunks of the model's max_batch_size. With `shm=True` the
    tensors travel through system shared memory regions registered with the server
    (same host only) and are unregistered and destroyed on `close()` (or at interpreter
    exit); after a server restart they are registered again. Inference calls the server
    answers with "not now" (model loading or unloading, server busy) are retried per
    `retry`; one it does not answer (`InferError.server_gone`: refused, unreachable, past
    the deadline) is not, nor is the start-up handshake, so a wrong URL or a down server
    fails at once (`cmg stream` retries those); the next call reconnects within about a
    second of the server's return.

    One client may be shared by threads: gRPC calls share one channel; HTTP calls (gevent,
    which cannot switch threads) run on up to HTTP_THREADS threads the client owns, each
    with its own connection; with `shm=True` requests take turns, since the regions hold one
    request at a time.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        model: str = C.CMG,
        contract: Contract | None = None,
        shm: bool = False,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self._shm_regions: list[tuple[str, Any, int]] = []  # (name, handle, bytes)
        self._shm_layout: dict[str, Any] | None = None
        self._shm_lock = threading.Lock()
        self._shm_held: list[int] = []  # a shared lock on each region's file, held while this process lives
        self._shared: Any = None  # gRPC: one client for every thread; HTTP: the client's threads (_HTTPThreads)
        self._stop_threads: Callable[[], Any] = lambda: None  # HTTP: ends them (also when collected unclosed)
        self._closed = False
        self._pid = os.getpid()  # the process that owns the shm regions
        if protocol not in PROTOCOLS:
            raise CMGError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.url = normalize_url(url, protocol)
        self.model = model
        self.timeout_s = core.positive_seconds(timeout_s, "timeout")
        self.retry = retry or RetryPolicy(max_retries=0)
        self.max_pixels = int(max_pixels)
        self.retries = 0  # transient failures retried so far
        if protocol == "grpc":
            self._shared = self._connect()
        else:
            import tritonclient.http as mod  # heavy (gevent): only --protocol http needs it

            self._mod = mod
            self._shared = _HTTPThreads(functools.partial(_http_connection, self.url, self.timeout_s))
            self._stop_threads = weakref.finalize(self, self._shared.close, self.timeout_s)
            self._stop_threads.atexit = False  # the exit hook's close() still unregisters shm regions through them
        try:
            self._check_ready()
            metadata, config = self._read_model()
            self.contract = contract or contract_from_metadata(metadata, model)
            self.max_batch = max(1, int(config.max_batch_size or 1))
            # GPU targets: THRESHOLD is required (engines have no defaults); send the calibrated one,
            # per version (a deploy may bring another run's).
            self.calibrated = mcfg.CalibratedThreshold(config, metadata.get("versions") or ())
            self._given_default: float | None = None
            self.use_shm = shm
            if shm:
                self._setup_shm()
        except BaseException:
            self.close()
            raise

    # -- connection -------------------------------------------------------------------
    @property
    def _client(self) -> Any:
        """The tritonclient (HTTP: one whose calls run on the client's threads)."""
        if self._closed:
            raise CMGError(f"the client for {self.url} is closed")
        return self._shared

    def _connect(self):
        import tritonclient.grpc as mod  # loaded anyway: cmg.model_config imports its protobufs

        self._mod = mod
        try:
            # reconnects within about a second of the server's return (`grpc_channel_args`)
            return mod.InferenceServerClient(self.url, channel_args=core.grpc_channel_args(mod))
        except Exception as exc:  # bad URL syntax
            raise CMGError(f"cannot create a grpc client for {self.url}: {exc}") from exc

    def _where(self) -> str:
        return f"Triton server at {self.url} ({self.protocol})"

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """Run a tritonclient call; failures become InferErrors that say what happened:
        a deadline as a deadline, a server that is not there as unreachable."""
        if self.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return fn(*args, **kwargs)
        except CMGError:
            raise  # said already (an HTTP connection that cannot be made: a bad URL)
        except InferenceServerException as exc:
            failure = core.classify(exc)
            if failure.kind == core.DEADLINE:
                raise self._deadline(what, failure) from exc
            if core.RESTRICTED_MARK in failure.message:  # it answered: refused, not unreachable
                raise InferError(f"{self._where()} refused {what}: {failure.message} ({core.RESTRICTED_HINT})",
                                 failure.status, failure.kind) from exc
            if failure.status == "StatusCode.UNAVAILABLE" or (failure.status is None and failure.reconnect):
                raise InferError(f"{self._where()} unreachable during {what}: {failure.message}",
                                 failure.status or "UNAVAILABLE", failure.kind) from exc
            raise InferError(f"{what} on model '{self.model}' at {self.url}: {failure.message}",
                             failure.status, failure.kind) from exc
        except Exception as exc:  # noqa: BLE001 - transport errors of grpc, geventhttpclient, sockets
            failure = core.classify(exc)
            if failure.kind == core.DEADLINE:
                raise self._deadline(what, failure) from exc
            if failure.kind == core.TRANSIENT or self.protocol == "http":
                # the wrong port is the likely cause only before the server ever answered
                hint = (" (is it an HTTP port? gRPC is usually :8001, HTTP :8000)"
                        if self.protocol == "http" and what == READY_CHECK else "")
                raise InferError(f"{self._where()} unreachable during {what}{hint}: {failure.message}",
                                 "UNAVAILABLE", core.TRANSIENT) from exc
            raise
        except BaseException as exc:  # gevent.Timeout derives from BaseException
            if core.classify(exc).kind == core.DEADLINE:
                raise self._deadline(what, core.classify(exc)) from exc
            raise

    def _deadline(self, what: str, failure: core.Failure) -> InferError:
        return InferError(
            f"no answer from {self._where()} within the {self.timeout_s:g} s deadline during {what} "
            f"(timeout_s; `--timeout` on the command line): {failure.message}",
            failure.status or "DEADLINE_EXCEEDED", core.DEADLINE)

    def _check_ready(self) -> None:
        if not self._call(READY_CHECK, self._client.is_server_ready):
            raise CMGError(f"Triton server at {self.url} is up but not ready")
        if not self._call("model readiness check", self._client.is_model_ready, self.model):
            names = self._model_names()
            there = ("the server lists its models only to callers with its admin key" if names is None
                     else f"models there: {', '.join(names) or 'none'}")
            raise CMGError(f"model '{self.model}' is not ready on {self.url} ({there})")

    def _model_names(self) -> list[str] | None:
        """The repository's models, or None when the server does not list them to this client."""
        try:
            index = self._call("repository index", self._client.get_model_repository_index)
        except CMGError as exc:
            return None if core.RESTRICTED_MARK in str(exc) else []
        if self.protocol == "grpc":
            return sorted(m.name for m in index.models)
        return sorted(m["name"] for m in index)

    def _read_model(self) -> tuple[dict, mcfg.ModelConfig]:
        if self.protocol == "grpc":
            meta = self._call("model metadata", self._client.get_model_metadata, self.model, as_json=True)
        else:
            meta = self._call("model metadata", self._client.get_model_metadata, self.model)
        return meta, self._call("model config", mcfg.from_server, self._client, self.model)

    @property
    def default_threshold(self) -> float | None:
        """What frames are sent with when the caller gives no threshold: one set here, else
        None on the cpu target (each version applies its own), else the served ensemble's
        calibrated one, per version."""
        return self._given_default if self._given_default is not None else self.calibrated.value

    @default_threshold.setter
    def default_threshold(self, value: float | None) -> None:
        """Send `value` whenever the caller gives none (None: the served one again)."""
        self._given_default = core.finite_threshold(value)

    def _learn_threshold(self) -> None:
        """Read the served config again (a version this client has not seen answered)."""
        metadata, config = self._read_model()
        self.calibrated.learn(config, metadata.get("versions") or ())

    # -- frames -----------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        return (self.contract.height, self.contract.width)

    def frames(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Images, paths or a batch array -> UINT8 [B, H, W, 3] via cmg.frames (the one conversion)."""
        spec = self.contract.image()
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.shape[0] == 0:  # an empty batch of any size or dtype: nothing to convert
                return np.zeros((0, *spec.dims), dtype=spec.np_dtype)
            batch = images
            try:
                spec.check(batch)
                return np.ascontiguousarray(batch)
            except ValueError:
                batch = batch_to_uint8(batch)  # one 0..1 / 0..255 reading for the whole array
                return np.stack([to_frame(f, self.size) for f in batch])
        if isinstance(images, (str, Path, bytes, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        out = [self.frame(im) for im in images]
        if not out:
            return np.zeros((0, *spec.dims), dtype=spec.np_dtype)
        return np.stack(out)

    def frame(self, image: ImageLike) -> np.ndarray:
        if isinstance(image, (str, Path, bytes)):
            return load_frame(image, self.size, max_pixels=self.max_pixels)
        return to_frame(image, self.size)

    # -- inference --------------------------------------------------------------------
    def infer(
        self,
        images: ImageLike | Sequence[ImageLike],
        threshold: float | None = None,
        batch_size: int | None = None,
    ) -> list[Result]:
        """Score frames (one image, a list of them, or an [N,H,W,3] array); chunks of at most
        max_batch (or `batch_size`) per request. An image that cannot be read is a FrameError,
        a CMGError naming the file."""
        return results_from_arrays(self.infer_arrays(self.frames(images), threshold, batch_size))

    def infer_arrays(
        self, frames: np.ndarray, threshold: float | None = None, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Raw batched outputs for UINT8 [B, H, W, 3] frames (sent as given: no checks here)."""
        threshold = core.finite_threshold(threshold)
        if threshold is None:
            threshold = self._given_default
        step = self.max_batch if not batch_size else max(1, min(int(batch_size), self.max_batch))
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, frames.shape[0], step):
            parts.append(self._scored(frames[start : start + step], threshold))
        if not parts:
            return core.empty_outputs(self.contract, self.model)
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}

    def _scored(self, frames: np.ndarray, threshold: float | None) -> dict[str, np.ndarray]:
        """One chunk's outputs. With no threshold given on a GPU target, flagged at the
        calibrated threshold of the version that answered: a chunk a newly deployed version
        answered at the old one's threshold is sent again with the new one (at most twice)."""
        if threshold is not None or self.calibrated.value is None:
            return self._with_retries(frames, threshold)[0]
        sent = self.calibrated.value
        for _ in range(core.RESCORES):
            arrays, version = self._with_retries(frames, sent)
            if not self.calibrated.known(version):
                try:
                    self._learn_threshold()
                except CMGError:
                    break  # the answer stands, flagged at the threshold it was sent with
            again = self.calibrated.resend_with(version, sent)
            if again is None:
                break
            sent = again
        return arrays

    def _with_retries(self, frames: np.ndarray, threshold: float | None) -> tuple[dict[str, np.ndarray], str | None]:
        attempt = 0
        while True:
            try:
                return self._infer_chunk(frames, threshold)
            except InferError as exc:
                if exc.kind != core.TRANSIENT or exc.server_gone:
                    raise
                attempt += 1
                if self.retry.exhausted(attempt):
                    raise
                self.retries += 1
                time.sleep(self.retry.delay(attempt))

    def _infer_chunk(self, frames: np.ndarray, threshold: float | None) -> tuple[dict[str, np.ndarray], str | None]:
        """The chunk's outputs and the model version that answered."""
        mod = self._mod
        inputs = core.build_inputs(mod, frames, threshold, data=not self.use_shm)
        outputs = core.requested_outputs(mod)
        if not self.use_shm:
            result = self._call("inference", self._client.infer, self.model, inputs, outputs=outputs)
            return core.decode(result), core.model_version(result)
        thr = None if threshold is None else core.threshold_values(frames.shape[0], threshold)
        with self._shm_lock:  # one input and one output region: one request at a time
            if self._closed or not self._shm_regions:
                raise CMGError(f"the client for {self.url} is closed")
            try:
                return self._infer_shm(frames, thr, inputs, outputs)
            except InferError as exc:
                if not _region_unknown(exc):
                    raise
                self._register_shm()  # the server restarted and forgot the regions
                return self._infer_shm(frames, thr, inputs, outputs)

    # -- system shared memory ---------------------------------------------------------
    def _setup_shm(self) -> None:
        """One input and one output region sized for a full batch, registered once."""
        import tritonclient.utils.shared_memory as shm  # only --shm uses system shared memory

        b = self.max_batch
        spec = self.contract.image()
        image_bytes = b * int(np.prod(spec.dims)) * spec.np_dtype.itemsize
        thr = core.THRESHOLD
        thr_bytes = b * int(np.prod(thr.dims)) * thr.np_dtype.itemsize
        in_layout = {C.IMAGE: (0, image_bytes), C.THRESHOLD: (image_bytes, thr_bytes)}
        out_layout, offset = {}, 0
        for name, out in core.output_specs(self.contract, self.model).items():
            per = int(np.prod(out.dims)) * out.np_dtype.itemsize
            out_layout[name] = (offset, per * b, per, out.dims, out.np_dtype)
            offset += -(-per * b // 64) * 64  # keep each output 64-byte aligned
        self._drop_stale_regions()
        tag = f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
        for kind, nbytes in (("in", image_bytes + thr_bytes), ("out", offset)):
            name = f"{tag}{HELD}{kind}"
            try:
                handle = shm.create_shared_memory_region(name, f"/{name}", nbytes)
            except Exception as exc:
                raise CMGError(f"cannot create shared memory region /{name} ({nbytes} bytes): {exc}") from exc
            self._shm_regions.append((name, handle, nbytes))
            self._shm_held.append(_hold(SHM_DIR / name))
        _LIVE_SHM.add(self)
        self._register_shm()
        self._shm_layout = {"tag": tag, "in": in_layout, "out": out_layout}

    def _register_shm(self) -> None:
        """Register the regions (again, after a server restart: the server forgot them)."""
        for name, _, nbytes in self._shm_regions:
            self._call(f"shared memory registration of /{name}", self._client.register_system_shared_memory,
                       name, f"/{name}", nbytes)

    def _drop_stale_regions(self) -> None:
        """Unregister and remove regions of clients that died without close(): named like ours,
        their /dev/shm file gone (unlinked), or left with no lock on it (its owner process is
        dead, whatever killed it: a SIGKILL of its process group also kills the resource
        tracker that would have unlinked the file, and the server kept it registered and
        mapped). A live owner's lock keeps its regions, in any pid namespace."""
        try:
            status = self._call("shared memory status", self._client.get_system_shared_memory_status,
                                **({"as_json": True} if self.protocol == "grpc" else {}))
        except InferError:
            return
        regions = status.get("regions", {}).values() if isinstance(status, dict) else status
        registered = {}
        for region in regions:
            name, key = str(region.get("name", "")), str(region.get("key", ""))
            if name.startswith(SHM_PREFIX) and key:
                registered[SHM_DIR / key.lstrip("/")] = name
        for path in [*(p for p in registered if not p.exists()), *SHM_DIR.glob(f"{SHM_PREFIX}*{HELD}*")]:
            with _abandoned(path) as dead:
                if not dead:
                    continue
                if path in registered:
                    with contextlib.suppress(InferError):
                        self._call(f"unregistration of the stale region {registered[path]}",
                                   self._client.unregister_system_shared_memory, registered[path])
                path.unlink(missing_ok=True)

    def _infer_shm(self, frames, thr, inputs, outputs) -> tuple[dict[str, np.ndarray], str | None]:
        import tritonclient.utils.shared_memory as shm  # only --shm uses system shared memory

        layout = self._shm_layout
        assert layout is not None
        (in_name, in_handle, _), (out_name, out_handle, _) = self._shm_regions
        n = frames.shape[0]
        frames = np.ascontiguousarray(frames)
        if frames.nbytes > layout["in"][C.IMAGE][1]:
            raise CMGError(f"{C.IMAGE}: {frames.nbytes} bytes do not fit the shared memory region")
        shm.set_shared_memory_region(in_handle, [frames], offset=0)
        inputs[0].set_shared_memory(in_name, frames.nbytes, 0)
        if thr is not None:
            off = layout["in"][C.THRESHOLD][0]
            shm.set_shared_memory_region(in_handle, [thr], offset=off)
            inputs[1].set_shared_memory(in_name, thr.nbytes, off)
        for out in outputs:
            off, nbytes, _, _, _ = layout["out"][out.name()]
            out.set_shared_memory(out_name, nbytes, off)
        result = self._call("inference (shared memory)", self._client.infer, self.model, inputs, outputs=outputs)
        arrays = {}
        for name in OUTPUTS:
            off, _, _, shape, dtype = layout["out"][name]
            view = shm.get_contents_as_numpy(out_handle, dtype, [n, *shape], offset=off)
            arrays[name] = np.array(view, copy=True)  # the region is reused by the next request
        return arrays, core.model_version(result)

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Unregister and destroy shared memory regions (after a request in flight on them
        ends), then close the connections. In a forked child, the parent's regions and
        connections are left to the parent."""
        if getattr(self, "_closed", True):
            return
        try:
            if self._shm_regions and self.protocol == "http" and self._shared.closed and os.getpid() == self._pid:
                # Collected in a reference cycle, whose finalizer ended the HTTP threads first: threads
                # of its own for the unregistration (without, the regions stayed registered)
                self._shared = _HTTPThreads(functools.partial(_http_connection, self.url, self.timeout_s))
                self._stop_threads = functools.partial(self._shared.close, self.timeout_s)
            if self._shm_regions:
                import tritonclient.utils.shared_memory as shm  # only --shm uses system shared memory

                locked = self._shm_lock.acquire(timeout=self.timeout_s)
                try:
                    if os.getpid() == self._pid:
                        self._unregister([name for name, *_ in self._shm_regions])
                        for _, handle, _ in self._shm_regions:
                            # also when the server is gone: the region is still ours to destroy
                            with contextlib.suppress(Exception):
                                shm.destroy_shared_memory_region(handle)
                    self._shm_regions = []
                    for fd in self._shm_held:  # (in a forked child, the parent's lock stays: it has its own fd)
                        os.close(fd)
                    self._shm_held = []
                finally:
                    if locked:
                        self._shm_lock.release()
        finally:  # the threads end however the unregistration ended (one made just above too)
            _LIVE_SHM.discard(self)
            self._closed = True
            if os.getpid() == self._pid:  # a forked child: the connections are the parent's (a gRPC
                self._stop_threads()  # channel's shutdown would be sent on the parent's socket)
                if self.protocol == "grpc" and self._shared is not None:
                    with contextlib.suppress(Exception):
                        self._shared.close()

    def _unregister(self, names: list[str], attempts: int = 3) -> None:
        """Unregister regions within timeout_s each (gRPC's call had no deadline: close() and the
        exit hook hung for ever on a stopped server). A busy server gets a few tries; a gone
        one (refused, or no answer in time) none, nor do the regions after it: one timeout."""
        for i, name in enumerate(names):
            for attempt in range(attempts):
                try:
                    self._call(f"unregistration of /{name}", self._client.unregister_system_shared_memory, name)
                    break
                except Exception as exc:  # noqa: BLE001 - tritonclient raises its own and grpc types
                    gone = isinstance(exc, InferError) and exc.server_gone
                    if gone or attempt == attempts - 1:
                        left = names[i:] if gone else [name]
                        warnings.warn(f"could not unregister shared memory region {', '.join(left)}: {exc}",
                                      stacklevel=3)
                        if gone:
                            return
                        break
                    time.sleep(0.2 * (attempt + 1))

    def __enter__(self) -> CMGClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # last resort: never leave /dev/shm regions behind
        try:
            if self._shm_regions:
                self.close()
        except Exception:
            pass


READY_CHECK = "server readiness check"


HTTP_THREADS = 8  # at most this many HTTP calls of one client at once (more callers wait their turn)


def _http_connection(url: str, timeout_s: float) -> Any:
    import tritonclient.http as mod  # heavy (gevent): only --protocol http needs it

    try:
        return mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    except Exception as exc:  # bad URL syntax
        raise CMGError(f"cannot create a http client for {url}: {exc}") from exc


class _HTTPThreads:
    """A tritonclient.http client whose calls run on threads it owns, each with its own
    connection, started as calls overlap (at most HTTP_THREADS). gevent cannot switch
    threads, so each connection stays on one thread; a connection per calling thread left
    every ended thread's gevent hub behind (an epoll and an eventfd, a resolver thread): a
    thread per request ran out of file descriptors. Holds no reference to its CMGClient
    (an unclosed one is collected, and ends these threads)."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._closed = False
        self._after_fork()
        _HTTP_POOLS.add(self)

    def _after_fork(self) -> None:
        """Fresh state (also in a forked child: the parent's threads are not there, and a fork
        while a call held the lock left it locked there for good)."""
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._busy = 0  # calls given and not yet answered
        self._pid = os.getpid()

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return functools.partial(self._run, method)

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        done, answer = threading.Event(), []
        if self._pid != os.getpid():  # forked without Python's fork hooks (uWSGI forks in C)
            with _FORK_RESET:
                if self._pid != os.getpid():
                    self._after_fork()
        with self._lock:
            if self._closed:  # a call that began before close(): no thread started that nothing ends
                raise CMGError("the HTTP client is closed")
            self._busy += 1
            if self._busy > len(self._threads) and len(self._threads) < HTTP_THREADS:
                thread = threading.Thread(target=self._work, name=f"cmg-http-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
            self._jobs.put((method, args, kwargs, answer, done))
        done.wait()
        ok, value = answer[0]
        if not ok:
            raise value
        return value

    def _work(self) -> None:
        import gevent
        from gevent import monkey

        greenlet = monkey.is_module_patched("threading")  # then this "thread" runs on the app's own hub
        connection = None
        try:
            while (job := self._jobs.get()) is not None:
                method, args, kwargs, answer, done = job
                try:
                    connection = connection or self._connect()
                    answer.append((True, getattr(connection, method)(*args, **kwargs)))
                except BaseException as exc:  # noqa: BLE001 - the caller's to raise (gevent.Timeout too)
                    answer.append((False, exc))
                with self._lock:
                    self._busy -= 1
                # nothing of the call kept while idle, from before the caller wakes: a failed
                # call's traceback holds its CMGClient, which would never be collected (nor end
                # these threads)
                finished = done
                job = method = args = kwargs = answer = done = None
                finished.set()
                finished = None
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.close()
            if not greenlet:
                gevent.get_hub().destroy(destroy_loop=True)  # in its own thread: its epoll, eventfd and threads go

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout_s: float) -> None:
        """End the threads once their calls are answered (each waited for up to timeout_s)."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
            for _ in threads:
                self._jobs.put(None)
        for thread in threads:
            if thread is not threading.current_thread():  # collected unclosed, by one of its own threads
                thread.join(timeout_s)


_HTTP_POOLS: weakref.WeakSet[_HTTPThreads] = weakref.WeakSet()
_FORK_RESET = threading.Lock()  # a pool's state made again in a child forked without the hooks below


def _after_fork_in_child() -> None:
    global _FORK_RESET
    _FORK_RESET = threading.Lock()
    for pool in list(_HTTP_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _hold(path: Path) -> int:
    """A shared lock on a region's file, held by this process until close() or its death (the
    kernel drops it however the process dies): what tells other clients the owner is alive.
    A region another client's sweep removed before the lock was taken is refused."""
    import fcntl  # POSIX-only, as system shared memory is

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise CMGError(f"shared memory region {path} was removed while it was being made: try again")
    return fd


SHM_MAKING_S = 10.0  # a held region's file younger than this is still being made: not judged


@contextlib.contextmanager
def _abandoned(path: Path) -> Iterator[bool]:
    """Whether a region's file was left by a dead owner: gone, or free of its owner's lock (asked
    only of regions whose name says they are held: an older client holds none). While the body
    runs the lock is ours, so a client making a region of that name cannot take it meanwhile."""
    import fcntl  # POSIX-only, as system shared memory is

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    except OSError:  # another account's: not ours to judge
        yield False
        return
    try:
        if time.time() - os.fstat(fd).st_ctime < SHM_MAKING_S:  # its maker may not have locked it yet
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _region_unknown(exc: InferError) -> bool:
    """The server does not know a region this client registered (it restarted)."""
    return "unable to find shared memory region" in str(exc).lower()


def glob_files(pattern: str) -> list[Path]:
    """The files a quoted pattern names (`'DIR/*.png'`, `'DIR/*'`, `**` across folders), sorted.
    A pattern whose name part leaves the suffix open (`*`, `cam1_*`) keeps the names with an
    image suffix, as a folder walk does (a sidecar .json or .npy beside the frames is no
    frame); one that spells its suffix (`*.jfif`) keeps what it names. A name whose link
    leads nowhere is kept, for its error line."""
    suffix = Path(pattern).suffix
    spelt = bool(suffix) and not is_pattern(suffix)
    found = _walk_glob(pattern) if "**" in Path(pattern).parts else glob.glob(_literal_folders(pattern))
    return [Path(p) for p in sorted(found) if not Path(p).is_dir() and (spelt or image_name(Path(p)))]


def _walk_glob(pattern: str) -> list[str]:
    """What glob's `**` matches, found by a folder walk that never follows a link back up its
    own path (glob did: two links back to a parent were exponentially many paths, and `cmg
    infer` hung expanding them; one named the same frame 41 times), enters only folders that
    can still lead to a match (from the literal folders the pattern starts with: a missing
    one is no match, not a walk of the whole disk), and names each file once (a folder
    reached by two links: the first path in sorted order)."""
    parts = Path(pattern).parts
    n = _literal_prefix(parts, parts.index("**"))
    base, rest = (os.path.join(*parts[:n]) if n else "."), parts[n:]
    if not os.path.isdir(base):
        return []
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    ancestors = {base: (os.path.realpath(base),)}  # each folder's real path and its parents'
    for folder, dirs, files in os.walk(base, followlinks=True):
        rel = Path(os.path.relpath(folder, base)).parts if folder != base else ()
        chain = ancestors.pop(folder)
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, d))
            if real not in chain and _parts_match(rest, (*rel, d), prefix=True):
                ancestors[os.path.join(folder, d)] = (*chain, real)
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if _parts_match(rest, (*rel, name)) and (chain[-1], name) not in seen:
                seen.add((chain[-1], name))
                out.append(os.path.join(*parts[:n], *rel, name))
    return out


def _parts_match(pattern: tuple[str, ...], names: tuple[str, ...], prefix: bool = False) -> bool:
    """glob's rules per path part: `**` is any number of visible folders, a hidden name is
    matched only by a pattern part that starts with a dot. `prefix`: whether `names` (a
    folder) can still lead to a match."""
    if not names:
        return prefix or not pattern or pattern == ("**",)
    if not pattern:
        return False
    if pattern[0] == "**":
        return ((visible(Path(names[0])) and _parts_match(pattern, names[1:], prefix))
                or _parts_match(pattern[1:], names, prefix))
    return ((visible(Path(names[0])) or pattern[0].startswith(".")) and fnmatch.fnmatchcase(names[0], pattern[0])
            and _parts_match(pattern[1:], names[1:], prefix))


def _literal_prefix(parts: tuple[str, ...], stop: int) -> int:
    """How many of the first `stop` parts are folders as written: no pattern characters, or a
    folder of that name (`cam [1]` is that folder, not the pattern `cam 1`)."""
    n = 0
    while n < stop and (not is_pattern(parts[n]) or os.path.isdir(os.path.join(*parts[:n + 1]))):
        n += 1
    return n


def _literal_folders(pattern: str) -> str:
    """The pattern with its leading folders that exist as written taken literally (escaped)."""
    parts = Path(pattern).parts
    n = _literal_prefix(parts, len(parts) - 1)
    head = os.path.join(*parts[:n]) if n else ""
    return os.path.join(glob.escape(head), *parts[n:]) if is_pattern(head) else pattern


def no_match(pattern: str | Path) -> CMGError:
    return CMGError(f"glob {pattern} matches no files (a pattern that leaves the suffix open reads "
                    f"{', '.join(IMAGE_SUFFIXES)})")


def is_pattern(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def iter_image_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files and quoted patterns into their
    files; plain files are kept as given (a name with [ ] that exists is that file).
    Symlinked folders are followed (each real folder once: no loops); an image name whose
    link leads nowhere is kept, so it gets an error line like any unreadable frame."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not os.path.lexists(p) and is_pattern(str(p)):
            matched = glob_files(str(p))
            if not matched:
                raise no_match(p)
            out.extend(matched)
            continue
        if not p.is_dir():
            out.append(p)
            continue
        found, seen = [], set()
        for folder, dirs, files in os.walk(p, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            # sorted: which path reaches a folder linked twice is the first in sorted order, every run;
            # hidden names skipped: macOS copies add an AppleDouble `._NAME.png` (no image) beside every file
            dirs[:] = sorted(d for d in dirs if visible(Path(d)))
            found += [Path(folder, f) for f in files if image_name(Path(f))]
        out.extend(sorted(found))
    return out

