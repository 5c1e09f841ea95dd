"""What the page shows, kept as frames arrive: per camera counts, the last minute of
latencies, the last N flagged frames (frame and maps kept, overlays drawn only when a
browser asks), the threshold the slider set, and Triton's own metrics.

The stream calls `on_frame`/`on_error`/`threshold` on its event loop (cmg_clients.stream's
StreamObserver), the web server reads `snapshot` from its own thread: one lock, held for
appends and copies only (`Camera.copy`; the percentiles are computed after it is released,
by `figures`), so the stream never waits on the page.
"""

from __future__ import annotations

import io
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cmg import contract as C
from cmg.errors import CMGError
from cmg_clients import core
from cmg_clients.overlay import overlay_image

WINDOW_S = 60.0  # latency and anomaly rate over the last minute
FPS_WINDOW_S = 5.0  # live frame rate over the last seconds
THUMB_PX = 160


@dataclass
class Flagged:
    """A flagged frame kept for the page: the frame, its maps, and its line's facts."""

    id: int
    camera: int
    seq: int
    frame_id: str
    score: float
    threshold: float | None
    latency_ms: float
    frame: np.ndarray
    result: core.Result
    _png: dict[str, bytes] = field(default_factory=dict)

    def info(self) -> dict:
        return {"id": self.id, "seq": self.seq, "frame_id": self.frame_id, "score": self.score,
                "threshold": self.threshold, "latency_ms": self.latency_ms}

    def png(self, kind: str) -> bytes:
        """Overlay (anomaly map inside the keep-mask, keep-mask outline) as PNG: `full` or `thumb`.
        Drawn once per kind, on first request, by the one overlay code (cmg_clients.overlay)."""
        if kind not in self._png:
            img = overlay_image(self.frame, self.result)
            if kind == "thumb":
                img.thumbnail((THUMB_PX, THUMB_PX), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            self._png[kind] = buf.getvalue()
        return self._png[kind]


class Camera:
    """One source's live figures."""

    def __init__(self, index: int, name: str, keep: int) -> None:
        self.index, self.name = index, name
        self.frames = self.results = self.errors = self.anomalies = 0
        self.recent: deque[tuple[float, float | None, bool]] = deque()  # (t, latency ms | None, flagged)
        self.scores: deque[float] = deque(maxlen=2000)  # for the slider's range
        self.flagged: deque[Flagged] = deque(maxlen=keep)
        self.threshold: float | None = None  # None: what the stream would send without the page
        self.last_threshold: float | None = None  # what the last scored frame was sent with
        self.last_error: str | None = None

    def add(self, now: float, latency: float | None, flagged: bool) -> None:
        self.recent.append((now, latency, flagged))
        while self.recent and self.recent[0][0] < now - WINDOW_S:
            self.recent.popleft()

    def copy(self) -> dict:
        """What the page's figures need, copied: taken under the state's lock, so copies only
        (C-level list copies and the few kept frames' facts), the arithmetic comes after."""
        return {
            "index": self.index, "name": self.name, "frames": self.frames, "results": self.results,
            "errors": self.errors, "anomalies": self.anomalies, "last_error": self.last_error,
            "threshold": self.threshold, "last_threshold": self.last_threshold,
            "recent": list(self.recent), "scores": list(self.scores),
            "flagged": [f.info() for f in reversed(self.flagged)],  # newest first
        }


def figures(copy: dict, now: float) -> dict:
    """A camera's figures for the page from its `Camera.copy`, computed outside the lock: the
    minute's percentiles (overall and per second for the chart) are the costly part."""
    recent = [r for r in copy["recent"] if r[0] >= now - WINDOW_S]
    n = len(recent)
    t = np.fromiter((r[0] for r in recent), np.float64, n)
    lat = np.fromiter((np.nan if r[1] is None else r[1] for r in recent), np.float64, n)  # NaN: an error
    hit = np.fromiter((r[2] for r in recent), bool, n)
    scored = ~np.isnan(lat)
    last_fps = int(np.count_nonzero(t >= now - FPS_WINDOW_S))
    span = min(FPS_WINDOW_S, now - float(t[0])) if n else 0.0
    # Per-second p50/p99 for the chart: x = whole seconds, oldest first.
    secs, values = t[scored].astype(np.int64), lat[scored]
    order = np.argsort(secs, kind="stable")
    secs, values = secs[order], values[order]
    xs, starts = np.unique(secs, return_index=True)
    per_second = [np.percentile(v, [50, 99]) for v in np.split(values, starts[1:])] if values.size else []
    overall = np.percentile(values, [50, 99]) if values.size else None
    scores = np.array(copy["scores"], dtype=np.float64)
    return {
        **{k: copy[k] for k in ("index", "name", "frames", "results", "errors", "anomalies", "last_error")},
        "fps": last_fps / span if span > 0.5 else 0.0,
        "p50_ms": None if overall is None else float(overall[0]),
        "p99_ms": None if overall is None else float(overall[1]),
        "anomaly_rate": int(np.count_nonzero(hit & scored)) / values.size if values.size else None,
        "anomaly_rate_all": copy["anomalies"] / copy["results"] if copy["results"] else None,
        "chart": {"t": xs.tolist(), "p50": [float(p[0]) for p in per_second],
                  "p99": [float(p[1]) for p in per_second]},
        "threshold": copy["threshold"], "last_threshold": copy["last_threshold"],
        "score_range": [float(scores.min()), float(scores.max())] if scores.size else None,
        "flagged": copy["flagged"],
    }


class DashboardState:
    """The stream's observer and the page's data, shared between two threads under one lock."""

    def __init__(self, sources: list[str], keep: int = 12) -> None:
        if not sources:
            raise CMGError("the dashboard needs at least one source")
        self._lock = threading.Lock()
        self.cameras = [Camera(i, name, keep) for i, name in enumerate(sources)]
        self._by_name = {c.name: c for c in self.cameras}
        self._flagged: dict[int, Flagged] = {}
        self._next_id = 1
        self.metrics: dict = {"url": None, "error": "not read yet", "models": []}
        self.closed = threading.Event()
        self.started = time.time()

    def _camera(self, source: str) -> Camera:
        cam = self._by_name.get(source)
        if cam is None:  # a source named only once it streams
            cam = Camera(len(self.cameras), source, self.cameras[0].flagged.maxlen or 12)
            self.cameras.append(cam)
            self._by_name[source] = cam
        return cam

    # -- the stream's side (StreamObserver) -------------------------------------------
    def threshold(self, source: str, default: float | None) -> float | None:
        cam = self._by_name.get(source)
        value = cam.threshold if cam is not None else None
        return default if value is None else value

    def on_frame(self, source: str, line: dict, frame: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        now = time.time()
        flagged = bool(line.get("is_anomaly"))
        with self._lock:
            cam = self._camera(source)
            cam.frames += 1
            cam.results += 1
            cam.scores.append(float(line["score"]))
            cam.last_threshold = line.get("threshold")
            cam.add(now, float(line["latency_ms"]), flagged)
            if not flagged:
                return
            cam.anomalies += 1
            item = Flagged(
                id=self._next_id, camera=cam.index, seq=int(line["seq"]), frame_id=str(line["frame_id"]),
                score=float(line["score"]), threshold=line.get("threshold"), latency_ms=float(line["latency_ms"]),
                frame=frame, result=core.Result(
                    score=float(line["score"]), is_anomaly=True,
                    anomaly_map=np.array(outputs[C.ANOMALY_MAP][0], dtype=np.float32),
                    patch_scores=np.array(outputs[C.PATCH_SCORES][0], dtype=np.float32),
                    keep_mask=np.array(outputs[C.KEEP_MASK][0], dtype=np.uint8)),
            )
            self._next_id += 1
            if len(cam.flagged) == cam.flagged.maxlen:
                self._flagged.pop(cam.flagged[0].id, None)
            cam.flagged.append(item)
            self._flagged[item.id] = item

    def on_error(self, source: str, line: dict) -> None:
        with self._lock:
            cam = self._camera(source)
            cam.frames += 1
            cam.errors += 1
            cam.last_error = str(line.get("error"))
            cam.add(time.time(), None, False)

    # -- the page's side ---------------------------------------------------------------
    def snapshot(self) -> dict:
        """The page's figures: copies under the lock, the arithmetic after releasing it, so the
        stream's `on_frame` waits for the copies only, never for the page's percentiles."""
        now = time.time()
        with self._lock:
            copies = [c.copy() for c in self.cameras]
            metrics = dict(self.metrics)
        cameras = [figures(c, now) for c in copies]
        return {"t": now, "uptime_s": now - self.started, "cameras": cameras, "metrics": metrics}

    def flagged(self, frame_no: int) -> Flagged | None:
        with self._lock:
            return self._flagged.get(frame_no)

    def set_threshold(self, index: int, value: float | None) -> float | None:
        """The slider: THRESHOLD for camera `index` from its next request on (None: back to the default)."""
        if value is not None:
            if isinstance(value, str):  # JSON must carry a number, not a string of one
                raise CMGError(f"threshold {value!r} is not a number")
            value = core.finite_threshold(value)  # finite in FP32: the one check (cmg.contract.threshold_value)
        with self._lock:
            if not 0 <= index < len(self.cameras):
                raise KeyError(index)
            self.cameras[index].threshold = None if value is None else float(value)
            return self.cameras[index].threshold

    def set_metrics(self, metrics: dict) -> None:
        with self._lock:
            self.metrics = metrics
