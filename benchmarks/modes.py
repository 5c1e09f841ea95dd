"""The four measured modes, all fed the same uint8 frames and the same trained weights.

- served_cmg:        gRPC to the `cmg` ensemble (one-pass CMER scorer + CMLE encoder)
- served_cmg_exact:  gRPC to `cmg_exact` (P+1-pass occlusion teacher + the same encoder)
- torch_eager:       in-process PyTorch: Run.scorer_graph() then Run.detector
- ort_inprocess:     in-process ONNX Runtime: the graph(s) the built cpu repository serves `cmg`
                     with (the fused scorer+encoder graph by default), with the intra-op threads
                     their config.pbtxt gives the served model, so the served/in-process ratio
                     isolates Triton's overhead.
- ort_int8:          the same, on the graphs of `cmg build --precision int8` (Q/DQ).

Thread counts come from one place, the built repository's config.pbtxt (`intra_op_threads`);
torch_eager is set to the same intra-op count.

Each mode measures a (concurrency, batch) point and scores the whole test split (AUROC).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio

from cmg import contract as C
from cmg.errors import CMGError
from cmg_bench.loadgen import Point, Window, run_async, run_threads
from cmg_bench.memory import call_peak_bytes
from cmg_build.config import intra_op_threads
from cmg_clients import core
from cmg_clients.client import CMGClient
from cmg_model_repository.model import session_options

SERVED_CMG = "served_cmg"
SERVED_EXACT = "served_cmg_exact"
# Deadline of a served mode's handshake and untimed accuracy pass: long, since nothing is
# timed there and a dead server is named by its refused connection, not by this deadline.
ACCURACY_TIMEOUT_S = 120.0
TORCH_EAGER = "torch_eager"
ORT_INPROCESS = "ort_inprocess"
ORT_INT8 = "ort_int8"
MODES = (SERVED_CMG, SERVED_EXACT, TORCH_EAGER, ORT_INPROCESS, ORT_INT8)
SERVED_MODEL = {SERVED_CMG: C.CMG, SERVED_EXACT: C.CMG_EXACT}
POOL = 16  # distinct request payloads per batch size, cycled


def batches(frames: np.ndarray, batch: int, pool: int = POOL) -> list[np.ndarray]:
    """Contiguous batches cycling through the frames (wrapping), built once per batch size."""
    n = len(frames)
    count = max(1, min(pool, -(-n // batch)))
    return [np.ascontiguousarray(frames[(k * batch + np.arange(batch)) % n]) for k in range(count)]


class Mode:
    """A way to score frames; `measure` runs one closed-loop point."""

    name = ""

    def measure(self, concurrency: int, batch: int, win: Window) -> Point:
        raise NotImplementedError

    def scores(self, frames: np.ndarray, chunk: int = 32) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        return None


class InProcessMode(Mode):
    """Threads calling `self.infer(frames)`; concurrency = threads."""

    def infer(self, frames: np.ndarray) -> np.ndarray:
        """ANOMALY_SCORE [B] for a uint8 batch."""
        raise NotImplementedError

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames
        self._call_bytes: dict[int, int | None] = {}

    def measure(self, concurrency: int, batch: int, win: Window) -> Point:
        pool = batches(self.frames, batch)
        return run_threads(lambda i: self.infer(pool[i % len(pool)]), concurrency, batch, win)

    def call_bytes(self, batch: int) -> int | None:
        """Memory one call at `batch` takes while it runs (measured once per batch; None off
        Linux). Concurrent calls in this process each take as much: `small`'s kNN alone holds
        [8, 2304, 1000] FP32 values (74 MB: the bank in blocks of 1,000 rows) per call at
        batch 8."""
        if batch not in self._call_bytes:
            self._call_bytes[batch] = call_peak_bytes(self._probe(batches(self.frames, batch, pool=1)[0]))
        return self._call_bytes[batch]

    def _probe(self, frames: np.ndarray) -> Callable[[], object]:
        """One call whose memory can be read off the process's RSS (torch returns large
        blocks to the system after each call)."""
        return lambda: self.infer(frames)

    def scores(self, frames: np.ndarray, chunk: int = 32) -> np.ndarray:
        return np.concatenate([self.infer(frames[i:i + chunk]) for i in range(0, len(frames), chunk)])


class TorchEager(InProcessMode):
    """PyTorch eager on CPU, the modules the ONNX graphs were exported from."""

    name = TORCH_EAGER

    def __init__(self, run_dir: Path, frames: np.ndarray, threads: int | None = None) -> None:
        import torch  # heavy: only the PyTorch eager mode needs it

        from cmg_train.checkpoint import load_run  # torch: only the eager mode needs it

        super().__init__(frames)
        self.torch = torch
        if threads:  # the served models' intra-op count (equal threads across modes)
            torch.set_num_threads(threads)
        run = load_run(run_dir)
        self.scorer = run.scorer_graph()
        self.detector = run.detector
        self.threshold = run.detector.threshold.detach().clone().reshape(1, 1)
        self.threads = torch.get_num_threads()

    def infer(self, frames: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(frames)
            ps = self.scorer(x)
            score = self.detector(x, ps, self.threshold.expand(x.shape[0], 1))[0]
        return score.reshape(-1).numpy()


def served_graphs(repo: Path, model: str = C.CMG) -> list[tuple[Path, int]]:
    """The graph files a built cpu repository serves `model` with, and the intra-op thread
    count each config.pbtxt gives them (what the served model.py runs with): the fused graph
    itself (`cmg build` default) or the ensemble's steps in order (`--cpu-cmg ensemble`)."""
    repo = Path(repo)
    report = json.loads((repo / "build_report.json").read_text())
    version = report.get("version", 1)
    entry = report["models"].get(model, {})
    names = [model] if entry.get("fused") else list(entry["steps"])
    return [(repo / name / str(version) / "model.onnx", intra_op_threads(repo / name)) for name in names]


