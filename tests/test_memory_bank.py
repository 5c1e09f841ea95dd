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
