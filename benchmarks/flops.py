"""Model FLOPs per frame from the ONNX graphs, and the peak FLOP/s that bounds them on this machine.

FLOPs are counted for the operators that carry nearly all the arithmetic (MatMul, Gemm,
Conv), on shapes made static by fixing the batch dimension to 1 and running ONNX shape
inference (with data propagation, so Reshape targets computed in-graph resolve). A
multiply-add counts as 2 FLOPs. Nodes whose shapes stay unknown are listed, never
silently counted as zero. No well-kept counter for ONNX graphs is installed here, hence
this small one.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

COUNTED_OPS = ("MatMul", "Gemm", "Conv")


def _static_batch(model, batch: int = 1):
    """A copy of `model` whose graph inputs have a fixed first dimension."""
    import onnx  # heavy: only counting needs onnx, not importing this module

    model = onnx.ModelProto.FromString(model.SerializeToString())
    init_names = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    return model


def _shapes(model) -> dict[str, tuple[int, ...] | None]:
    """Every value's shape after inference; None where any dimension is still symbolic."""
    out: dict[str, tuple[int, ...] | None] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            out[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[vi.name] = None if any(d is None for d in dims) else tuple(dims)
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper  # heavy: only counting needs onnx, not importing this module

            return helper.get_attribute_value(a)
    return default


def node_flops(node, shapes: dict[str, tuple[int, ...] | None]) -> int | None:
    """FLOPs of one MatMul/Gemm/Conv node, or None when a needed shape is unknown."""
    ins = [shapes.get(n) for n in node.input if n]
    out = shapes.get(node.output[0])
    if node.op_type == "MatMul":
        a, b = ins[0], ins[1]
        if a is None or b is None or out is None:
            return None
        k = a[-1] if len(a) > 1 else a[0]
        # out already carries the broadcast batch dims, M and N.
        return 2 * int(np.prod(out, dtype=np.int64)) * int(k)
    if node.op_type == "Gemm":
        a = ins[0]
        if a is None or out is None:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2 * int(np.prod(out, dtype=np.int64)) * int(k)
    if node.op_type == "Conv":
        w = ins[1]
        if w is None or out is None:
            return None
        # out [N, Cout, *spatial]; w [Cout, Cin/groups, *kernel]
        per_output = int(np.prod(w[1:], dtype=np.int64))
        return 2 * int(np.prod(out, dtype=np.int64)) * per_output
    return 0


def _walk(graph):
    """All nodes, including those of subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g is not None and a.g.node:
                yield from _walk(a.g)
            for sub in a.graphs:
                yield from _walk(sub)


def _runtime_shapes(model, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` observed by running the (static-batch) graph once in ONNX Runtime on
    zero inputs: the fallback for values whose shapes static inference leaves symbolic
    (e.g. attention reshapes computed from Shape ops)."""
    # heavy (onnx, onnxruntime): only this fallback runs a graph, not importing this module
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name in init:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(
            next(i for i in model.graph.input if i.name == inp.name).type.tensor_type.elem_type)
        feeds[inp.name] = np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], dtype)
    values = sess.run(names, feeds)
    return {n: tuple(v.shape) for n, v in zip(names, values, strict=True)}


def count_model(model, batch: int = 1) -> dict:
    """{"flops": total at `batch`, "by_op": {op: flops}, "nodes": n counted, "unresolved": [names],
    "runtime_shapes": values whose shapes came from one ONNX Runtime pass}."""
    import onnx  # heavy: only counting needs onnx, not importing this module

    fixed = _static_batch(model, batch)
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = _shapes(inferred)
    missing = sorted({n for node in _walk(inferred.graph) if node.op_type in COUNTED_OPS
                      for n in (*node.input[:2], node.output[0]) if n and shapes.get(n) is None})
    if missing:
        shapes.update(_runtime_shapes(fixed, missing))
    by_op = dict.fromkeys(COUNTED_OPS, 0)
    unresolved: list[str] = []
    counted = 0
    for node in _walk(inferred.graph):
        if node.op_type not in COUNTED_OPS:
            continue
        f = node_flops(node, shapes)
        if f is None:
            unresolved.append(node.name or f"{node.op_type}->{node.output[0]}")
            continue
        by_op[node.op_type] += f
        counted += 1
    return {"flops": int(sum(by_op.values())), "by_op": by_op, "nodes": counted, "unresolved": unresolved,
            "runtime_shapes": len(missing), "batch": batch}


def count_file(path: str | Path, batch: int = 1) -> dict:
    """FLOPs of an .onnx file (see count_model)."""
    import onnx  # heavy: only counting needs onnx, not importing this module

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {path}")
    return count_model(onnx.load(str(path)), batch)


