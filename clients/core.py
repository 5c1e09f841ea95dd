"""The one client core: what a request to a CMG ensemble looks like, how its answer is
read, and which failures are worth retrying.

`cmg infer`, `cmg stream`, `cmg bench` and the tests build every request here, so the
tensor names and dtypes (derived from `cmg.contract`, never spelled out), the Triton
2.47-2.51 all-outputs workaround, the default ports and the retry rules exist once.
Imports neither torch nor tritonclient: callers pass the tritonclient module they use
(`tritonclient.grpc`, `tritonclient.http`; the gRPC aio client takes the grpc classes).
"""

from __future__ import annotations

import math
import random
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmg import contract as C
from cmg.contract import Contract, ModelSpec, TensorSpec
from cmg.endpoints import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, LOOPBACK
from cmg.errors import CMGError

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": DEFAULT_GRPC_PORT, "http": DEFAULT_HTTP_PORT}

# Names and dtypes of the ensembles' tensors; dims depend on the run and come from the
# server's metadata (`contract_from_metadata`). Both ensembles share one interface.
_NAMES_ONLY = Contract(1, 1, 1, 0)
ENSEMBLE: ModelSpec = _NAMES_ONLY.models[C.CMG]
IMAGE: TensorSpec = ENSEMBLE.input(C.IMAGE)
THRESHOLD: TensorSpec = ENSEMBLE.input(C.THRESHOLD)
OUTPUTS: tuple[str, ...] = tuple(t.name for t in ENSEMBLE.outputs)
# Sends of one frame at most when the version that answers has another calibrated threshold
# than the one sent (GPU targets through a `cmg deploy`; `CalibratedThreshold`).
RESCORES = 3


# -- addresses and arguments ------------------------------------------------------------
def default_url(protocol: str = "grpc") -> str:
    """Where `cmg serve` listens by default for `protocol`."""
    return f"{LOOPBACK}:{DEFAULT_PORTS[protocol]}"


def normalize_url(url: str, protocol: str = "grpc") -> str:
    """`HOST:PORT` as tritonclient wants it; accepts `grpc://`/`http://` prefixes and a bare host."""
    if protocol not in PROTOCOLS:
        raise CMGError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme.lower() != protocol:  # an HTTP URL spoken to in gRPC fails as "unreachable ... Socket closed"
            flag = "" if protocol == "http" else " (--http speaks HTTP)"
            raise CMGError(f"server URL {url!r} is a {scheme} URL but the client speaks {protocol}{flag}: "
                           f"give HOST:PORT of the server's {protocol} port (default {DEFAULT_PORTS[protocol]})")
        url = rest
    url = url.rstrip("/")
    if not url:
        raise CMGError("empty server URL")
    if ":" not in url:
        url = f"{url}:{DEFAULT_PORTS[protocol]}"
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CMGError(f"server URL {url!r}: expected HOST:PORT with a port in 1..65535")
    return url


def finite_threshold(value: float | None) -> float | None:
    """None (the server's calibrated threshold) or a number finite in FP32
    (`cmg.contract.threshold_value`, the one check); CMGError otherwise."""
    if value is None:
        return None
    try:
        return C.threshold_value(value)
    except ValueError as exc:
        raise CMGError(str(exc)) from None


MAX_TIMEOUT_S = 1e6  # about 11 days; gRPC's deadline arithmetic overflows near 1e10 s


def positive_seconds(value: float, what: str = "timeout") -> float:
    """A deadline of 0 (or less) fails every request before it is sent; one past
    MAX_TIMEOUT_S made gRPC report "Deadline Exceeded" at once."""
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise CMGError(f"{what} must be a number of seconds > 0, got {value!r}")
    if number > MAX_TIMEOUT_S:
        raise CMGError(f"{what} must be at most {MAX_TIMEOUT_S:g} s, got {value!r}")
    return number


# -- channels ---------------------------------------------------------------------------
def grpc_channel_args(mod: Any) -> list[tuple[str, Any]]:
    """Options for a gRPC channel of `mod` (tritonclient.grpc or its aio module): tritonclient's
    own (message size, keepalive: `channel_args` replaces them) and a short reconnect backoff.
    gRPC's own grows to 2 minutes, and channels with the same options share it: a client (and a
    fresh one in the same process) answered "Connection refused" for ~20 s after its server was back."""
    keep = mod.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", mod.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", mod.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        # not grpc.min_reconnect_backoff_ms: gRPC core reads it as each attempt's minimum connect
        # timeout (20 s by default), and 100 ms gave no slow link or loaded host time to connect
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


# -- requests ---------------------------------------------------------------------------
def threshold_values(n: int, value: float) -> np.ndarray:
    """THRESHOLD for a batch of `n`: the same finite value per item."""
    return np.full((n, *THRESHOLD.dims), finite_threshold(value), dtype=THRESHOLD.np_dtype)


