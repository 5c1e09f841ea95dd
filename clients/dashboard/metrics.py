"""Triton's own metrics for the page, read from its Prometheus endpoint (`--metrics-port`,
8002 by default, see cmg_build.server) and parsed with prometheus_client's parser.

Per model: successes, failures, inferences and executions (counters since the server
started) and, between two reads, the rate and the mean queue / compute time per request;
none of these where a counter went down between the two (a restart, a version unloaded).
With several servers (`cmg stream --url A --url B`) their counters are summed: the page
shows what the line's servers did together, not the first one's share.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

# Triton counter -> the name the page uses.
COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_count": "inferences",
    "nv_inference_exec_count": "executions",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_infer_duration_us": "compute_us",
    "nv_inference_request_duration_us": "request_us",
}


def parse(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text -> {model: {success, failure, inferences, ...}} summed over versions."""
    models: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser names counter samples `<family>_total` or by the family name itself.
            name = sample.name[:-6] if sample.name.endswith("_total") else sample.name
            key = COUNTERS.get(name)
            model = sample.labels.get("model")
            if key is None or model is None:
                continue
            row = models.setdefault(model, dict.fromkeys(COUNTERS.values(), 0.0))
            row[key] += float(sample.value)
    return models


def fetch(url: str, timeout_s: float = 2.0) -> str:
    """The metrics page of `url` (HOST:PORT or http://HOST:PORT[/metrics])."""
    if not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the operator's own server
        return resp.read().decode("utf-8", errors="replace")


class MetricsReader:
    """Reads the endpoints and derives per-interval figures from two consecutive reads of each."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = list(dict.fromkeys([urls] if isinstance(urls, str) else urls))  # one endpoint is read once
        if not self.urls:
            raise ValueError("MetricsReader needs at least one metrics endpoint")
        self.url = ", ".join(self.urls)
        self._last: dict[str, tuple[float, dict[str, dict[str, float]]]] = {}  # per endpoint: its last read

    def read(self) -> dict:
        """{'url', 'error', 'models': [{model, success, failure, inferences, executions,
        req_per_s, queue_ms, compute_ms}]}; an unreachable endpoint is an error text, not a raise
        (the others are still summed). The counters are the answering servers' sums; the rates
        come from each server's own change since its last read, summed over the servers that
        answered both times (a server back from an outage adds no lifetime count as traffic),
        and are None on a first read and where one of them has a counter that went down (a
        restart, or `cmg deploy` unloading a version: it drops out of the sum)."""
        now, errors = time.monotonic(), []
        totals: dict[str, dict[str, float]] = {}
        changes: dict[str, dict[str, float] | None] = {}  # model -> summed change; None: a reset somewhere
        seconds: dict[str, float] = {}  # model -> the interval its change was measured over
        for url in self.urls:
            try:
                one = parse(fetch(url))
            except Exception as exc:  # noqa: BLE001 - the page says why; the stream goes on
                errors.append(f"{url}: {type(exc).__name__}: {exc}" if len(self.urls) > 1 else f"{type(exc).__name__}: {exc}")
                self._last.pop(url, None)  # its next answer is a first read again
                continue
            before = self._last.get(url)
            self._last[url] = (now, one)
            for model, row in one.items():
                total = totals.setdefault(model, dict.fromkeys(row, 0.0))
                for key, value in row.items():
                    total[key] += value
                prev = before[1].get(model) if before else None
                if prev is None:
                    continue
                if any(row[k] < prev[k] for k in row) or changes.get(model, {}) is None:
                    changes[model] = None
                    continue
                change = changes.setdefault(model, dict.fromkeys(row, 0.0))
                for key in row:
                    change[key] += row[key] - prev[key]
                seconds[model] = max(seconds.get(model, 0.0), now - before[0])
        error = "; ".join(errors) or None
        if len(errors) == len(self.urls):
            return {"url": self.url, "error": error, "models": []}
        rows = []
        for model, row in sorted(totals.items()):
            out = {"model": model, **{k: row[k] for k in ("success", "failure", "inferences", "executions")},
                   "req_per_s": None, "queue_ms": None, "compute_ms": None}
            change, dt = changes.get(model), seconds.get(model, 0.0)
            if change is not None and dt > 0:
                done = change["success"]
                out["req_per_s"] = done / dt
                if done > 0:
                    out["queue_ms"] = change["queue_us"] / done / 1000.0
                    out["compute_ms"] = change["compute_us"] / done / 1000.0
            rows.append(out)
        return {"url": self.url, "error": error, "models": rows}
