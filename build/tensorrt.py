"""TensorRT 10 engine building (imported lazily: only the tensorrt target on a GPU host needs it).

Also writes the equivalent `trtexec` commands, so a host without the Python API (or
without a GPU) can still build the same engines by hand.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

from cmg.errors import CMGError


def shapes_arg(inputs: dict[str, tuple[int, ...]], batch: int) -> str:
    """trtexec shape spec: NAME:BxD1xD2,..."""
    return ",".join(f"{n}:{'x'.join(map(str, (batch, *d)))}" for n, d in inputs.items())


def trtexec_command(onnx_path: str, plan_path: str, inputs: dict[str, tuple[int, ...]],
                    max_batch: int, opt_batch: int, workspace_mb: int, timing_cache: str,
                    int8: bool = False) -> str:
    """int8: the graph carries Q/DQ nodes (`cmg build --precision int8`); --int8 lets TensorRT
    run them as int8 layers (explicit quantization; no calibrator), --fp16 covers the rest."""
    args = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", "--fp16",
        f"--minShapes={shapes_arg(inputs, 1)}", f"--optShapes={shapes_arg(inputs, opt_batch)}",
        f"--maxShapes={shapes_arg(inputs, max_batch)}", f"--memPoolSize=workspace:{workspace_mb}M",
        f"--timingCacheFile={timing_cache}", "--skipInference", *(["--int8"] if int8 else []),
    ]
    return " ".join(shlex.quote(a) for a in args)


def missing_prerequisites() -> str | None:
    """None when the TensorRT Python API and a CUDA device are present, else what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the TensorRT Python API is not installed (pip install 'cmg-triton[gpu]', tensorrt>=10,<11)"
    if not Path("/dev/nvidia0").exists():
        return "no CUDA device (/dev/nvidia0 missing)"
    return None


def build_engine(onnx_path: Path, plan_path: Path, inputs: dict[str, tuple[int, ...]],
                 max_batch: int, opt_batch: int, workspace_mb: int, timing_cache: Path,
                 fp16: bool = True, int8: bool = False) -> dict:
    """Parse ONNX, FP16, profile min 1 / opt / max batch, workspace limit, timing cache in and out.
    int8: explicit quantization of a Q/DQ graph (the INT8 flag, scales from the graph, no calibrator)."""
    import tensorrt as trt  # optional 'gpu' extra: only engine builds need TensorRT

    if int(trt.__version__.split(".")[0]) != 10:
        raise CMGError(f"TensorRT {trt.__version__}: engines must be built with TensorRT 10 (the Triton image's)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch always
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CMGError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = inputs.get(tensor.name, tuple(tensor.shape)[1:])
        profile.set_shape(tensor.name, (1, *dims), (opt_batch, *dims), (max_batch, *dims))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    # TensorRT refuses (returns False) a cache another version or GPU made: start a new one
    earlier = config.create_timing_cache(cache_bytes) if cache_bytes else None
    reused = earlier is not None and config.set_timing_cache(earlier, False)
    if not reused:
        if cache_bytes:
            print(f"cmg build: timing cache {timing_cache} is another TensorRT's or GPU's: not used, "
                  "a new one replaces it", file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CMGError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "fp16": fp16, "int8": int8, "timing_cache_reused": bool(reused)}


def run_engine(plan_path: Path, feeds: dict) -> dict:
    """Run a serialized engine once on numpy inputs (parity tests on GPU hosts).

    Uses the CUDA runtime from cuda-python (cuda-bindings) for device buffers, so no
    torch/pycuda is needed.
    """
    # optional 'gpu' extra (TensorRT, cuda-python): only running an engine needs them
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    def check(result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise CMGError(f"CUDA runtime error {err} while running {plan_path}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()
    buffers, outputs = [], {}
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    try:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                arr = np.ascontiguousarray(feeds[name])
                context.set_input_shape(name, arr.shape)
                ptr = check(cudart.cudaMalloc(arr.nbytes))
                buffers.append(ptr)
                check(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, h2d))
                context.set_tensor_address(name, ptr)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                arr = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
                ptr = check(cudart.cudaMalloc(max(arr.nbytes, 1)))
                buffers.append(ptr)
                context.set_tensor_address(name, ptr)
                outputs[name] = (arr, ptr)
        stream = check(cudart.cudaStreamCreate())
        if not context.execute_async_v3(stream):
            raise CMGError(f"TensorRT execution failed for {plan_path}")
        check(cudart.cudaStreamSynchronize(stream))
        for arr, ptr in outputs.values():
            check(cudart.cudaMemcpy(arr.ctypes.data, ptr, arr.nbytes, d2h))
        check(cudart.cudaStreamDestroy(stream))
    finally:
        for ptr in buffers:
            cudart.cudaFree(ptr)
    return {name: arr for name, (arr, _) in outputs.items()}
