"""Generic Triton Python-backend model: runs the ONNX graph next to it with ONNX Runtime.

`cmg build --target cpu` copies this one file into REPO/<model>/1/model.py for every
ONNX model (cmer_scorer, cmle_encoder, cmer_teacher). All tensor names, dtypes and
dims come from the generated config.pbtxt (itself generated from cmg.contract), so
this file imports nothing from the project and runs in any stub environment that has
numpy and onnxruntime.

Why a dynamic batch is concatenated and run once: ONNX Runtime's cost per call is
dominated by fixed overhead for small frames, so one run per batch is what makes
Triton's dynamic batcher pay off. Requests that omit an optional input (THRESHOLD)
are run apart from those that send it, so the graph's baked-in default applies to
exactly the requests that did not override it.

Config parameters (string values):
  onnx_file         graph file in the version dir (default model.onnx)
  intra_op_threads  ONNX Runtime threads per instance, written resolved by `cmg build`
                    (the bench's in-process modes read the same number); 0 = resolve_threads
  finite_inputs     comma-separated inputs whose values must all be finite (THRESHOLD:
                    a NaN threshold would never flag anything); others answer INVALID_ARG
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside a Triton stub (the bench reuses session_options)
    pb_utils = None


def _error(message: str, code_name: str = "INVALID_ARG"):
    """A TritonError with a status code where this backend version supports codes."""
    code = getattr(pb_utils.TritonError, code_name, None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


PIPELINE_STAGES = 2  # models of one ensemble that run concurrently (scorer/teacher, encoder)


def resolve_threads(intra_op_threads: int = 0, instances: int = 1, stages: int = PIPELINE_STAGES) -> int:
    """The ONE ONNX Runtime thread rule: `intra_op_threads` when > 0, else
    usable cores // (instances x stages). An ensemble keeps `stages` models busy at once
    (scorer on one frame while the encoder runs the previous one), so each gets that share
    of the cores (a full share each oversubscribes the cores and costs served throughput).
    `cmg build` writes the resolved number into config.pbtxt, so the server and the bench's
    in-process modes use the same count."""
    if intra_op_threads > 0:
        return intra_op_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (max(1, instances) * max(1, stages)))


def session_options(intra_op_threads: int = 0, instances: int = 1,
                    stages: int = PIPELINE_STAGES) -> ort.SessionOptions:
    """ONNX Runtime options for one served (or benchmarked in-process) graph: resolve_threads
    intra-op threads, one inter-op thread (the graphs are chains), every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(intra_op_threads, instances, stages)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the THRESHOLD-initializer warning is intended
    return options


class _Spec:
    """One config tensor: name, numpy dtype, per-item dims (no batch), optional flag."""

    def __init__(self, cfg: dict) -> None:
        self.name = cfg["name"]
        self.triton_dtype = cfg["data_type"].replace("TYPE_", "")
        self.dtype = np.dtype(pb_utils.triton_string_to_numpy(cfg["data_type"]))
        self.dims = tuple(int(d) for d in cfg["dims"])
        self.optional = bool(cfg.get("optional", False))

    def check(self, array: np.ndarray, max_batch: int) -> str | None:
        """None when `array` fits, else a message naming the tensor."""
        if array.dtype != self.dtype:
            return f"input '{self.name}': dtype {array.dtype}, expected {self.triton_dtype}"
        shape = tuple(array.shape)
        if len(shape) != len(self.dims) + 1 or any(d != -1 and d != s for d, s in zip(self.dims, shape[1:], strict=True)):
            want = ", ".join(["batch", *map(str, self.dims)])
            return f"input '{self.name}': shape {list(shape)}, expected [{want}]"
        if not 1 <= shape[0] <= max_batch:
            return f"input '{self.name}': batch {shape[0]}, expected 1..{max_batch}"
        return None


class TritonPythonModel:
    """Triton calls initialize once per instance, execute per (dynamic) batch, finalize at unload."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / (params.get("onnx_file") or "model.onnx")
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{self.name}: ONNX graph {onnx_path} not found")
        self.max_batch = int(config.get("max_batch_size", 0)) or 1
        self.inputs = [_Spec(t) for t in config["input"]]
        self.outputs = [_Spec(t) for t in config["output"]]
        self.finite = {n.strip() for n in params.get("finite_inputs", "").split(",") if n.strip()}
        unknown = self.finite - {t.name for t in self.inputs}
        if unknown:
            raise pb_utils.TritonModelException(f"{self.name}: finite_inputs {sorted(unknown)} are not inputs")

        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        options = session_options(int(params.get("intra_op_threads") or 0), instances)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_inputs |= {i.name for i in self.session.get_overridable_initializers()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [t.name for t in self.inputs if t.name not in graph_inputs]
        missing += [t.name for t in self.outputs if t.name not in graph_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{self.name}: config tensors {missing} are not in {onnx_path.name}"
                f" (graph inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)})"
            )
        self.output_names = [t.name for t in self.outputs]

    def _read(self, request) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """The request's inputs as numpy arrays, or an error message naming the bad tensor."""
        feeds: dict[str, np.ndarray] = {}
        batch = None
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                if spec.optional:
                    continue
                return None, f"input '{spec.name}' is required by {self.name}"
            array = tensor.as_numpy()
            problem = spec.check(array, self.max_batch)
            if problem:
                return None, f"{self.name}: {problem}"
            if spec.name in self.finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = array[~np.isfinite(array)].reshape(-1)[0]
                return None, f"{self.name}: input '{spec.name}' must be finite, got {bad}"
            if batch is not None and array.shape[0] != batch:
                return None, f"{self.name}: input '{spec.name}' has batch {array.shape[0]}, other inputs {batch}"
            batch = array.shape[0]
            feeds[spec.name] = array
        return feeds, None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            feeds, problem = self._read(request)
            if problem:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_error(problem))
            else:
                groups.setdefault(tuple(sorted(feeds)), []).append((i, feeds))

        for names, members in groups.items():
            sizes = [len(next(iter(f.values()))) for _, f in members]
            batch = {n: np.concatenate([f[n] for _, f in members]) if len(members) > 1 else members[0][1][n]
                     for n in names}
            try:
                results = self.session.run(self.output_names, batch)
            except Exception as exc:  # noqa: BLE001 - report per request, keep serving
                err = _error(f"{self.name}: ONNX Runtime failed: {exc}", "INTERNAL")
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=err)
                continue
            offsets = np.cumsum(sizes)[:-1]
            pieces = [np.split(r, offsets) for r in results]
            for k, (i, _) in enumerate(members):
                tensors = [pb_utils.Tensor(spec.name, np.ascontiguousarray(p[k], dtype=spec.dtype))
                           for spec, p in zip(self.outputs, pieces, strict=True)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.session = None