def build_inputs(mod: Any, frames: np.ndarray, threshold: float | None = None, data: bool = True) -> list:
    """IMAGE (and THRESHOLD if given) as `mod.InferInput`s for UINT8 frames [B, H, W, 3].

    With `data=False` the inputs carry no bytes (the caller points them at shared memory).
    """
    frames = np.ascontiguousarray(frames)
    if frames.dtype != IMAGE.np_dtype:
        raise CMGError(f"{C.IMAGE}: frames of dtype {frames.dtype}, expected {IMAGE.np_dtype} ({IMAGE.dtype})")
    image = mod.InferInput(C.IMAGE, list(frames.shape), IMAGE.dtype)
    inputs = [image]
    if data:
        image.set_data_from_numpy(frames)
    if threshold is not None:
        values = threshold_values(frames.shape[0], threshold)
        thr = mod.InferInput(C.THRESHOLD, list(values.shape), THRESHOLD.dtype)
        if data:
            thr.set_data_from_numpy(values)
        inputs.append(thr)
    return inputs


def requested_outputs(mod: Any) -> list:
    """Every ensemble output, always.

    Triton 2.47-2.51 answers an ensemble request that names only some outputs with
    "unexpected deadlock" (triton-inference-server/server#7482), so no client here asks
    for a subset; the outputs are small (a score, a flag and three G x G maps).
    """
    return [mod.InferRequestedOutput(name) for name in OUTPUTS]


def output_specs(contract: Contract, model: str = C.CMG) -> dict[str, TensorSpec]:
    """The ensemble's outputs with this run's dims (for shared memory layouts and empty answers)."""
    return {t.name: t for t in contract.models[model].outputs}


def output_bytes(contract: Contract, model: str = C.CMG) -> dict[str, int]:
    """Bytes per batch item of every output."""
    return {name: int(np.prod(t.dims)) * t.np_dtype.itemsize for name, t in output_specs(contract, model).items()}


def empty_outputs(contract: Contract, model: str = C.CMG) -> dict[str, np.ndarray]:
    """An answer for zero frames, shaped like a real one."""
    return {name: np.zeros((0, *t.dims), t.np_dtype) for name, t in output_specs(contract, model).items()}


# -- answers ----------------------------------------------------------------------------
def decode(result: Any) -> dict[str, np.ndarray]:
    """Every ensemble output of a tritonclient InferResult as numpy, by name."""
    arrays = {}
    for name in OUTPUTS:
        value = result.as_numpy(name)
        if value is None:
            raise CMGError(f"the server's answer has no {name} output: is the model a CMG ensemble?")
        arrays[name] = value
    return arrays


def model_version(result: Any) -> str | None:
    """The version of the model that answered, as Triton's response names it (gRPC and HTTP)."""
    response = result.get_response()
    version = response.get("model_version") if isinstance(response, dict) else response.model_version
    return str(version) if version not in (None, "") else None


@dataclass
class Result:
    """One frame's answer from the ensemble."""

    score: float
    is_anomaly: bool
    anomaly_map: np.ndarray  # FP32 [M, M], zero where the keep-mask discarded the pixels
    patch_scores: np.ndarray  # FP32 [G, G], CMER relevance
    keep_mask: np.ndarray  # UINT8 [G, G]

    def to_json(self) -> dict[str, Any]:
        """The scalar part, for JSON lines (maps are kept out: they are per-frame arrays)."""
        return {"score": self.score, "is_anomaly": self.is_anomaly}


def scalars(arrays: dict[str, np.ndarray], index: int = 0) -> dict[str, Any]:
    """Score and flag of one batch item, as a JSON line carries them."""
    return {"score": float(arrays[C.ANOMALY_SCORE].reshape(-1)[index]),
            "is_anomaly": bool(arrays[C.IS_ANOMALY].reshape(-1)[index])}


def results_from_arrays(outputs: dict[str, np.ndarray]) -> list[Result]:
    """Split batched output arrays into per-frame Results."""
    score = outputs[C.ANOMALY_SCORE].reshape(-1)
    flag = outputs[C.IS_ANOMALY].reshape(-1)
    return [
        Result(
            score=float(score[i]),
            is_anomaly=bool(flag[i]),
            anomaly_map=np.array(outputs[C.ANOMALY_MAP][i], dtype=np.float32),
            patch_scores=np.array(outputs[C.PATCH_SCORES][i], dtype=np.float32),
            keep_mask=np.array(outputs[C.KEEP_MASK][i], dtype=np.uint8),
        )
        for i in range(score.shape[0])
    ]


def _tensor_dims(entries: list[dict], name: str, model: str) -> list[int]:
    for e in entries:
        if e["name"] == name:
            return [int(d) for d in e["shape"]]
    raise CMGError(f"model '{model}' has no tensor {name}: is it a CMG ensemble?")


