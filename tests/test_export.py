"""The exported graphs: parity, static shapes, optional THRESHOLD, kNN as MatMul + TopK,
TensorRT readiness."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cmg import contract as C
from cmg_build.opcheck import check_file


@pytest.fixture(scope="module")
def report(tiny_onnx):
    return json.loads((tiny_onnx / "export.json").read_text())


def test_parity_with_pytorch(report):
    assert report["parity"].keys() == {C.CMER_SCORER, C.CMLE_ENCODER, C.CMER_TEACHER}
    for name, rep in report["parity"].items():
        assert rep["batches"] == [1, 7]
        for tensor, vals in rep.items():
            if isinstance(vals, dict) and "max_abs_diff" in vals:
                assert vals["max_abs_diff"] <= 1e-4, (name, tensor)
            if isinstance(vals, dict) and "mismatches" in vals:
                assert vals["mismatches"] == 0, (name, tensor)


@pytest.mark.parametrize("name", C.ONNX_MODELS)
def test_graph_interface_is_the_contract_with_only_batch_dynamic(tiny_onnx, report, name):
    path = tiny_onnx / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    spec = C.Contract.from_dict(report["contract"]).models[name]
    got = {vi.name: vi for vi in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        tt = got[t.name].type.tensor_type
        assert tt.elem_type == C.ONNX_ELEM_TYPES[t.dtype], t.name
        dims = tt.shape.dim
        assert dims[0].dim_param == "batch"
        assert [d.dim_value for d in dims[1:]] == list(t.dims), t.name
    assert check_file(path) == []  # TensorRT 10 parser: supported ops, restrictions, static dims


def test_threshold_is_optional_and_overrides(tiny_onnx, report):
    sess = ort.InferenceSession(str(tiny_onnx / "cmle_encoder.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    scorer = ort.InferenceSession(str(tiny_onnx / "cmer_scorer.onnx"), providers=["CPUExecutionProvider"])
    ps = scorer.run(None, {C.IMAGE: frames})[0]
    score, flag = sess.run([C.ANOMALY_SCORE, C.IS_ANOMALY], {C.IMAGE: frames, C.PATCH_SCORES: ps})
    np.testing.assert_array_equal(flag, score > report["threshold"])
    low = np.full((3, 1), -1e9, np.float32)
    high = np.full((3, 1), 1e9, np.float32)
    assert sess.run([C.IS_ANOMALY], {C.IMAGE: frames, C.PATCH_SCORES: ps, C.THRESHOLD: low})[0].all()
    assert not sess.run([C.IS_ANOMALY], {C.IMAGE: frames, C.PATCH_SCORES: ps, C.THRESHOLD: high})[0].any()


def test_memory_bank_distances_are_matmul_plus_topk(tiny_onnx):
    """No [batch, M, D] broadcast: each bank constant feeds a MatMul, and TopK picks neighbours."""
    model = onnx.load(str(tiny_onnx / "cmle_encoder.onnx"))
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, set()).add(node.op_type)
    banks = [init for init in model.graph.initializer if len(init.dims) == 2 and min(init.dims) >= 32
             and max(init.dims) >= 500]
    assert banks, "memory banks not found as constants"
    for init in banks:
        assert consumers.get(init.name) == {"MatMul"}, (init.name, consumers.get(init.name))
    assert sum(n.op_type == "TopK" for n in model.graph.node) >= 2
