"""The one config.pbtxt generator (all targets, all models) and its validation.

Configs are built as Triton's own `ModelConfig` protobuf (shipped with tritonclient)
and written with protobuf's text format, then validated by parsing the written file
back and checking every tensor against the contract and the ONNX graph's own
inputs/outputs (names, dtypes, dims), so a config Triton would reject or that
disagrees with the graph fails the build, not the server start.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from cmg import contract as C
from cmg import model_config as mcfg
from cmg.config import ServingConfig
from cmg.contract import ONNX_ELEM_TYPES, THRESHOLD, ModelSpec, TensorSpec
from cmg.errors import CMGError
from cmg_model_repository.model import resolve_threads

TARGETS = ("cpu", "onnxruntime", "tensorrt")
PB_DTYPES = {name: getattr(mc, f"TYPE_{name}") for name in C.NUMPY_DTYPES}  # from the contract's dtypes


def serving_settings(d: dict | None) -> ServingConfig:
    """Batching and instance settings as the one serving-settings type (the run config's
    `serving`, recorded in export.json, overridable on the command line), checked whole."""
    d = d or {}
    known = {k: int(d[k]) for k in ServingConfig.__dataclass_fields__ if k in d}
    s = ServingConfig(**known)
    if s.max_batch < 1 or not 1 <= s.opt_batch <= s.max_batch or s.instances < 1:
        raise CMGError(f"serving settings {s}: need max_batch >= 1, 1 <= opt_batch <= max_batch, instances >= 1")
    return s


def _tensor(msg_type, spec: TensorSpec, optional: bool):
    t = msg_type(name=spec.name, data_type=PB_DTYPES[spec.dtype], dims=list(spec.dims))
    if optional and msg_type is mc.ModelInput:
        t.optional = True
    return t


def finite_inputs(spec: ModelSpec) -> str:
    """Inputs the Python backend must check for NaN/inf: THRESHOLD wherever a model takes it.

    The ensembles pass THRESHOLD on unchecked; on the cpu target the encoder's model.py
    checks it. On the GPU targets every step is an engine, which cannot refuse a value:
    the client library refuses a non-finite THRESHOLD before sending, and a raw request
    with NaN gets IS_ANOMALY false (score > NaN), documented in docs/guide.md (known limits).
    """
    return ",".join(t.name for t in spec.inputs if t.name == THRESHOLD)


def threshold_optional_in(target: str) -> bool:
    """Whether the encoder model itself takes THRESHOLD as an optional input.

    cpu: yes (the Python backend feeds it only when sent; the graph default applies
    otherwise). onnxruntime: Triton's ORT backend refuses optional inputs on batching
    models; tensorrt: an engine has no input defaults. For those two THRESHOLD is a
    required input of the encoder and of the ensembles, so every step stays on the GPU
    (no Python step between the engines); the calibrated default travels in the
    ensemble's config parameter `default_threshold`, which the client library reads and
    sends when the caller gives no threshold (a raw client does the same, see docs/guide.md).
    """
    return target == "cpu"


def model_config(spec: ModelSpec, target: str, serving: ServingConfig, kind: str = "cpu",
                 threshold: float | None = None, cpu_threads: int = 0) -> mc.ModelConfig:
    """ModelConfig for one contract model (ONNX-backed or ensemble) on `target`."""
    if target not in TARGETS:
        raise CMGError(f"unknown target {target!r}: expected one of {', '.join(TARGETS)}")
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=serving.max_batch)
    optional_thr = threshold_optional_in(target)
    if spec.is_ensemble:
        cfg.platform = "ensemble"
        cfg.input.extend(_tensor(mc.ModelInput, t, t.optional and optional_thr) for t in spec.inputs)
        cfg.output.extend(_tensor(mc.ModelOutput, t, False) for t in spec.outputs)
        _ensemble_steps(cfg, spec)
        if threshold is not None and not optional_thr:  # GPU targets: THRESHOLD is required
            mcfg.set_default_threshold(cfg, threshold)
        return cfg
    for t in spec.inputs:
        cfg.input.append(_tensor(mc.ModelInput, t, t.optional and optional_thr))
    cfg.output.extend(_tensor(mc.ModelOutput, t, False) for t in spec.outputs)
    cfg.dynamic_batching.max_queue_delay_microseconds = serving.queue_delay_us
    if serving.opt_batch > 1:
        cfg.dynamic_batching.preferred_batch_size.append(serving.opt_batch)
    gpu = target == "tensorrt" or (target == "onnxruntime" and kind == "gpu")
    cfg.instance_group.append(mc.ModelInstanceGroup(
        count=serving.instances, kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU))
    if gpu:
        add_warmup(cfg, serving.max_batch)
    if target == "cpu":
        cfg.backend = "python"
        cfg.parameters["onnx_file"].string_value = "model.onnx"

        # Written resolved (not 0): the one place the server and the bench read thread counts from.
        cfg.parameters[mcfg.INTRA_OP_THREADS].string_value = str(resolve_threads(cpu_threads, serving.instances))
        finite = finite_inputs(spec)
        if finite:  # model.py answers INVALID_ARG for a NaN/inf THRESHOLD
            cfg.parameters["finite_inputs"].string_value = finite
    elif target == "onnxruntime":
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = "model.onnx"
        if not gpu:  # the backend's default is every core per session: two steps at once oversubscribe them
            cfg.parameters[mcfg.ORT_INTRA_OP_THREADS].string_value = str(
                resolve_threads(cpu_threads, serving.instances))
    else:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
        cfg.optimization.cuda.graphs = True
    return cfg


def add_warmup(cfg: mc.ModelConfig, max_batch: int) -> None:
    """Zero frames at batch 1 and at the largest batch before the model reports ready: the
    first requests on a GPU otherwise pay for lazy initialisation (kernel choice, memory
    pools, CUDA graph capture), and a replica that turned ready would answer them slowly."""
    for batch in sorted({1, max_batch}):
        sample = cfg.model_warmup.add(name=f"zeros_batch_{batch}", batch_size=batch)
        for tensor in cfg.input:
            spec = sample.inputs[tensor.name]
            spec.data_type = tensor.data_type
            spec.dims.extend(tensor.dims)
            spec.zero_data = True


def _ensemble_steps(cfg: mc.ModelConfig, spec: ModelSpec) -> None:
    """first step -> encoder, both engines on GPU targets; every tensor keeps its contract name."""
    first, encoder = spec.steps
    out_names = {t.name for t in spec.outputs}
    step = cfg.ensemble_scheduling.step.add(model_name=first, model_version=-1)
    step.input_map[C.IMAGE] = C.IMAGE
    step.output_map[C.PATCH_SCORES] = C.PATCH_SCORES
    enc = cfg.ensemble_scheduling.step.add(model_name=encoder, model_version=-1)
    enc.input_map[C.IMAGE] = C.IMAGE
    enc.input_map[C.PATCH_SCORES] = C.PATCH_SCORES
    enc.input_map[THRESHOLD] = THRESHOLD
    # Ensemble outputs produced by the encoder; PATCH_SCORES already comes from step 1.
    for name in (C.ANOMALY_SCORE, C.IS_ANOMALY, C.ANOMALY_MAP, C.KEEP_MASK):
        if name in out_names:
            enc.output_map[name] = name


def intra_op_threads(model_dir: Path) -> int:
    """ONNX Runtime threads per instance of a built cpu-target model (its config.pbtxt)."""
    path = Path(model_dir) / "config.pbtxt"
    return mcfg.intra_op_threads(mcfg.read(path), str(path))


def onnx_io(onnx_path: Path) -> dict[str, dict[str, tuple[int, tuple]]]:
    """{'inputs'|'outputs': {name: (elem_type, dims without batch)}} from the graph itself.

    Inputs that also have an initializer (overridable defaults) count as inputs.
    """
    import onnx  # heavy: only reading a graph needs it, not importing cmg_build

    model = onnx.load(str(onnx_path), load_external_data=False)

    def dims(vi) -> tuple:
        shape = vi.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in shape)

    return {
        "inputs": {i.name: (i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input},
        "outputs": {o.name: (o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output},
    }


def validate_config(path: Path, spec: ModelSpec, onnx_path: Path | None = None,
                    extra_inputs: tuple[str, ...] = ()) -> mc.ModelConfig:
    """Parse `path` and check it against the contract `spec` and (if given) the ONNX graph.

    Raises CMGError naming the file and the tensor on the first mismatch.
    """
    cfg = mcfg.read(path)
    where = f"{path}"
    if cfg.name != spec.name:
        raise CMGError(f"{where}: name {cfg.name!r}, expected {spec.name!r}")
    if cfg.max_batch_size <= 0:
        raise CMGError(f"{where}: max_batch_size must be > 0 (all models batch on dim 0)")
    by_dtype = {v: k for k, v in PB_DTYPES.items()}
    for kind, got, want in (("input", cfg.input, spec.inputs), ("output", cfg.output, spec.outputs)):
        got_names = [t.name for t in got]
        want_names = [t.name for t in want]
        if sorted(got_names) != sorted(want_names):
            raise CMGError(f"{where}: {kind}s {got_names}, contract says {want_names}")
        for t in got:
            c = next(w for w in want if w.name == t.name)
            if by_dtype.get(t.data_type) != c.dtype:
                raise CMGError(f"{where}: {kind} '{t.name}' dtype {mc.DataType.Name(t.data_type)}, contract says TYPE_{c.dtype}")
            if tuple(t.dims) != c.dims:
                raise CMGError(f"{where}: {kind} '{t.name}' dims {list(t.dims)}, contract says {list(c.dims)}")
            if kind == "input" and t.optional and not c.optional:
                raise CMGError(f"{where}: input '{t.name}' marked optional but the contract requires it")
    if spec.is_ensemble:
        if cfg.platform != "ensemble" or not cfg.ensemble_scheduling.step:
            raise CMGError(f"{where}: ensemble {spec.name} has no ensemble_scheduling steps")
        models = [s.model_name for s in cfg.ensemble_scheduling.step]
        if models[0] != spec.steps[0] or models[-1] != spec.steps[-1]:
            raise CMGError(f"{where}: steps {models}, contract says {list(spec.steps)}")
        return cfg
    if not cfg.dynamic_batching.ByteSize() and not cfg.HasField("dynamic_batching"):
        raise CMGError(f"{where}: dynamic_batching missing")
    if onnx_path is not None:
        _check_against_onnx(where, cfg, onnx_path)
    return cfg


def _check_against_onnx(where: str, cfg: mc.ModelConfig, onnx_path: Path) -> None:
    """Config tensors must be graph tensors with the same dtype and dims ([batch, *dims])."""
    io = onnx_io(onnx_path)
    by_dtype = {v: k for k, v in PB_DTYPES.items()}
    for kind, tensors, graph in (("input", cfg.input, io["inputs"]), ("output", cfg.output, io["outputs"])):
        for t in tensors:
            if t.name not in graph:
                raise CMGError(f"{where}: {kind} '{t.name}' is not a {kind} of {onnx_path.name} "
                               f"(graph {kind}s: {sorted(graph)})")
            elem, dims = graph[t.name]
            if elem != ONNX_ELEM_TYPES[by_dtype[t.data_type]]:
                raise CMGError(f"{where}: {kind} '{t.name}' is TYPE_{by_dtype[t.data_type]} in the config "
                               f"but ONNX elem_type {elem} in {onnx_path.name}")
            if tuple(dims[1:]) != tuple(t.dims) or isinstance(dims[0], int) and dims[0] > 0 and len(dims) > 0:
                raise CMGError(f"{where}: {kind} '{t.name}' dims [batch, {', '.join(map(str, t.dims))}] in the "
                               f"config, {list(dims)} in {onnx_path.name} (only the batch dim may be dynamic)")
        missing = [n for n in graph if n not in {t.name for t in tensors}]
        if kind == "output" and missing:
            continue  # extra graph outputs are fine (Triton returns only configured ones)
        if missing:
            raise CMGError(f"{where}: graph {kind}s {missing} of {onnx_path.name} are missing from the config")

