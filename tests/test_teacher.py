"""The CLIP teacher: normalisation, embeddings, patch tokens, state round trip, training."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from cmg.config import Config, TeacherConfig
from cmg.errors import CMGError
from cmg_train.teacher import (
    Preprocess,
    build_teacher,
    retrieval_metrics,
    teacher_from_state,
    teacher_state,
    train_teacher,
)

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(TeacherConfig(), 64, MEAN, STD)


def frames(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g)


def test_preprocess_maps_the_mean_to_zero_and_scales_by_std():
    pp = Preprocess(MEAN, STD)
    f = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    f[..., 0], f[..., 1], f[..., 2] = 102, 153, 255  # 0.4, 0.6, 1.0 of 255
    x = pp(f)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.zeros(1), atol=1e-5)
    assert torch.allclose(x[:, 1], torch.full((1,), (0.6 - 0.5) / 0.25), atol=1e-5)
    assert torch.allclose(x[:, 2], torch.full((1,), (1.0 - 0.6) / 0.3), atol=1e-5)
    assert np.allclose(pp.mean, MEAN) and np.allclose(pp.std, STD)
    with pytest.raises(ValueError, match="std"):
        Preprocess(MEAN, (0.2, 0.0, 0.3))


def test_visual_features_embedding_equals_encode_image(teacher):
    x = teacher.preprocess(frames(5))
    with torch.no_grad():
        ref = teacher.encode_image(x)
        emb, tokens = teacher.visual_features(x)
        emb0, tokens0 = teacher.visual_features(x, layer=0)
    assert teacher.grid == 8
    assert emb.shape == (5, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(emb, ref, atol=1e-6) and torch.allclose(emb0, ref, atol=1e-6)
    assert tokens.shape == tokens0.shape == (5, 64, 64)  # [B, G*G, width]
    assert not torch.allclose(tokens, tokens0)  # different layers really differ
    with pytest.raises(ValueError, match="layer"):
        teacher.visual_features(x, layer=2)


def test_encode_text_is_normalised_and_caption_specific(teacher):
    emb = teacher.encode_text(["a red hex nut", "a blue washer", "a red hex nut"], batch_size=2)
    assert emb.shape == (3, 64) and not emb.requires_grad
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])


def test_teacher_state_round_trip(teacher):
    buf = io.BytesIO()
    torch.save(teacher_state(teacher), buf)
    buf.seek(0)
    clone = teacher_from_state(torch.load(buf, weights_only=False))
    f = frames(3, seed=1)
    with torch.no_grad():
        assert torch.equal(clone(f), teacher(f))
    assert torch.equal(clone.encode_text(["a gear"]), teacher.encode_text(["a gear"]))
    assert clone.grid == teacher.grid and np.allclose(clone.preprocess.mean, MEAN)


def test_build_errors_name_the_problem():
    with pytest.raises(CMGError, match="unknown source"):
        build_teacher(TeacherConfig(source="bogus"), 64)
    with pytest.raises(CMGError, match="arch"):
        build_teacher(TeacherConfig(source="open_clip"), 64)
    with pytest.raises(CMGError, match="divisible"):
        build_teacher(TeacherConfig(width=60, heads=8), 64)


def test_retrieval_counts_duplicates_separately(teacher):
    f = frames(64, seed=2)
    caps = [f"caption {i % 4}" for i in range(64)]
    m = retrieval_metrics(teacher, f, caps)
    # with 4 distinct captions an image's own row is never uniquely best among its 16 copies
    assert m["pairs"] == 64 and m["top1"] <= 1 / 16 + 1e-9
    assert m["top1_dup"] >= m["top1"]
    with pytest.raises(CMGError, match="held-out"):
        retrieval_metrics(teacher, f[:10], caps[:10])


def test_train_teacher_lowers_the_loss_and_logs(tmp_path):
    pytest.importorskip("cmg.synth")
    cfg = Config()
    cfg.teacher.scenes, cfg.teacher.epochs, cfg.teacher.batch_size = 384, 2, 64
    cfg.teacher.lr = 2e-3
    teacher, m = train_teacher(cfg, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == m["steps"] == 12 and m["retrieval_pairs"] == 64
    assert {"stage", "epoch", "step", "loss"} <= set(lines[0]) and lines[0]["stage"] == "teacher"
    assert m["loss_last"] < m["loss_first"]
    assert 0.0 <= m["retrieval_top1"] <= m["retrieval_top1_dup"] <= 1.0
    assert len(m["mean"]) == 3 and np.allclose(teacher.preprocess.mean, m["mean"], atol=1e-5)
