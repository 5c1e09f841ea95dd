"""CMLE: locally linear weights, the caption graph over unique captions, the head and its
losses, and training that bends the embedding towards the captions' structure."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmg.config import CMLEConfig
from cmg.errors import CMGError
from cmg_train.cmle.fit import build_caption_graph, check_captions, lle_weights, train_cmle_head
from cmg_train.cmle.model import CMLEHead, cmle_loss, head_from_state, head_state, oneclass_loss
from cmg_train.text import MINILM_DIM, minilm_embeddings

# -- locally linear weights ------------------------------------------------------------


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
    assert idx.shape == w.shape == (10, 3) and w.dtype == np.float32
    assert all(i not in row for i, row in enumerate(idx))  # never its own neighbour


def test_lle_weights_differ_from_uniform_on_structured_points():
    emb = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    _, w = lle_weights(emb, k=5)
    assert np.abs(w - 0.2).mean() > 0.05


def test_lle_weights_do_not_depend_on_the_embeddings_scale():
    """More neighbours than dimensions make the local Gram matrix singular; its regulariser is
    relative to the Gram's trace, so scaled embeddings give the same weights."""
    emb = np.random.default_rng(2).normal(size=(30, 2))
    idx, w = lle_weights(emb, k=5)
    idx_big, w_big = lle_weights(emb * 1000.0, k=5)
    assert np.array_equal(idx, idx_big)
    np.testing.assert_allclose(w_big, w, atol=1e-4)


def test_lle_needs_more_rows_than_neighbours():
    with pytest.raises(CMGError, match="more than k=5 distinct captions, got 5"):
        lle_weights(np.eye(5, dtype=np.float32), k=5)


# -- captions and the graph ------------------------------------------------------------


@pytest.mark.parametrize("captions, cfg, message", [
    (["a photo of a hex nut"] * 50 + ["a photo of a washer"] * 50, CMLEConfig(min_unique_captions=20),
     r"only 2 unique captions among 100 images \(minimum 20\)"),
    ([f"caption {i}" for i in range(8)], CMLEConfig(min_unique_captions=2, k=8), r"minimum 9"),
])
def test_degenerate_captions_stop_cmle_with_a_clear_message(captions, cfg, message):
    with pytest.raises(CMGError, match=message):
        check_captions(captions, cfg)
    with pytest.raises(CMGError, match=message):
        build_caption_graph(captions, cfg, embed=lambda t: np.eye(len(t)))


def test_captions_held_out_and_captions_the_encoder_reads_as_one_are_named():
    """All distinct but too few after the held-out split: add images, not variety. Distinct as
    text but one to MiniLM (past its 256 tokens; emoji it has no word for): refused, never a
    uniform W."""
    cfg = CMLEConfig(min_unique_captions=20)
    with pytest.raises(CMGError, match=r"after 3 held out.*3 images are held out for calibration.*add training images"):
        check_captions([f"a nut, number {i}" for i in range(17)], cfg, held_out=3)
    with pytest.raises(CMGError, match=r"more varied captions"):
        check_captions(["a nut"] * 5 + [f"a nut, number {i}" for i in range(12)], cfg, held_out=3)
    long = "a photo of a part " * 400
    for captions in ([f"{long} number {i}" for i in range(25)], ["\U0001F600" * (i + 1) for i in range(25)]):
        with pytest.raises(CMGError, match=r"reads the 25 distinct captions as only 1 different ones"):
            build_caption_graph(captions, cfg)
    # enough distinct ones beside them: the ones read as one are one caption (one node of W)
    words = [f"a {c} {p} at the {w}" for c in ("red", "blue", "green", "grey") for p in ("nut", "gear")
             for w in ("top", "left", "bottom")][:22]
    emoji = ["\U0001F600" * (i + 1) for i in range(30)]
    graph = build_caption_graph(words + emoji + emoji, cfg)
    assert len(graph.captions) == 23 and graph.weights.shape == (23, cfg.k)
    assert len(set(graph.image_caption[len(words):].tolist())) == 1  # every emoji image: one caption


