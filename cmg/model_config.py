"""The one Triton model-config type and everything the project does with one.

The type is Triton's own `ModelConfig` protobuf (shipped with tritonclient). `cmg build`
generates it (cmg_build.config) and writes it here as config.pbtxt; the build's checks and
`cmg deploy` read and edit it here; clients read it from a live server here (gRPC or
HTTP, never as loose JSON dicts). It owns the calibrated default threshold's parameter.
Core layer: the clients and the triton layer both use it; imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from cmg.contract import THRESHOLD, threshold_value
from cmg.errors import CMGError

ModelConfig = mc.ModelConfig
DEFAULT_THRESHOLD = "default_threshold"  # ensemble parameter: the calibrated threshold (GPU targets)
INTRA_OP_THREADS = "intra_op_threads"  # cpu target: ONNX Runtime threads per instance, written resolved
ORT_INTRA_OP_THREADS = "intra_op_thread_count"  # the same for Triton's ONNX Runtime backend (onnxruntime --kind cpu)
THREAD_PARAMETERS = (INTRA_OP_THREADS, ORT_INTRA_OP_THREADS)  # settings of the repository's machine, not of a run


def parse(text: str, where: str = "config") -> ModelConfig:
    """config.pbtxt text -> ModelConfig; CMGError naming `where` on any error."""
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as exc:
        raise CMGError(f"{where}: not a valid Triton ModelConfig: {exc}") from exc


def read(path: Path) -> ModelConfig:
    """A config.pbtxt file -> ModelConfig; CMGError naming the file on any error."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CMGError(f"{path}: not a valid Triton ModelConfig: {exc}") from exc
    return parse(text, str(path))


def text(cfg: ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def write(cfg: ModelConfig, model_dir: Path) -> Path:
    """MODEL_DIR/config.pbtxt (the folder is made)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text(cfg))
    return path


def from_json(d: dict) -> ModelConfig:
    """Triton's JSON form (HTTP's model config, gRPC's `as_json`) -> ModelConfig."""
    try:
        return json_format.ParseDict(d, ModelConfig(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise CMGError(f"model config {d.get('name', '?')!r}: not a valid Triton ModelConfig: {exc}") from exc


def from_server(client: Any, model: str, version: str = "", **kwargs: Any) -> ModelConfig:
    """A live server's config of `model`, from a tritonclient gRPC or HTTP client (`kwargs`:
    the client's own options, e.g. gRPC's client_timeout)."""
    got = client.get_model_config(model, version, **kwargs)
    if isinstance(got, dict):  # the HTTP client answers JSON
        return from_json(got.get("config", got))
    return got.config  # gRPC: ModelConfigResponse


def default_threshold(cfg: ModelConfig) -> float | None:
    """The calibrated threshold an ensemble's config carries (None when it carries none)."""
    param = cfg.parameters.get(DEFAULT_THRESHOLD)
    return float(param.string_value) if param is not None and param.string_value else None


def set_default_threshold(cfg: ModelConfig, value: float | None) -> None:
    """Carry `value` as the calibrated threshold, or none (None)."""
    if value is None:
        if DEFAULT_THRESHOLD in cfg.parameters:
            del cfg.parameters[DEFAULT_THRESHOLD]
        return
    cfg.parameters[DEFAULT_THRESHOLD].string_value = repr(float(value))


def threshold_to_send(cfg: ModelConfig) -> float | None:
    """What to send as THRESHOLD when the caller gives none.

    On the cpu target THRESHOLD is optional (None: the encoder's own default applies). On
    the GPU targets every step is an engine, which has no input defaults, so THRESHOLD is
    required and the calibrated value travels in the parameter `default_threshold`.
    """
    thr = next((t for t in cfg.input if t.name == THRESHOLD), None)
    if thr is None or thr.optional:
        return None
    param = cfg.parameters.get(DEFAULT_THRESHOLD)
    if param is None or not param.string_value:
        raise CMGError(f"model '{cfg.name}' requires {THRESHOLD} but its config has no "
                       f"{DEFAULT_THRESHOLD} parameter: pass a threshold, or rebuild the repository")
    try:
        return threshold_value(param.string_value)
    except ValueError as exc:
        raise CMGError(str(exc)) from None


class CalibratedThreshold:
    """The THRESHOLD a client sends when its caller gives none (`threshold_to_send`), kept per
    ensemble version. Why per version: `cmg deploy` switches the ensemble to another run with
    its own calibrated threshold, and a frame answered by that version must be flagged at
    that run's threshold, not at the one read when the client connected."""

    def __init__(self, cfg: ModelConfig, ready: Sequence[str] = ()) -> None:
        self.value: float | None = None  # what the next frames are sent with (None: nothing to send)
        self._by_version: dict[str, float] = {}
        self.learn(cfg, ready)

    def learn(self, cfg: ModelConfig, ready: Sequence[str] = ()) -> float | None:
        """Take a config just read from the server: its threshold is what the next frames are
        sent with, and the threshold of the one version it serves (the one it is pinned to
        during a deploy, else the one the server names ready)."""
        self.value = threshold_to_send(cfg)
        policy = cfg.version_policy
        served = [str(v) for v in policy.specific.versions] if policy.HasField("specific") else list(ready)
        if self.value is not None and len(served) == 1:
            self._by_version[served[0]] = self.value
        return self.value

    def known(self, version: str | None) -> bool:
        """Whether `version`'s threshold is known (None: the server named no version)."""
        return version is None or version in self._by_version

    def resend_with(self, version: str | None, sent: float) -> float | None:
        """The threshold to score again with when `version` answered a frame sent with `sent`
        (its own, or the served config's when the server moved on again); None: the answer stands.
        A known version that answers is what the server serves now (after a deploy undone, an
        older one again): the next frames are sent with its threshold."""
        if version in self._by_version:
            self.value = self._by_version[version]
        want = self.value
        return None if want is None or want == sent else want


def intra_op_threads(cfg: ModelConfig, where: str = "config") -> int:
    """ONNX Runtime threads per instance that a built cpu-target model's config sets (what its
    model.py uses; the bench's in-process modes read the same number)."""
    try:
        threads = int(cfg.parameters[INTRA_OP_THREADS].string_value)
    except (KeyError, ValueError) as exc:
        raise CMGError(f"{where}: no integer parameter {INTRA_OP_THREADS} (a cpu-target repository?)") from exc
    if threads < 1:
        raise CMGError(f"{where}: {INTRA_OP_THREADS} {threads}; rebuild with `cmg build` (it writes the resolved count)")
    return threads