class OrtInProcess(InProcessMode):
    """The graphs a built cpu repository serves `cmg` with (the fused graph, or cmer_scorer then
    cmle_encoder), in this process: the same files (fp32 or int8 Q/DQ) and the same thread
    counts the served model(s) use, so the served/in-process ratio isolates Triton's overhead."""

    name = ORT_INPROCESS

    def __init__(self, repo: Path, frames: np.ndarray, name: str = ORT_INPROCESS) -> None:
        super().__init__(frames)
        self.name = name
        self._served = served_graphs(Path(repo))
        self.sessions = self._sessions(arena=True)
        self.threads = max(threads for _, threads in self._served)
        self.graphs = [str(path) for path, _ in self._served]
        self.max_batch = int(json.loads((Path(repo) / "build_report.json").read_text())["max_batch"])

    def scores(self, frames: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """In batches of at most the served max_batch, as the server sees them: the kNN's
        [batch, patches, bank rows] distances are sized for that batch (memory, docs/results.md)."""
        return super().scores(frames, min(chunk or self.max_batch, self.max_batch))

    def _sessions(self, arena: bool) -> list[ort.InferenceSession]:
        """One session per served graph, with the thread count its config.pbtxt gives it."""
        sessions = []
        for path, threads in self._served:
            options = session_options(threads)
            options.enable_cpu_mem_arena = arena
            sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        return sessions

    def infer(self, frames: np.ndarray) -> np.ndarray:
        return self._run(self.sessions, frames)

    @staticmethod
    def _run(sessions: list[ort.InferenceSession], frames: np.ndarray) -> np.ndarray:
        feeds = {C.IMAGE: frames}
        for session in sessions[:-1]:  # the scorer when the steps are separate
            (feeds[C.PATCH_SCORES],) = session.run([C.PATCH_SCORES], {C.IMAGE: frames})
        (score,) = sessions[-1].run([C.ANOMALY_SCORE], feeds)
        return score.reshape(-1)

    def _probe(self, frames: np.ndarray) -> Callable[[], object]:
        """The call on fresh sessions without ONNX Runtime's memory arena: a session that has
        run keeps its largest buffers in the arena, so its next call shows no new memory."""
        probes = self._sessions(arena=False)
        return lambda: self._run(probes, frames)


class Served(Mode):
    """gRPC to an ensemble with tritonclient.grpc.aio: one channel, `concurrency` coroutines.

    Requests are built and read by the client core (all ensemble outputs, as a line
    client receives them); a synchronous handshake first names a wrong URL or model.
    """

    def __init__(self, name: str, url: str, frames: np.ndarray, loop: asyncio.AbstractEventLoop,
                 timeout_s: float = ACCURACY_TIMEOUT_S) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.model = SERVED_MODEL[name]
        with CMGClient(url, "grpc", model=self.model, timeout_s=timeout_s) as probe:
            self.url = probe.url
            self.threshold = probe.default_threshold  # None on the cpu target (optional there)
            self.max_batch = probe.max_batch  # the model's max_batch_size: no request may be larger
            if probe.size != tuple(frames.shape[1:3]):

                raise CMGError(f"model '{self.model}' at {probe.url} takes {probe.size[0]} x {probe.size[1]} "
                               f"frames, this run's are {frames.shape[1]} x {frames.shape[2]}: another run?")
        self.frames = frames
        self.loop = loop
        self._mod = grpcclient
        self._outputs = core.requested_outputs(grpcclient)

        async def connect():  # the aio channel binds to the loop running when it is made
            return grpcaio.InferenceServerClient(self.url)

        self.client = loop.run_until_complete(connect())
        self._inputs: dict[int, list] = {}

    def _pool(self, batch: int) -> list:
        if batch not in self._inputs:
            self._inputs[batch] = [core.build_inputs(self._mod, arr, self.threshold) for arr in batches(self.frames, batch)]
        return self._inputs[batch]

    async def _infer(self, inputs: list):
        return await self.client.infer(self.model, inputs, outputs=self._outputs)

    def measure(self, concurrency: int, batch: int, win: Window) -> Point:
        if batch > self.max_batch:
            raise CMGError(f"client batch {batch} is above model '{self.model}''s max_batch_size "
                           f"{self.max_batch} (the run's serving.max_batch): choose --batch up to {self.max_batch}")
        pool = self._pool(batch)
        return run_async(lambda i: self._infer(pool[i % len(pool)]), concurrency, batch, win, self.loop)

    def scores(self, frames: np.ndarray, chunk: int = 32) -> np.ndarray:
        """The accuracy pass (untimed): the line client, which splits into chunks of the
        model's max_batch_size itself (`chunk` is for the in-process modes). It keeps the
        mode's own deadline: the exact teacher's P+1 passes per frame on a busy 2-core
        machine outlast the line client's 10 s default (a CI run failed on that)."""
        with CMGClient(self.url, "grpc", model=self.model, timeout_s=self.timeout_s) as client:
            return client.infer_arrays(frames, self.threshold)[C.ANOMALY_SCORE].reshape(-1)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