def test_minilm_embeds_offline_and_similar_captions_are_neighbours():
    caps = ["a small red hex nut at the top left", "a small red hex nut at the top right",
            "a large blue gear in the centre", "a large blue gear at the bottom"]
    emb = minilm_embeddings(caps)
    assert emb.shape == (4, MINILM_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[2, 0]
    assert minilm_embeddings([]).shape == (0, MINILM_DIM)


def _graph(n_captions: int = 30, per: int = 3):
    caps = [f"caption {i % n_captions}" for i in range(n_captions * per)]
    rng = np.random.default_rng(0)
    return build_caption_graph(caps, CMLEConfig(min_unique_captions=10, k=4),
                               embed=lambda t: rng.normal(size=(len(t), 16)).astype(np.float32))


def test_caption_graph_rows_are_unique_captions():
    """Images sharing a caption share its row (a graph over images would only link copies)."""
    g = _graph()
    assert len(g.captions) == 30 and g.captions == sorted(g.captions)
    assert g.image_caption.shape == (90,) and g.neighbours.shape == g.weights.shape == (30, 4)
    assert [g.captions[u] for u in g.image_caption[:4]] == ["caption 0", "caption 1", "caption 2", "caption 3"]
    assert all(len(ix) == 3 for ix in g.images_by_caption())
    s = g.summary()
    assert (s["unique_captions"], s["images"], s["k"]) == (30, 90, 4)
    assert s["mean_abs_deviation_from_uniform"] == pytest.approx(float(np.abs(g.weights - 0.25).mean()))


# -- the head and its losses -----------------------------------------------------------


def test_head_starts_from_the_teacher_geometry():
    """Orthogonal projection + zero residual: cosine similarities are the teacher's at step 0."""
    torch.manual_seed(0)
    head = CMLEHead(embed_in=32, embed_dim=32)
    e = F.normalize(torch.randn(6, 32), dim=-1)
    with torch.no_grad():
        z = head(e)
    assert z.shape == (6, 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(z @ z.T, e @ e.T, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert head(torch.randn(4, 32) * 10).norm(dim=-1).allclose(torch.ones(4))
        assert CMLEHead(64, 16)(torch.randn(3, 64)).shape == (3, 16)


def test_head_state_round_trip():
    torch.manual_seed(0)
    head = CMLEHead(24, 8)
    with torch.no_grad():
        head.mlp[-1].weight.normal_()  # a trained-looking head, not the zero-init one
    buf = io.BytesIO()
    torch.save(head_state(head), buf)
    buf.seek(0)
    clone = head_from_state(torch.load(buf, weights_only=False))
    e = torch.randn(5, 24)
    with torch.no_grad():
        assert torch.equal(clone(e), head(e))
    assert (clone.embed_in, clone.embed_dim) == (24, 8) and not clone.training


def test_cmle_loss_zero_for_exact_reconstruction():
    zn = torch.randn(4, 3, 8)
    w = torch.softmax(torch.randn(4, 3), dim=-1)
    z = (w.unsqueeze(-1) * zn).sum(1)
    assert cmle_loss(z, zn, w).item() < 1e-10
    assert cmle_loss(z + 1, zn, w).item() == pytest.approx(8.0, rel=1e-5)  # 8 dims off by 1


def test_oneclass_loss_compactness_and_variance_hinge():
    center = torch.zeros(2)
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    compact, variance = oneclass_loss(z, center, torch.zeros(2))
    assert compact.item() == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert variance.item() == 0.0  # spread above the floor costs nothing
    std = z.std(0)
    _, below = oneclass_loss(z, center, std + 1.0)
    assert below.item() == pytest.approx(10.0 * 1.0)  # 10 x mean shortfall
    _, single = oneclass_loss(z[:1], center, torch.ones(2))
    assert single.item() == 0.0  # one image has no spread to measure


# -- training --------------------------------------------------------------------------


def _pooled() -> torch.Tensor:
    return F.normalize(torch.randn(90, 16, generator=torch.Generator().manual_seed(0)), dim=-1)


def _train(lam: float, graph) -> tuple[dict, CMLEHead]:
    torch.manual_seed(0)
    pooled = _pooled()
    head = CMLEHead(16, 16)
    m = train_cmle_head(head, pooled, graph, CMLEConfig(epochs=15, batch_size=16, lr=3e-3), lam, seed=0,
                        progress=False)
    return m, head


def test_cmle_term_lowers_the_caption_residual_without_collapse():
    """Same data, seed and budget: lambda > 0 fits the caption structure better than lambda 0,
    and the variance hinge keeps the embedding from collapsing onto the centre."""
    g = _graph()
    with_cmle, head = _train(5.0, g)
    oneclass, _ = _train(0.0, g)
    assert with_cmle["loss_last"] < with_cmle["loss_first"]
    assert oneclass["loss_last"] < oneclass["loss_first"]
    assert with_cmle["cmle_residual"] < 0.7 * oneclass["cmle_residual"]
    with torch.no_grad():
        start_std = float(CMLEHead(16, 16)(_pooled()).std(0).mean())
    assert with_cmle["final_std"] > 0.3 * start_std  # the hinge floor is half the start's spread
    assert not head.training


def test_training_without_a_graph_reports_no_residual():
    m, _ = _train(1.0, None)
    assert "cmle_residual" not in m and m["loss_last"] < m["loss_first"]


def test_lle_neighbours_are_the_k_nearest_other_captions():
    """The neighbour search (sklearn's, in row blocks: no U x U matrix) finds what a brute-force
    distance matrix finds, never the caption itself."""
    emb = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32)
    idx, _ = lle_weights(emb, k=6)
    e = emb.astype(np.float64)
    d = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert np.array_equal(idx, np.argsort(d, axis=1)[:, :6])
    assert not (idx == np.arange(300)[:, None]).any()