FMA_UNITS = 2  # assumed FMA pipes per core: Intel since Haswell (Skylake-SP Gold/Platinum), AMD Zen 2-4


def _cpuinfo() -> tuple[set[str], float | None]:
    """CPU flags and the highest frequency the kernel reports (cpufreq max, else cpuinfo MHz), GHz."""
    flags: set[str] = set()
    mhz: list[float] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(val.split())
            elif key.strip() == "cpu MHz":
                mhz.append(float(val))
    except (OSError, ValueError):
        pass
    ghz = max(mhz) / 1e3 if mhz else None
    with contextlib.suppress(OSError, ValueError):
        ghz = max(ghz or 0.0, int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6)
    return flags, ghz


def theoretical_peak_gflops(cores: int) -> dict:
    """float32 datasheet-style peak: cores x GHz x lanes x 2 (multiply-add) x FMA_UNITS.

    Lanes from the flags: 16 with avx512f, 8 with avx2/avx, 4 with SSE; without the fma flag
    a multiply and an add issue separately (same count, FMA_UNITS = one mul + one add pipe).
    The unit count per core is an assumption (not readable from flags), stated in `method`."""
    flags, ghz = _cpuinfo()
    lanes = 16 if "avx512f" in flags else 8 if ({"avx2", "avx"} & flags) else 4
    per_cycle = lanes * 2 * FMA_UNITS
    isa = "avx512f" if lanes == 16 else ("avx2+fma" if "fma" in flags else "avx") if lanes == 8 else "sse"
    out = {"cores": cores, "ghz": ghz, "isa": isa, "flops_per_cycle_per_core": per_cycle, "fma_units": FMA_UNITS,
           "vnni": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}
    out["gflops"] = None if ghz is None else cores * ghz * per_cycle
    # int8 multiply-adds per float32 FMA slot: 4 with VNNI (vpdpbusd), 2 without (the
    # vpmaddubsw + vpmaddwd pair ONNX Runtime's MLAS uses on AVX2/AVX-512 without VNNI).
    out["int8_factor"] = 4 if out["vnni"] else 2
    out["method"] = (f"{cores} cores x {ghz or 0:.3f} GHz x {per_cycle} float32 FLOP/cycle ({isa}: {lanes} lanes "
                     f"x 2 per FMA x {FMA_UNITS} FMA units per core, assumed)")
    return out


def ort_gemm_gflops(threads: int, n: int = 1024, runs: int = 10) -> dict:
    """Best of `runs` float32 n x n MatMuls in ONNX Runtime (the runtime the served graphs use;
    MLAS GEMM) at `threads` intra-op threads. numpy is the wrong yardstick here: its BLAS may be
    slowed on purpose (OPENBLAS_CORETYPE)."""
    # heavy (onnxruntime, onnx): only measuring the peak needs them, not importing this module
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n), dtype=np.float32) for x in "ab"}
    sess.run(None, feeds)  # warm-up (thread pool start, page faults)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2.0 * n**3 / best / 1e9, "threads": threads, "n": n, "runs": runs,
            "method": f"ONNX Runtime float32 {n}x{n} MatMul at {threads} intra-op threads, best of {runs}"}


def peak_gflops(cores: int, threads: int | None = None) -> dict:
    """The figure every mode's achieved FLOP/s is divided by, with its method.

    Bound: the theoretical peak of the `cores` the bench uses; a measured ONNX Runtime GEMM
    (at `threads`, default `cores`) is reported next to it and replaces it only if it were
    higher (a frequency above the reported one), so a share of peak never exceeds 1 when the
    FLOP counts are right."""
    theo = theoretical_peak_gflops(cores)
    gemm = ort_gemm_gflops(threads or cores)
    if theo["gflops"] is not None and theo["gflops"] >= gemm["gflops"]:
        bound, method = theo["gflops"], f"theoretical: {theo['method']}"
    else:
        bound, method = gemm["gflops"], f"measured GEMM (above the theoretical figure): {gemm['method']}"
    int8_method = (f"{theo['int8_factor']}x the float32 bound (int8 multiply-adds per FMA slot, "
                   f"{'VNNI' if theo['vnni'] else 'no VNNI: vpmaddubsw + vpmaddwd'})")
    return {"gflops": bound, "method": method, "int8_gops": bound * theo["int8_factor"], "int8_method": int8_method,
            "theoretical": theo, "measured_gemm": gemm,
            "gemm_of_theoretical": None if theo["gflops"] is None else gemm["gflops"] / theo["gflops"]}
