"""Synchronous Triton client for the `cmg` ensembles (gRPC by default, HTTP on request).

The server is the source of truth for frame size, grid and batch limit: the client reads
them from the model's metadata and config, so no run folder is needed on the client host.
Imports no torch (tests check it): it runs on line PCs that only have numpy and Pillow.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmg import contract as C
from cmg.contract import Contract
from cmg.errors import CMGError
from cmg.frames import load_frame, to_frame

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
OUTPUTS = (C.ANOMALY_SCORE, C.IS_ANOMALY, C.ANOMALY_MAP, C.PATCH_SCORES, C.KEEP_MASK)

ImageLike = str | Path | bytes | np.ndarray | Image.Image


class InferError(CMGError):
    """Triton refused a request; `status` keeps Triton's code (e.g. StatusCode.INVALID_ARGUMENT)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Result:
    """One frame's answer from the ensemble."""

    score: float
    is_anomaly: bool
    anomaly_map: np.ndarray  # FP32 [G, G], zero where the keep-mask discarded the patch
    patch_scores: np.ndarray  # FP32 [G, G], CMER relevance
    keep_mask: np.ndarray  # UINT8 [G, G]

    def to_json(self) -> dict[str, Any]:
        """The scalar part, for JSON lines (maps are kept out: they are per-frame arrays)."""
        return {"score": self.score, "is_anomaly": self.is_anomaly}