def contract_from_metadata(metadata: dict, model: str) -> Contract:
    """H, W from IMAGE, G from KEEP_MASK, M from ANOMALY_MAP; the ensemble does not expose D (0)."""
    image = _tensor_dims(metadata["inputs"], C.IMAGE, model)
    amap = _tensor_dims(metadata["outputs"], C.ANOMALY_MAP, model)
    keep = _tensor_dims(metadata["outputs"], C.KEEP_MASK, model)
    if len(image) != 4 or image[-1] != 3 or len(amap) != 3 or len(keep) != 3:
        raise CMGError(f"model '{model}': {C.IMAGE} {image} / {C.ANOMALY_MAP} {amap} / {C.KEEP_MASK} {keep} "
                       "do not match the CMG contract")
    return Contract(height=image[1], width=image[2], grid=keep[-1], embed_dim=0, map_size=amap[-1])


# -- failures and retries ---------------------------------------------------------------
TRANSIENT = "transient"  # not now: the same request may well succeed later
DEADLINE = "deadline"  # no answer within the client's deadline
PERMANENT = "permanent"  # about this request: sending it again gets the same answer

# gRPC codes that mean "the server (or a path to it) is not available right now".
_TRANSIENT_GRPC = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
    "StatusCode.CANCELLED",
    "StatusCode.UNKNOWN",  # a stream torn down mid-call (server process gone)
}
_TRANSIENT_HTTP = {"429", "502", "503"}
_DEADLINE_STATUS = {"StatusCode.DEADLINE_EXCEEDED", "504"}
# What Triton answers, with NOT_FOUND, INVALID_ARG or INTERNAL, while a model unloads or
# reloads or the server stops gracefully. The client checked the model was ready before
# it started, so here these mean "not now" (they are retried within the retry budget;
# a model that never comes back exhausts it and stops the client, never a silent loss).
_TRANSIENT_MESSAGES = (
    "has no available versions",
    "unknown model",
    "is not found",
    "is not ready",
    "is not healthy",  # Python-backend stub killed under a request
    "stub process",
    "server is stopping",
    "server is not ready",
    "unloading",
    "socket closed",
)
# Status codes after which the channel may be dead: reconnect before trying again.
_RECONNECT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
              "StatusCode.UNKNOWN"}


@dataclass(frozen=True)
class Failure:
    """What a failed call means: its kind, Triton's status (if any), and the message."""

    kind: str
    status: str | None
    message: str
    reconnect: bool = False

    def line(self) -> str:
        return f"{self.status}: {self.message}" if self.status else self.message


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return True
    return type(exc).__name__ == "Timeout" and type(exc).__module__.startswith("gevent")


# Triton's answer to a call of an API restricted to callers with a header (`cmg serve`'s admin
# key, cmg_build.server): "This API is restricted, ..." (HTTP), "This protocol is restricted, ..." (gRPC).
RESTRICTED_MARK = "is restricted, expecting header"
RESTRICTED_HINT = ("the server restricts this API to callers with its admin key: `cmg serve` restricts "
                   "shared memory when bound beyond loopback (score without --shm) and, in explicit mode, "
                   "the model repository (load, unload, the model list)")


def classify(exc: BaseException) -> Failure:
    """The retry rule for every client: transient, deadline or permanent."""
    status_fn = getattr(exc, "status", None)
    message_fn = getattr(exc, "message", None)
    if callable(status_fn) and callable(message_fn):  # tritonclient's InferenceServerException
        status = status_fn()
        status = None if status is None else str(status)
        message = str(message_fn() or "")
        if RESTRICTED_MARK in message:  # gRPC says UNAVAILABLE, but no retry will carry the key
            return Failure(PERMANENT, status, message)
        if status in _DEADLINE_STATUS:
            return Failure(DEADLINE, status, message, reconnect=True)
        if _is_timeout_message(message) and status is None:
            return Failure(DEADLINE, status, message, reconnect=True)
        if status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP:
            return Failure(TRANSIENT, status, message, reconnect=status in _RECONNECT)
        low = message.lower()
        if any(m in low for m in _TRANSIENT_MESSAGES):
            return Failure(TRANSIENT, status, message)
        if status is None:  # raised by the client library itself (transport trouble)
            return Failure(TRANSIENT, status, message, reconnect=True)
        return Failure(PERMANENT, status, message)
    if _is_timeout(exc):
        return Failure(DEADLINE, None, f"{type(exc).__name__}: {exc}", reconnect=True)
    if isinstance(exc, (ConnectionError, OSError)):
        return Failure(TRANSIENT, None, f"{type(exc).__name__}: {exc}", reconnect=True)
    return Failure(PERMANENT, None, f"{type(exc).__name__}: {exc}")


def _is_timeout_message(message: str) -> bool:
    low = message.lower()
    return "timed out" in low or "deadline" in low


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a frame is retried after transient failures."""

    max_retries: int = 30  # per request; < 0: without limit
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0

    def exhausted(self, attempt: int) -> bool:
        """True when `attempt` failures are more than the budget allows."""
        return 0 <= self.max_retries < attempt

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (so many clients do not retry in lockstep)."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return base * (0.5 + random.random() / 2)
