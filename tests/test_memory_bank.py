"""Memory banks: coreset size and coverage; kNN distance equals brute force."""

from __future__ import annotations

import pytest
import torch

from cmg_train.memory_bank import KNNDistance, greedy_coreset


def test_coreset_has_at_most_m_unique_rows():
    x = torch.randn(500, 16)
    idx = greedy_coreset(x, 50, seed=0)
    assert idx.numel() == 50 and idx.unique().numel() == 50
    assert greedy_coreset(x[:20], 50).numel() == 20


def test_coreset_covers_better_than_random():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(480, 8), torch.randn(20, 8) + 12])  # a small far cluster
    idx = greedy_coreset(x, 20, seed=0)
    assert (idx >= 480).any()  # k-centre reaches the outlying cluster
    cover = torch.cdist(x, x[idx]).min(1).values.max()
    rand = torch.cdist(x, x[torch.randperm(500)[:20]]).min(1).values.max()
    assert cover < rand


@pytest.mark.parametrize("k", [1, 3])
def test_knn_distance_matches_brute_force(k):
    bank, q = torch.randn(200, 32), torch.randn(4, 7, 32)
    got = KNNDistance(bank, k)(q)
    want = torch.cdist(q.reshape(-1, 32), bank).topk(k, largest=False).values.mean(-1).reshape(4, 7)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_knn_rejects_empty_bank():
    with pytest.raises(ValueError, match="non-empty"):
        KNNDistance(torch.zeros(0, 4), 1)
