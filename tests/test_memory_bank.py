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


def test_knn_distance_exports_as_one_matmul_and_topk(tmp_path):
    """The exported graph is not chunked: one MatMul and one TopK, whatever the batch."""
    import onnx

    path = tmp_path / "knn.onnx"
    torch.onnx.export(KNNDistance(torch.randn(50, 16), 2), (torch.randn(2, 9, 16),), str(path),
                      input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 1 and ops.count("TopK") == 1


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
