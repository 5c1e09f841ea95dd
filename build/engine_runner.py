"""Standalone runner for an ensemble's engine chain (scorer -> encoder) without Triton.

For latency work on a GPU host: both engines are deserialised once, pinned host and
device buffers are allocated once at the profile's max batch, everything runs on one
CUDA stream, and the scorer's PATCH_SCORES stays on the device: its output buffer *is*
the encoder's input buffer (no host hop, as in the served ensemble). Optionally each
batch size is captured as a CUDA graph after a warm-up enqueue; when capture fails the
runner falls back to plain enqueues and says so.

The shape/profile/buffer logic is pure Python (tested on CPU); TensorRT and cuda-python
(`cuda.bindings.runtime`, NVIDIA's current sample choice) are imported only by `EngineChain`.
"""

from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmg import contract as C
from cmg.contract import Contract
from cmg.errors import CMGError


# -- pure parts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """An engine's optimisation profile for the batch dimension (min / opt / max)."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def check(self, batch: int) -> int:
        if not self.min_batch <= batch <= self.max_batch:
            raise CMGError(f"batch {batch} is outside the engine profile [{self.min_batch}, {self.max_batch}]")
        return batch


def chain_tensors(contract: Contract, ensemble: str = C.CMG) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every tensor of an ensemble's engine chain with its per-item dims and dtype, from the contract.

    IMAGE and THRESHOLD are host inputs, PATCH_SCORES links the two engines on the device,
    the encoder's outputs come back to the host.
    """
    specs = {t.name: t for m in contract.models[ensemble].steps for t in (*contract.models[m].inputs, *contract.models[m].outputs)}
    return {name: (tuple(t.dims), t.np_dtype) for name, t in specs.items()}


def buffer_bytes(dims: tuple[int, ...], dtype: np.dtype, max_batch: int) -> int:
    """Bytes of one buffer allocated once for `max_batch` items (>= 1: CUDA refuses 0-byte mallocs)."""
    return max(1, int(max_batch) * int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize)


def batch_sizes(requested: tuple[int, ...], profile: Profile) -> list[int]:
    """The requested batch sizes the profile admits, in order, without repeats."""
    out: list[int] = []
    for b in requested:
        if profile.min_batch <= b <= profile.max_batch and b not in out:
            out.append(b)
    if not out:
        raise CMGError(f"none of the batch sizes {list(requested)} fits the engine profile "
                       f"[{profile.min_batch}, {profile.max_batch}]")
    return out


def latency_stats(times_s: list[float], batch: int) -> dict:
    """p50/p99 per call (ms) and frames/s at the median, for one batch size."""
    if not times_s:
        raise CMGError("no timed iterations")
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"batch": batch, "iterations": int(ms.size), "p50_ms": p50, "p99_ms": float(np.percentile(ms, 99)),
            "min_ms": float(ms.min()), "frames_per_s": batch / p50 * 1e3}


def pinned_view(ptr: int, dims: tuple[int, ...], dtype: np.dtype, max_batch: int) -> np.ndarray:
    """A numpy [max_batch, *dims] array over host memory at `ptr` (no copy: page-locked buffers)."""
    count = int(max_batch) * int(np.prod(dims, dtype=np.int64))
    raw = (ctypes.c_ubyte * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(max_batch, *dims)


@dataclass
class GraphCache:
    """CUDA graphs by batch size, and the batch sizes whose capture failed (with why)."""

    graphs: dict[int, object] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    def use_graph(self, batch: int, enabled: bool) -> bool:
        """Capture is tried once per batch size; after a failure that size runs without graphs."""
        return enabled and batch not in self.failed


# -- the GPU part -------------------------------------------------------------------------
def _check(result):
    """cuda-python calls return (err, *values): raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CMGError(f"CUDA runtime error {err!r}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


class EngineChain:
    """scorer.plan -> encoder.plan on one stream with buffers allocated once (TensorRT 10)."""

    def __init__(self, plans: dict[str, Path], contract: Contract, threshold: float, max_batch: int,
                 cuda_graphs: bool = True, ensemble: str = C.CMG) -> None:
        # optional 'gpu' extra (TensorRT, cuda-python): only running engines needs them
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self.trt, self.cudart = trt, cudart
        self.contract, self.cuda_graphs = contract, cuda_graphs
        self.profile = Profile(1, 1, int(max_batch))
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.steps = contract.models[ensemble].steps
        self.engines = {}
        for name in self.steps:
            plan = plans[name]
            engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
            if engine is None:
                raise CMGError(f"TensorRT could not deserialise {plan} (built by another TensorRT version?)")
            self.engines[name] = engine
        self.contexts = {n: e.create_execution_context() for n, e in self.engines.items()}
        self.stream = _check(cudart.cudaStreamCreate())
        self.tensors = chain_tensors(contract, ensemble)
        self.device: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self._pinned: list[int] = []
        for name, (dims, dtype) in self.tensors.items():
            nbytes = buffer_bytes(dims, dtype, max_batch)
            self.device[name] = _check(cudart.cudaMalloc(nbytes))
            if name == C.PATCH_SCORES:
                continue  # lives on the device only: scorer output == encoder input
            ptr = _check(cudart.cudaMallocHost(nbytes))
            self._pinned.append(ptr)
            self.host[name] = pinned_view(ptr, dims, dtype, max_batch)
        self.host[C.THRESHOLD][:] = threshold
        for name, ctx in self.contexts.items():
            engine = self.engines[name]
            for i in range(engine.num_io_tensors):
                tensor = engine.get_tensor_name(i)
                if tensor not in self.device:
                    raise CMGError(f"engine {name} has tensor {tensor!r}, not in the contract")
                ctx.set_tensor_address(tensor, self.device[tensor])
        self.cache = GraphCache()

    def _inputs_of(self, name: str) -> list[str]:
        engine = self.engines[name]
        return [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                if engine.get_tensor_mode(engine.get_tensor_name(i)) == self.trt.TensorIOMode.INPUT]

    def _enqueue(self, batch: int) -> None:
        """H2D of IMAGE/THRESHOLD, scorer, encoder, D2H of the outputs; all async on one stream."""
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in (C.IMAGE, C.THRESHOLD):
            arr = self.host[name][:batch]
            _check(cudart.cudaMemcpyAsync(self.device[name], arr.ctypes.data, arr.nbytes, h2d, self.stream))
        for name in self.steps:
            ctx = self.contexts[name]
            for tensor in self._inputs_of(name):
                ctx.set_input_shape(tensor, (batch, *self.tensors[tensor][0]))
            if not ctx.execute_async_v3(self.stream):
                raise CMGError(f"TensorRT execution of {name} failed at batch {batch}")
        for name in self.host:
            if name in (C.IMAGE, C.THRESHOLD):
                continue
            arr = self.host[name][:batch]
            _check(cudart.cudaMemcpyAsync(arr.ctypes.data, self.device[name], arr.nbytes, d2h, self.stream))

    def _capture(self, batch: int) -> None:
        """Warm-up enqueue (TensorRT allocates lazily), then capture; record why it failed."""
        cudart = self.cudart
        self._enqueue(batch)
        _check(cudart.cudaStreamSynchronize(self.stream))
        try:
            _check(cudart.cudaStreamBeginCapture(
                self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            try:
                self._enqueue(batch)
            finally:
                graph = _check(cudart.cudaStreamEndCapture(self.stream))
            self.cache.graphs[batch] = _check(cudart.cudaGraphInstantiate(graph, 0))
        except CMGError as exc:
            self.cache.failed[batch] = str(exc)

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Score UINT8 frames [B, H, W, 3]; returns views of the pinned output buffers (copy to keep)."""
        batch = self.profile.check(int(frames.shape[0]))
        self.host[C.IMAGE][:batch] = frames
        if self.cache.use_graph(batch, self.cuda_graphs) and batch not in self.cache.graphs:
            self._capture(batch)
        if batch in self.cache.graphs:
            _check(self.cudart.cudaGraphLaunch(self.cache.graphs[batch], self.stream))
        else:
            self._enqueue(batch)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return {n: a[:batch] for n, a in self.host.items() if n not in (C.IMAGE, C.THRESHOLD)}

    def time(self, batches: tuple[int, ...], iterations: int = 50, warmup: int = 5) -> list[dict]:
        """p50/p99 per batch size, host frames in, host outputs back (what a caller sees)."""
        rng = np.random.default_rng(0)
        h, w = self.contract.height, self.contract.width
        rows = []
        for batch in batch_sizes(batches, self.profile):
            frames = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            times = []
            for i in range(warmup + iterations):
                t0 = time.perf_counter()
                self.run(frames)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            row = latency_stats(times, batch)
            row["cuda_graph"] = batch in self.cache.graphs
            if batch in self.cache.failed:
                row["cuda_graph_failed"] = self.cache.failed[batch]
            rows.append(row)
        return rows

    def close(self) -> None:
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        for ptr in self._pinned:
            self.cudart.cudaFreeHost(ptr)
        self.cudart.cudaStreamDestroy(self.stream)
        self.device, self._pinned = {}, []

    def __enter__(self) -> EngineChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_repository(repo: Path, cuda_graphs: bool = True, ensemble: str = C.CMG) -> EngineChain:
    """EngineChain over a `cmg build --target tensorrt` repository (its report gives contract and threshold)."""
    report_path = Path(repo) / "build_report.json"
    if not report_path.is_file():
        raise CMGError(f"{repo}: no build_report.json (not a `cmg build` repository)")
    report = json.loads(report_path.read_text())
    if report.get("target") != "tensorrt":
        raise CMGError(f"{repo}: built for target {report.get('target')!r}; --engines needs the tensorrt target")
    contract = Contract.from_dict(report["contract"])
    plans = {n: Path(repo) / n / str(report.get("version", 1)) / "model.plan" for n in contract.models[ensemble].steps}
    missing = [str(p) for p in plans.values() if not p.is_file()]
    if missing:
        raise CMGError(f"engines not built: {', '.join(missing)} (run REPO/trtexec.sh on a GPU host)")
    return EngineChain(plans, contract, float(report["threshold"]), int(report["max_batch"]), cuda_graphs, ensemble)
