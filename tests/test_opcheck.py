"""TensorRT readiness check: passes contract graphs, names the node/tensor that would fail."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from toy_graphs import encoder_graph, scorer_graph

from cmg.contract import Contract
from cmg_build import opcheck

C = Contract(32, 32, 4, 8)


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _vi(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def test_table_keeps_version_and_source():
    table = opcheck.load_table()
    assert "TensorRT 10" in table.source and "operators.md" in table.source
    assert table.supported["MatMul"] and table.supported["TopK"]
    assert table.supported["Unique"] is False


def test_contract_graphs_are_ready():
    assert opcheck.check_model(scorer_graph(C)) == []
    assert opcheck.check_model(encoder_graph(C, 0.5)[0]) == []


def test_unsupported_op_names_the_node():
    m = _model([helper.make_node("Unique", ["x"], ["y"], name="dedupe")],
               [_vi("x", TensorProto.FLOAT, ["batch", 4])], [_vi("y", TensorProto.FLOAT, None)])
    problems = opcheck.check_model(m, name="g.onnx")
    assert any("dedupe" in p and "Unique" in p and "not supported" in p for p in problems), problems


def test_dynamic_non_batch_dim_is_named():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")],
               [_vi("x", TensorProto.FLOAT, ["batch", "width"])], [_vi("y", TensorProto.FLOAT, ["batch", "width"])])
    problems = opcheck.check_model(m)
    assert any("input 'x'" in p and "dynamic dim 1" in p for p in problems), problems
    ok = _model([helper.make_node("Relu", ["x"], ["y"])],
                [_vi("x", TensorProto.FLOAT, ["batch", 3])], [_vi("y", TensorProto.FLOAT, ["batch", 3])])
    assert opcheck.check_model(ok) == []


def test_uint8_inside_the_network_is_named():
    m = _model([helper.make_node("Relu", ["img"], ["y"], name="relu_on_u8")],
               [_vi("img", TensorProto.UINT8, ["batch", 3])], [_vi("y", TensorProto.UINT8, ["batch", 3])])
    problems = opcheck.check_model(m)
    assert any("relu_on_u8" in p and "UINT8" in p for p in problems), problems


def test_topk_k_limit_and_reduce_mean_axes():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    topk = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="knn")],
                  [_vi("x", TensorProto.FLOAT, ["batch", 5000])],
                  [_vi("v", TensorProto.FLOAT, ["batch", 4000]), _vi("i", TensorProto.INT64, ["batch", 4000])], [k])
    assert any("knn" in p and "3840" in p for p in opcheck.check_model(topk))
    rm = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean_dyn")],
                [_vi("x", TensorProto.FLOAT, ["batch", 4]), _vi("axes", TensorProto.INT64, [1])],
                [_vi("y", TensorProto.FLOAT, None)])
    assert any("mean_dyn" in p and "axes" in p for p in opcheck.check_model(rm))


def test_resize_antialias_is_named():
    scales = helper.make_tensor("s", TensorProto.FLOAT, [4], np.array([1, 1, 2, 2], np.float32))
    m = _model([helper.make_node("Resize", ["x", "", "s"], ["y"], name="up", mode="linear", antialias=1)],
               [_vi("x", TensorProto.FLOAT, ["batch", 1, 4, 4])], [_vi("y", TensorProto.FLOAT, ["batch", 1, 8, 8])],
               [scales])
    assert any("'up'" in p and "antialias" in p for p in opcheck.check_model(m))


def test_check_file_on_disk(tmp_path):
    path = tmp_path / "bad.onnx"
    m = _model([helper.make_node("Det", ["x"], ["y"], name="det")],
               [_vi("x", TensorProto.FLOAT, ["batch", 3, 3])], [_vi("y", TensorProto.FLOAT, ["batch"])])
    onnx.save(m, path)
    problems = opcheck.check_file(path)
    assert problems and problems[0].startswith("bad.onnx: node 'det' (Det)")


@pytest.mark.parametrize("op", ["Cast"])
def test_cast_from_uint8_input_is_fine(op):
    m = _model([helper.make_node(op, ["img"], ["y"], to=TensorProto.FLOAT)],
               [_vi("img", TensorProto.UINT8, ["batch", 3])], [_vi("y", TensorProto.FLOAT, ["batch", 3])])
    assert opcheck.check_model(m) == []


def test_a_dequantized_int32_bias_is_named_and_int8_passes():
    """ONNX Runtime's quantize_static writes a bias as INT32 -> DequantizeLinear by default;
    TensorRT's parser dequantizes INT8 (FP8, INT4) only (the tensorrt recipe keeps biases float)."""
    def dq(kind, array):
        inits = [helper.make_tensor("w", kind, [4], array), helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])]
        return _model([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="bias_dq")], [],
                      [_vi("y", TensorProto.FLOAT, [4])], inits)

    problems = opcheck.check_model(dq(TensorProto.INT32, [1, 2, 3, 4]))
    assert any("bias_dq" in p and "INT32" in p for p in problems), problems
    assert opcheck.check_model(dq(TensorProto.INT8, [1, 2, 3, 4])) == []
    # TensorRT's one FP8 is E4M3FN: an E5M2 tensor is named too
    assert any("FLOAT8E5M2" in p for p in opcheck.check_model(dq(TensorProto.FLOAT8E5M2, [1, 2, 3, 4])))


def test_an_if_whose_branches_return_different_ranks_is_named():
    """torch's exporter writes `squeeze(1)` of a dim it cannot prove is 1 as such an If
    (then Squeeze, rank 3; else Identity, rank 4), which TensorRT's parser refuses."""
    def branch(node, rank):
        return helper.make_graph([node], "b", [], [_vi(node.output[0], TensorProto.FLOAT, [2] * rank)])

    cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    for else_rank, bad in ((4, True), (3, False)):
        els = (helper.make_node("Identity", ["x"], ["e"]) if else_rank == 4
               else helper.make_node("Squeeze", ["x", "ax"], ["e"]))
        node = helper.make_node("If", ["c"], ["y"], name="maybe_squeeze",
                                then_branch=branch(helper.make_node("Squeeze", ["x", "ax"], ["t"]), 3),
                                else_branch=branch(els, else_rank))
        m = _model([node], [_vi("x", TensorProto.FLOAT, [2, 1, 2, 2])], [_vi("y", TensorProto.FLOAT, None)],
                   [cond, helper.make_tensor("ax", TensorProto.INT64, [1], [1])])
        problems = opcheck.check_model(m)
        assert any("maybe_squeeze" in p and "different ranks [3] / [4]" in p for p in problems) == bad, problems
