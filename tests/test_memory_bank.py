"""The memory bank: kNN distance equals brute force; an empty bank is refused."""

from __future__ import annotations

import pytest
import torch

from cmg_train.memory_bank import KNNDistance


@pytest.mark.parametrize("k", [1, 3])
def test_knn_distance_matches_brute_force(k):
    bank, q = torch.randn(200, 32), torch.randn(4, 7, 32)
    got = KNNDistance(bank, k)(q)
    want = torch.cdist(q.reshape(-1, 32), bank).topk(k, largest=False).values.mean(-1).reshape(4, 7)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_knn_rejects_empty_bank():
    with pytest.raises(ValueError, match="non-empty"):
        KNNDistance(torch.zeros(0, 4), 1)


def test_knn_distance_in_chunks_equals_one_pass(monkeypatch):
    """Training and evaluation bound the distances held at once; the result must not change."""
    import cmg_train.memory_bank as mb

    bank, q = torch.randn(50, 16), torch.randn(3, 11, 16)
    want = KNNDistance(bank, 3)(q)
    monkeypatch.setattr(mb, "CHUNK_ELEMENTS", 50 * 4)  # 4 rows per chunk: 9 chunks, the last short
    got = KNNDistance(bank, 3)(q)
    assert got.shape == (3, 11)
    torch.testing.assert_close(got, want)


def _export_knn(knn: KNNDistance, path, d: int):
    torch.onnx.export(knn, (torch.randn(2, 9, d),), str(path), input_names=["x"], output_names=["d"],
                      dynamic_axes={"x": {0: "b"}, "d": {0: "b"}}, dynamo=False, do_constant_folding=True)
    import onnx

    return onnx.load(str(path))


def test_knn_distance_exports_a_small_bank_as_one_gemm_and_topk(tmp_path):
    ops = [n.op_type for n in _export_knn(KNNDistance(torch.randn(50, 16), 2), tmp_path / "knn.onnx", 16).graph.node]
    assert ops.count("Gemm") == 1 and ops.count("TopK") == 1 and "MatMul" not in ops


@pytest.mark.parametrize("k", [1, 3])
def test_knn_distance_exports_a_large_bank_in_blocks_with_the_same_distances(tmp_path, monkeypatch, k):
    """A bank over EXPORT_BANK_ROWS is exported as one Gemm per block of rows (its bias the
    rows' -|b|^2 / 2) and a ReduceMax (k = 1) or TopK of the block's nearest (the runtime holds
    one block's values at a time), each block's rows a constant of its own (what int8
    quantization and TensorRT take as weights), the last block shorter than k; no elementwise
    pass over the [patches, rows] matrix; ONNX Runtime's distances equal PyTorch's and brute
    force's."""
    import onnxruntime as ort

    import cmg_train.memory_bank as mb
    from cmg_build import opcheck

    monkeypatch.setattr(mb, "EXPORT_BANK_ROWS", 16)  # 50 rows: blocks of 16, 16, 16 and 2 (< k)
    bank = torch.randn(50, 16)
    knn = KNNDistance(bank, k)
    model = _export_knn(knn, tmp_path / "knn.onnx", 16)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    weights |= {n.output[0]: tuple(n.attribute[0].t.dims) for n in model.graph.node if n.op_type == "Constant"}
    assert len(gemms) == 4
    assert sorted(weights.get(n.input[1]) for n in gemms) == [(16, 2), (16, 16), (16, 16), (16, 16)]
    assert sorted(weights.get(n.input[2]) for n in gemms) == [(2,), (16,), (16,), (16,)]
    reduce = [n.op_type for n in model.graph.node if n.op_type in ("ReduceMax", "TopK")]
    assert reduce == (["ReduceMax"] * 4 if k == 1 else ["TopK"] * 5)
    assert not [n.op_type for n in model.graph.node if n.op_type in ("Slice", "Split", "MatMul")]
    assert opcheck.check_model(model) == []
    x = torch.randn(5, 9, 16)  # the patch axis is static in the graph, as in the product's
    got = ort.InferenceSession(str(tmp_path / "knn.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    want = torch.cdist(x.reshape(-1, 16), bank).topk(k, largest=False).values.mean(-1).reshape(5, 9)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(knn(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_excluding_rows_equals_a_bank_without_them(k):
    g = torch.Generator().manual_seed(3)
    bank, x = torch.randn(40, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    exclude = torch.zeros(2, 40, dtype=torch.bool)
    exclude[0, :10], exclude[1, [3, 17, 39]] = True, True  # per query: its own rows
    got = KNNDistance(bank, k).excluding(x, exclude)
    for b in range(2):
        torch.testing.assert_close(got[b], KNNDistance(bank[~exclude[b]], k)(x[b]))
    flat = KNNDistance(bank, k).excluding(x[:, 0], exclude)  # [B, D] queries: one row each
    torch.testing.assert_close(flat, got[:, 0])


def test_knn_excluding_with_k_near_the_bank_size_stays_finite():
    """`scoring.k_global` above the training images: k is the whole bank, and leaving a
    frame's own row out had put -inf into the mean (a NaN threshold, a model that flags
    nothing); k is now what each query has left."""
    g = torch.Generator().manual_seed(4)
    bank, x = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g)
    own = torch.eye(3, 6, dtype=torch.bool)
    own[1, 3:] = True  # queries leave out 1, 4 and 1 rows: each its own rows, whatever its batch
    got = KNNDistance(bank, 100).excluding(x, own)
    assert torch.isfinite(got).all()
    for b in range(3):
        torch.testing.assert_close(got[b], KNNDistance(bank[~own[b]], 100)(x[b:b + 1])[0])
        torch.testing.assert_close(got[b], KNNDistance(bank, 100).excluding(x[b:b + 1], own[b:b + 1])[0])
    with pytest.raises(ValueError, match="every one of the bank's 6 rows"):
        KNNDistance(bank, 1).excluding(x, torch.ones(3, 6, dtype=torch.bool))