def normalize_url(url: str, protocol: str = "grpc") -> str:
    """`HOST:PORT` as tritonclient wants it; accepts `grpc://`/`http://` prefixes and a bare host."""
    for prefix in ("grpc://", "http://", "https://"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
    url = url.rstrip("/")
    if not url:
        raise CMGError("empty server URL")
    if ":" not in url:
        url = f"{url}:{DEFAULT_PORTS[protocol]}"
    return url


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
    """H, W from IMAGE and G from ANOMALY_MAP; the ensemble does not expose D (set to 0)."""
    image = _tensor_dims(metadata["inputs"], C.IMAGE, model)
    amap = _tensor_dims(metadata["outputs"], C.ANOMALY_MAP, model)
    if len(image) != 4 or image[-1] != 3 or len(amap) != 3:
        raise CMGError(f"model '{model}': IMAGE {image} / ANOMALY_MAP {amap} do not match the CMG contract")
    return Contract(height=image[1], width=image[2], grid=amap[-1], embed_dim=0)


class CMGClient:
    """Scores frames on a running Triton server.

    Batches are split into chunks of the model's max_batch_size. With `shm=True` the
    tensors travel through system shared memory regions registered with the server
    (same host only) and are unregistered and destroyed on `close()`.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        model: str = C.CMG,
        contract: Contract | None = None,
        shm: bool = False,
        timeout_s: float = 10.0,
    ):
        if protocol not in PROTOCOLS:
            raise CMGError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.url = normalize_url(url, protocol)
        self.model = model
        self.timeout_s = float(timeout_s)
        self._shm_regions: list[tuple[str, Any]] = []
        self._shm_layout: dict[str, Any] | None = None
        self._client = self._connect()
        try:
            self._check_ready()
            metadata, config = self._read_model()
            self.contract = contract or contract_from_metadata(metadata, model)
            self.max_batch = max(1, int(config.get("max_batch_size", 1) or 1))
            self.use_shm = shm
            if shm:
                self._setup_shm()
        except BaseException:
            self.close()
            raise

    # -- connection -------------------------------------------------------------------
    def _connect(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        self._mod = mod
        try:
            if self.protocol == "grpc":
                return mod.InferenceServerClient(self.url)
            return mod.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        except Exception as exc:  # bad URL syntax
            raise CMGError(f"cannot create a {self.protocol} client for {self.url}: {exc}") from exc

    def _call(self, what: str, fn, *args, **kwargs):
        """Run a tritonclient call, turning transport failures into messages naming the URL."""
        from tritonclient.utils import InferenceServerException

        if self.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            status = exc.status()
            if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
                raise InferError(
                    f"Triton server at {self.url} ({self.protocol}) unreachable during {what}: {exc.message()}",
                    status,
                ) from exc
            raise InferError(f"{what} on model '{self.model}' at {self.url}: {exc.message()}", status) from exc
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise InferError(
                f"Triton server at {self.url} ({self.protocol}) unreachable during {what}: {exc}",
                "UNAVAILABLE",
            ) from exc
        except Exception as exc:  # geventhttpclient raises its own types for refused/timeouts
            if self.protocol == "http" and type(exc).__module__.startswith(("gevent", "geventhttpclient")):
                raise InferError(
                    f"Triton server at {self.url} (http) unreachable during {what}: {exc}", "UNAVAILABLE"
                ) from exc
            raise

    def _check_ready(self) -> None:
        if not self._call("server readiness check", self._client.is_server_ready):
            raise CMGError(f"Triton server at {self.url} is up but not ready")
        if not self._call("model readiness check", self._client.is_model_ready, self.model):
            names = self._model_names()
            raise CMGError(
                f"model '{self.model}' is not ready on {self.url} (models there: {', '.join(names) or 'none'})"
            )

    def _model_names(self) -> list[str]:
        try:
            index = self._call("repository index", self._client.get_model_repository_index)
        except CMGError:
            return []
        if self.protocol == "grpc":
            return sorted(m.name for m in index.models)
        return sorted(m["name"] for m in index)

    def _read_model(self) -> tuple[dict, dict]:
        if self.protocol == "grpc":
            meta = self._call("model metadata", self._client.get_model_metadata, self.model, as_json=True)
            cfg = self._call("model config", self._client.get_model_config, self.model, as_json=True)
            return meta, cfg.get("config", cfg)
        meta = self._call("model metadata", self._client.get_model_metadata, self.model)
        cfg = self._call("model config", self._client.get_model_config, self.model)
        return meta, cfg

    # -- frames -----------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        return (self.contract.height, self.contract.width)

    def frames(self, images: np.ndarray | Sequence[ImageLike]) -> np.ndarray:
        """Images, paths or a batch array -> UINT8 [B, H, W, 3] via cmg.frames (the one conversion)."""
        spec = self.contract.image()
        if isinstance(images, np.ndarray) and images.ndim == 4:
            batch = images
            try:
                spec.check(batch)
                return np.ascontiguousarray(batch)
            except ValueError:
                return np.stack([to_frame(f, self.size) for f in batch])
        if isinstance(images, (str, Path, bytes, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        out = [self.frame(im) for im in images]
        if not out:
            return np.zeros((0, *spec.dims), dtype=np.uint8)
        return np.stack(out)

    def frame(self, image: ImageLike) -> np.ndarray:
        if isinstance(image, (str, Path, bytes)):
            return load_frame(image, self.size)
        return to_frame(image, self.size)

    # -- inference --------------------------------------------------------------------
    def infer(
        self,
        images: np.ndarray | Sequence[ImageLike],
        threshold: float | None = None,
        batch_size: int | None = None,
    ) -> list[Result]:
        """Score frames; chunks of at most max_batch (or `batch_size`) per request."""
        return results_from_arrays(self.infer_arrays(self.frames(images), threshold, batch_size))

    def infer_arrays(
        self, frames: np.ndarray, threshold: float | None = None, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Raw batched outputs for UINT8 [B, H, W, 3] frames (sent as given: no checks here)."""
        step = self.max_batch if not batch_size else max(1, min(int(batch_size), self.max_batch))
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, frames.shape[0], step):
            parts.append(self._infer_chunk(frames[start : start + step], threshold))
        if not parts:
            g = self.contract.grid
            return {
                C.ANOMALY_SCORE: np.zeros((0, 1), np.float32),
                C.IS_ANOMALY: np.zeros((0, 1), bool),
                C.ANOMALY_MAP: np.zeros((0, g, g), np.float32),
                C.PATCH_SCORES: np.zeros((0, g, g), np.float32),
                C.KEEP_MASK: np.zeros((0, g, g), np.uint8),
            }
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}

    def _infer_chunk(self, frames: np.ndarray, threshold: float | None) -> dict[str, np.ndarray]:
        mod = self._mod
        n = frames.shape[0]
        image = mod.InferInput(C.IMAGE, list(frames.shape), _triton_dtype(frames.dtype))
        inputs = [image]
        thr = None
        if threshold is not None:
            thr = np.full((n, 1), float(threshold), dtype=np.float32)
            inputs.append(mod.InferInput(C.THRESHOLD, [n, 1], "FP32"))
        outputs = [mod.InferRequestedOutput(name) for name in OUTPUTS]
        if not self.use_shm:
            image.set_data_from_numpy(frames)
            if thr is not None:
                inputs[1].set_data_from_numpy(thr)
            result = self._call("inference", self._client.infer, self.model, inputs, outputs=outputs)
            return {name: result.as_numpy(name) for name in OUTPUTS}
        return self._infer_shm(frames, thr, inputs, outputs)

    # -- system shared memory ---------------------------------------------------------
    def _setup_shm(self) -> None:
        """One input and one output region sized for a full batch, registered once."""
        import tritonclient.utils.shared_memory as shm

        g, b = self.contract.grid, self.max_batch
        spec = self.contract.image()
        image_bytes = b * int(np.prod(spec.dims))
        in_layout = {C.IMAGE: (0, image_bytes), C.THRESHOLD: (image_bytes, b * 4)}
        sizes = {
            C.ANOMALY_SCORE: (4, (1,), np.float32),
            C.IS_ANOMALY: (1, (1,), np.bool_),
            C.ANOMALY_MAP: (4 * g * g, (g, g), np.float32),
            C.PATCH_SCORES: (4 * g * g, (g, g), np.float32),
            C.KEEP_MASK: (g * g, (g, g), np.uint8),
        }
        out_layout, offset = {}, 0
        for name in OUTPUTS:
            per, shape, dtype = sizes[name]
            out_layout[name] = (offset, per * b, per, shape, dtype)
            offset += -(-per * b // 64) * 64  # keep each output 64-byte aligned
        tag = f"cmg_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        for kind, nbytes in (("in", image_bytes + b * 4), ("out", offset)):
            name = f"{tag}_{kind}"
            try:
                handle = shm.create_shared_memory_region(name, f"/{name}", nbytes)
            except Exception as exc:
                raise CMGError(f"cannot create shared memory region /{name} ({nbytes} bytes): {exc}") from exc
            self._shm_regions.append((name, handle))
            self._call(
                f"shared memory registration of /{name}",
                self._client.register_system_shared_memory,
                name,
                f"/{name}",
                nbytes,
            )
        self._shm_layout = {"tag": tag, "in": in_layout, "out": out_layout}

    def _infer_shm(self, frames, thr, inputs, outputs) -> dict[str, np.ndarray]:
        import tritonclient.utils.shared_memory as shm

        layout = self._shm_layout
        assert layout is not None
        (in_name, in_handle), (out_name, out_handle) = self._shm_regions
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
        self._call("inference (shared memory)", self._client.infer, self.model, inputs, outputs=outputs)
        arrays = {}
        for name in OUTPUTS:
            off, _, _, shape, dtype = layout["out"][name]
            view = shm.get_contents_as_numpy(out_handle, dtype, [n, *shape], offset=off)
            arrays[name] = np.array(view, copy=True)  # the region is reused by the next request
        return arrays

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Unregister and destroy shared memory regions, then close the connection."""
        if self._shm_regions:
            import tritonclient.utils.shared_memory as shm

            for name, handle in self._shm_regions:
                self._unregister(name)
                # also when the server is gone: the region is still ours to destroy
                with contextlib.suppress(Exception):
                    shm.destroy_shared_memory_region(handle)
            self._shm_regions = []
        client = getattr(self, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
            self._client = None

    def _unregister(self, name: str, attempts: int = 3) -> None:
        """Unregister a region; a busy server gets a few tries, a gone one needs none."""
        for attempt in range(attempts):
            try:
                self._client.unregister_system_shared_memory(name)
                return
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own and grpc types
                if attempt == attempts - 1 or "unavailable" in str(exc).lower():
                    warnings.warn(f"could not unregister shared memory region {name}: {exc}", stacklevel=3)
                    return
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


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    name = np_to_triton_dtype(np.dtype(dtype))
    if name is None:
        raise CMGError(f"{C.IMAGE}: numpy dtype {dtype} has no Triton equivalent")
    return name


def iter_image_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; plain files are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTS))
        else:
            out.append(p)
    return out


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
