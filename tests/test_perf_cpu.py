"""Issue 13 plumbing: thread counts from one place, a peak that bounds, int8 Q/DQ builds,
the fused cpu `cmg`. Never a timing assertion (the machine is shared)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from toy_graphs import write_toy_export

from cmg import contract as C
from cmg.errors import CMGError
from cmg_bench import flops
from cmg_bench.modes import OrtInProcess
from cmg_build import config as cfgmod
from cmg_build import opcheck, repository
from cmg_build.quantize import QUANTIZED, float_convs
from cmg_build.tensorrt import trtexec_command
from cmg_model_repository.model import resolve_threads

CONTRACT = C.Contract(32, 32, 4, 8)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_toy_export(run / "onnx", CONTRACT, threshold=0.45)
    return run


def _frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_config_carries_resolved_threads_and_inprocess_reads_them(toy_run, tmp_path):
    repository.build(toy_run, "cpu", tmp_path / "auto")
    want = resolve_threads(0, 1)
    assert want >= 1
    for name in C.ONNX_MODELS:
        assert cfgmod.intra_op_threads(tmp_path / "auto" / name) == want
    assert cfgmod.intra_op_threads(tmp_path / "auto" / C.CMG) == resolve_threads(0, 1, stages=1)  # fused: one graph
    repository.build(toy_run, "cpu", tmp_path / "three", cpu_threads=3)
    assert {cfgmod.intra_op_threads(tmp_path / "three" / m) for m in (*C.ONNX_MODELS, C.CMG)} == {3}
    # In-process ONNX Runtime runs what the repository serves `cmg` with, at its thread count.
    mode = OrtInProcess(tmp_path / "three", _frames(4))
    assert mode.threads == 3 and mode.graphs == [str(tmp_path / "three" / C.CMG / "1" / "model.onnx")]
    repository.build(toy_run, "cpu", tmp_path / "ens", cpu_threads=2, cpu_cmg="ensemble")
    steps = OrtInProcess(tmp_path / "ens", _frames(4))
    assert steps.threads == 2 and [Path(g).parent.parent.name for g in steps.graphs] == [C.CMER_SCORER, C.CMLE_ENCODER]
    np.testing.assert_allclose(mode.scores(_frames(4)), steps.scores(_frames(4)), atol=1e-5)
    # The accuracy pass goes in batches of at most the served max_batch (the kNN's memory).
    repository.build(toy_run, "cpu", tmp_path / "two", max_batch=2)
    two = OrtInProcess(tmp_path / "two", _frames(5))
    seen, infer = [], two.infer
    two.infer = lambda f: seen.append(len(f)) or infer(f)
    np.testing.assert_allclose(two.scores(_frames(5)), mode.scores(_frames(5)), atol=1e-5)
    assert two.max_batch == 2 and seen == [2, 2, 1]
    with pytest.raises(CMGError, match="intra_op_threads"):
        cfgmod.intra_op_threads(tmp_path / "three" / C.CMG_EXACT)  # an ensemble has no thread count


def test_thread_rule():
    assert resolve_threads(5, 4) == 5
    cores = resolve_threads(0, 1, stages=1)
    assert resolve_threads(0, 1) == max(1, cores // 2) and resolve_threads(0, 10 * cores) == 1


def test_peak_bounds_the_measured_gemm():
    peak = flops.peak_gflops(1)
    gemm = peak["measured_gemm"]
    assert gemm["gflops"] > 0 and gemm["threads"] == 1 and "ONNX Runtime" in gemm["method"]
    assert peak["gflops"] >= gemm["gflops"]  # the bound: a share of it is <= 1 for correct FLOP counts
    theo = peak["theoretical"]
    assert theo["fma_units"] == flops.FMA_UNITS and "assumed" in theo["method"]
    assert theo["isa"] in ("avx512f", "avx2+fma", "avx", "sse")
    assert peak["method"].startswith(("theoretical", "measured GEMM"))
    assert peak["int8_gops"] == pytest.approx(peak["gflops"] * theo["int8_factor"])


def test_fused_cmg_equals_the_two_steps(toy_run, tmp_path):
    report = repository.build(toy_run, "cpu", tmp_path / "repo")  # the cpu target's default
    repo = tmp_path / "repo"
    assert report["cpu_cmg"] == "fused" and report["models"][C.CMG]["fused"] == [C.CMER_SCORER, C.CMLE_ENCODER]
    spec = C.Contract.from_dict(report["contract"]).models[C.CMG]
    import dataclasses

    cfg = cfgmod.validate_config(repo / C.CMG / "config.pbtxt", dataclasses.replace(spec, steps=()),
                                 repo / C.CMG / "1" / "model.onnx")
    assert cfg.backend == "python" and cfgmod.intra_op_threads(repo / C.CMG) == resolve_threads(0, 1, stages=1)
    assert next(i for i in cfg.input if i.name == C.THRESHOLD).optional
    fused = ort.InferenceSession(str(repo / C.CMG / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    scorer = ort.InferenceSession(str(repo / C.CMER_SCORER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(str(repo / C.CMLE_ENCODER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _frames(3)
    for thr in (None, np.full((3, 1), 0.1, np.float32)):
        feeds = {C.IMAGE: x} | ({} if thr is None else {C.THRESHOLD: thr})
        got = dict(zip([o.name for o in fused.get_outputs()], fused.run(None, feeds), strict=True))
        (ps,) = scorer.run([C.PATCH_SCORES], {C.IMAGE: x})
        enc = dict(zip([o.name for o in encoder.get_outputs()],
                       encoder.run(None, feeds | {C.PATCH_SCORES: ps}), strict=True))
        assert sorted(got) == sorted(t.name for t in spec.outputs)
        for name, value in got.items():
            np.testing.assert_array_equal(value, ps if name == C.PATCH_SCORES else enc[name])
    with pytest.raises(CMGError, match="--cpu-cmg"):
        repository.build(toy_run, "cpu", tmp_path / "bad", cpu_cmg="both")


def test_precision_checked_and_trtexec_int8_flag(toy_run, tmp_path):
    with pytest.raises(CMGError, match="--precision 'int4'"):
        repository.build(toy_run, "cpu", tmp_path / "repo", precision="int4")
    with pytest.raises(CMGError, match="int8 on a GPU: --target tensorrt"):  # the CPU recipe on CUDA
        repository.build(toy_run, "onnxruntime", tmp_path / "repo", kind="gpu", precision="int8")
    inputs = {C.IMAGE: (32, 32, 3)}
    assert "--int8" in trtexec_command("m.onnx", "m.plan", inputs, 8, 4, 256, "c", int8=True).split()
    assert "--int8" not in trtexec_command("m.onnx", "m.plan", inputs, 8, 4, 256, "c").split()


def test_thin_convolutions_stay_float():
    """Depthwise convolutions and first layers (few input channels per group) are left float32
    by the int8 recipes: quantizing them cost 6.7 AUROC points on parts (build/quantize.py)."""
    from onnx import TensorProto, helper

    def conv(name: str, x: str, y: str, shape: tuple[int, ...], group: int = 1):
        w = helper.make_tensor(name + ".w", TensorProto.FLOAT, shape, np.zeros(int(np.prod(shape)), np.float32))
        return helper.make_node("Conv", [x, w.name], [y], name=name, group=group), w

    nodes, inits = zip(conv("stem", "x", "a", (16, 3, 3, 3)), conv("dw", "a", "b", (16, 1, 3, 3), group=16),
                       conv("pointwise", "b", "c", (32, 16, 1, 1)), conv("grouped", "c", "d", (32, 4, 3, 3), group=8),
                       strict=True)
    graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)], list(inits))
    assert float_convs(helper.make_model(graph)) == ["stem", "dw", "grouped"]


@pytest.mark.slow
def test_int8_build_is_valid_qdq_and_serves(tiny_run, tiny_onnx, cpu_repo, tmp_path):
    """`cmg build --precision int8` on the session's tiny run: Q/DQ graphs that pass onnx.checker
    and the TensorRT 10 op check, the same graphs in the tensorrt target (with --int8), and a
    real tritonserver scoring them over gRPC."""
    from cmg_build.server import TritonServer
    from cmg_clients.client import CMGClient

    repo = tmp_path / "int8"
    report = repository.build(tiny_run, "cpu", repo, precision="int8")
    prec = report["precision"]
    assert prec["precision"] == "int8" and prec["format"] == "QDQ" and prec["calibration_images"] > 0
    assert all(prec["float_convs"][name] > 0 for name in QUANTIZED), prec["float_convs"]
    table = opcheck.load_table()
    for name in C.ONNX_MODELS:
        path = repo / name / "1" / "model.onnx"
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        ops = Counter(n.op_type for n in model.graph.node)
        assert (ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0) == (name in QUANTIZED), name
        # the cpu recipe's UINT8 activations are for ONNX Runtime: TensorRT gets its own graphs
        assert (opcheck.check_file(path, table) == []) == (name not in QUANTIZED), name
        if name in QUANTIZED:  # thin convolutions read float weights, the others dequantized ones
            inits = {i.name for i in model.graph.initializer}
            convs = [n for n in model.graph.node if n.op_type == "Conv"]
            thin = set(float_convs(onnx.load(str(tiny_onnx / f"{name}.onnx"))))
            assert thin and {n.name for n in convs if n.input[1] in inits} == thin, name

    done = repository.build(tiny_run, "tensorrt", tmp_path / "trt", precision="int8", skip_engines=True)
    assert "skipped" in done["engines_missing"]
    trt_report = json.loads((tmp_path / "trt" / "build_report.json").read_text())
    for line, name in zip(trt_report["trtexec"], C.ONNX_MODELS, strict=True):
        assert ("--int8" in line.split()) == (name in QUANTIZED), line
    assert trt_report["tensorrt_readiness"]["problems"] == {m: [] for m in C.ONNX_MODELS}
    # One recipe per runtime: TensorRT's explicit quantization takes symmetric int8 (zero points
    # 0), ONNX Runtime's CPU recipe uint8 activations (7-bit weights against VPMADDUBSW saturation).
    assert prec["recipe"] == "cpu" and "reduce_range" in prec["weights"] and trt_report["precision"]["recipe"] == "tensorrt"
    for folder, want in ((tmp_path / "trt", {onnx.TensorProto.INT8}), (repo, {onnx.TensorProto.UINT8})):
        model = onnx.load(str(folder / C.CMER_SCORER / "1" / "model.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
        assert zps and {z.data_type for z in zps} == want, folder.name
        if want == {onnx.TensorProto.INT8}:
            assert all(not onnx.numpy_helper.to_array(z).any() for z in zps)  # symmetric

    meta = json.loads((tiny_onnx / "export.json").read_text())
    contract = C.Contract.from_dict(meta["contract"])
    frames = _frames(4, contract.height)
    fp32 = OrtInProcess(cpu_repo, frames).scores(frames)
    server = TritonServer(repo, log_file=tmp_path / "server.log").start()
    try:
        with CMGClient(server.grpc_url) as client:
            out = client.infer_arrays(frames)
    finally:
        server.cleanup()
    score = out[C.ANOMALY_SCORE].reshape(-1)
    assert score.shape == (4,) and np.isfinite(score).all()
    np.testing.assert_array_equal(out[C.IS_ANOMALY].reshape(-1), score > meta["threshold"])
    np.testing.assert_allclose(score, OrtInProcess(repo, frames).scores(frames), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(score, fp32)  # the int8 graphs really ran


@pytest.mark.slow
def test_fused_vs_ensemble_bench(tiny_run, tiny_onnx, tmp_path):
    """`cmg bench fused-vs-ensemble`: both variants served and measured in pairs (no timing assertion)."""
    from cmg_app.cli import main

    out = tmp_path / "ab"
    assert main(["bench", "fused-vs-ensemble", "--run", str(tiny_run), "--out", str(out), "--quick",
                 "--repeats", "1"]) == 0
    data = json.loads((out / "cpu_cmg.json").read_text())
    assert [(p["concurrency"], p["batch"]) for p in data["points"]] == [(1, 1), (8, 1), (4, 8)]
    for point in data["points"]:
        (pair,) = point["pairs"]
        assert pair["ensemble_fps"] > 0 and pair["fused_fps"] > 0
        assert point["throughput_median"] == pytest.approx(pair["fused_fps"] / pair["ensemble_fps"])
    built = {v: json.loads((out / f"repository_{v}" / "build_report.json").read_text()) for v in ("fused", "ensemble")}
    assert built["fused"]["models"][C.CMG].get("fused") and built["ensemble"]["models"][C.CMG]["platform"] == "ensemble"
    assert "fused/ensemble frames/s" in (out / "cpu_cmg.md").read_text()
    assert (out / "cpu_cmg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_recipe_quantizes_weights_to_7_bits(tmp_path):
    """Guards the cpu int8 recipe's reduce_range: weights within +-64 there, the full +-127 for TensorRT."""
    from onnx import TensorProto, helper

    from cmg_build.quantize import quantize_file

    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, (8, 16, 1, 1), rng.normal(size=8 * 16).astype(np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="pointwise")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], [w])
    src = tmp_path / "f32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = [{"x": rng.normal(size=(1, 16, 4, 4)).astype(np.float32)} for _ in range(4)]
    peak = {}
    for recipe in ("cpu", "tensorrt"):
        quantize_file(src, tmp_path / f"{recipe}.onnx", feeds, recipe)
        weights = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"{recipe}.onnx")).graph.initializer
                   if i.data_type == TensorProto.INT8 and len(i.dims) == 4]
        assert weights, recipe
        peak[recipe] = max(int(np.abs(a.astype(int)).max()) for a in weights)
    assert peak["cpu"] <= 64 < peak["tensorrt"], peak
