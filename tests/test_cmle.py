"""CMLE: locally linear weights, the caption graph, the head and its losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmg.config import CMLEConfig
from cmg.errors import CMGError
from cmg_train.cmle import (
    CMLEHead,
    build_caption_graph,
    cmle_loss,
    lle_weights,
    minilm_embeddings,
    train_cmle_head,
)


def test_lle_recovers_planted_affine_weights():
    rng = np.random.default_rng(0)
    bases = rng.normal(size=(3, 4))
    planted = np.array([0.5, 0.3, 0.2])
    query = planted @ bases
    far = rng.normal(size=(6, 4)) * 50 + 200
    emb = np.vstack([query, bases, far]).astype(np.float32)
    idx, w = lle_weights(emb, k=3, reg=1e-6)
    assert sorted(idx[0].tolist()) == [1, 2, 3]
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    np.testing.assert_allclose([got[1], got[2], got[3]], planted, atol=1e-3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)


def test_lle_weights_differ_from_uniform_on_structured_points():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    _, w = lle_weights(emb, k=5)
    assert np.abs(w - 0.2).mean() > 0.05


def test_degenerate_captions_stop_cmle_with_a_clear_message():
    captions = ["a photo of a hex nut"] * 50 + ["a photo of a washer"] * 50
    with pytest.raises(CMGError, match="only 2 unique captions"):
        build_caption_graph(captions, CMLEConfig(min_unique_captions=20), embed=lambda t: np.eye(len(t)))


def test_minilm_embeds_offline_and_similar_captions_are_neighbours():
    caps = ["a small red hex nut at the top left", "a small red hex nut at the top right",
            "a large blue gear in the centre", "a large blue gear at the bottom"]
    emb = minilm_embeddings(caps)
    assert emb.shape == (4, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[2, 0]


def _graph(n_captions=30, per=3):
    caps = [f"caption {i % n_captions}" for i in range(n_captions * per)]
    rng = np.random.default_rng(0)
    return build_caption_graph(caps, CMLEConfig(min_unique_captions=10, k=4),
                               embed=lambda t: rng.normal(size=(len(t), 16)).astype(np.float32))


def test_caption_graph_rows_are_unique_captions():
    g = _graph()
    assert len(g.captions) == 30 and g.image_caption.shape == (90,)
    assert g.neighbours.shape == (30, 4)
    assert all(len(ix) == 3 for ix in g.images_by_caption())


def test_head_starts_from_pretrained_geometry_and_shapes():
    head = CMLEHead(embed_in=32, token_in=24, embed_dim=32, patch_dim=24)
    pooled = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    z, p = head(pooled, torch.randn(5, 64, 24))
    assert z.shape == (5, 32) and p.shape == (5, 64, 24)
    torch.testing.assert_close(z, pooled)  # identity start: residual MLP is zero-initialised


def test_cmle_loss_zero_for_exact_reconstruction():
    zn = torch.randn(4, 3, 8)
    w = torch.softmax(torch.randn(4, 3), dim=-1)
    z = (w.unsqueeze(-1) * zn).sum(1)
    assert cmle_loss(z, zn, w).item() < 1e-10
    assert cmle_loss(z + 1, zn, w).item() > 1


def test_training_lowers_cmle_residual_without_collapse():
    g = _graph()
    torch.manual_seed(0)
    pooled = torch.nn.functional.normalize(torch.randn(90, 16), dim=-1)
    cfg = CMLEConfig(epochs=15, batch_size=16, lr=3e-3)
    head0 = CMLEHead(16, 8, 16, 8)
    before = train_cmle_head(CMLEHead(16, 8, 16, 8), pooled, g, CMLEConfig(epochs=0), 1.0, 0, False)
    after = train_cmle_head(head0, pooled, g, cfg, 5.0, 0, False)
    assert after["cmle_residual"] < before["cmle_residual"]
    assert after["final_std"] > 0.3 * before["final_std"]  # variance hinge: no collapse
