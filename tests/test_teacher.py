"""The teacher: the one normalisation, the scratch image tower, the frozen MiniLM text side,
state round trip, retrieval, occlusion practice masks and a short training run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmg.config import Config, TeacherConfig
from cmg.errors import CMGError
from cmg_train.preprocess import Preprocess
from cmg_train.teacher.fit import random_keep, train_teacher
from cmg_train.teacher.model import (
    ImageTower,
    Teacher,
    build_teacher,
    coord_channels,
    retrieval_top1,
    teacher_from_state,
    teacher_state,
)
from cmg_train.text import MINILM_DIM

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
SMALL = TeacherConfig(source="scratch", channels=[8, 16])


def frames(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    torch.manual_seed(0)
    return build_teacher(SMALL, 32, MEAN, STD)


# -- the one normalisation -------------------------------------------------------------


def test_preprocess_maps_the_mean_to_zero_and_scales_by_std():
    pp = Preprocess(MEAN, STD)
    f = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    f[..., 0], f[..., 1], f[..., 2] = 102, 153, 255  # 0.4, 0.6, 1.0 of 255
    x = pp(f)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.zeros(2, 4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 1], torch.full((2, 4, 5), (0.6 - 0.5) / 0.25), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 2], torch.full((2, 4, 5), (1.0 - 0.6) / 0.3), atol=1e-5, rtol=0)
    assert np.allclose(pp.mean, MEAN) and np.allclose(pp.std, STD)


@pytest.mark.parametrize("mean, std, message", [
    (MEAN, (0.2, 0.0, 0.3), "std must be positive"),
    ((0.5, 0.5), STD, "3 channel values"),
])
def test_preprocess_rejects_bad_statistics(mean, std, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(mean, std)


def test_from_unit_equals_the_uint8_path():
    """Training augments images in [0, 1]; the served graph starts from UINT8. Same numbers."""
    pp = Preprocess(MEAN, STD)
    f = frames(3, 8)
    unit = f.permute(0, 3, 1, 2).float() / 255.0
    torch.testing.assert_close(pp.from_unit(unit), pp(f), atol=1e-5, rtol=1e-5)


def test_preprocess_fit_measures_the_training_frames():
    f = torch.zeros(4, 6, 6, 3, dtype=torch.uint8)
    f[..., 0] = 51             # constant 0.2: std clamped, never a division by zero
    f[:2, ..., 1] = 255        # half 0, half 1: mean 0.5, std ~0.5
    f[..., 2] = 255
    pp = Preprocess.fit(f)
    np.testing.assert_allclose(pp.mean, [0.2, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(pp.std, [1e-3, 0.5, 1e-3], rtol=1e-2)


# -- image side ------------------------------------------------------------------------


def test_coord_channels_append_y_then_x_in_minus_one_to_one():
    x = torch.randn(2, 3, 4, 5)
    y = coord_channels(x)
    assert y.shape == (2, 5, 4, 5) and torch.equal(y[:, :3], x)
    torch.testing.assert_close(y[0, 3, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(y[1, 4, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    assert torch.equal(y[0, 3:], y[1, 3:])  # the same for every image


def test_image_tower_downsample_is_an_average_pool_in_front():
    """downsample=2 on 64 px frames is the same network on 2x2-averaged 32 px frames."""
    torch.manual_seed(0)
    a, b = ImageTower([8, 16], 24, downsample=2).eval(), ImageTower([8, 16], 24).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(F.avg_pool2d(x, 2)))
        assert a(x).shape == (3, 24)


def test_teacher_embeds_frames_on_the_unit_sphere(teacher):
    with torch.no_grad():
        emb = teacher(frames(5))
        by_hand = teacher.encode_image(teacher.preprocess(frames(5)))
    assert emb.shape == (5, MINILM_DIM) and teacher.embed_dim == MINILM_DIM
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    assert torch.equal(emb, by_hand)


# -- text side -------------------------------------------------------------------------


def test_encode_text_is_frozen_normalised_and_caption_specific(teacher):
    emb = teacher.encode_text(["a red hex nut", "a blue washer", "a red hex nut"])
    assert emb.shape == (3, MINILM_DIM) and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])
    assert teacher.encode_text([]).shape == (0, MINILM_DIM)


# -- state, errors ---------------------------------------------------------------------


def test_teacher_state_round_trip(teacher):
    buf = io.BytesIO()
    torch.save(teacher_state(teacher), buf)
    buf.seek(0)
    clone = teacher_from_state(torch.load(buf, weights_only=False))
    f = frames(3, seed=1)
    torch.manual_seed(1)
    other = build_teacher(SMALL, 32, MEAN, STD)  # same architecture, other weights
    with torch.no_grad():
        assert torch.equal(clone(f), teacher(f))
        assert not torch.allclose(other(f), teacher(f))
    assert np.allclose(clone.preprocess.mean, MEAN) and np.allclose(clone.preprocess.std, STD)
    assert clone.cfg == teacher.cfg and clone.image_size == 32


def test_teacher_state_keeps_downsample():
    cfg = TeacherConfig(source="scratch", channels=[8, 16], downsample=2)
    clone = teacher_from_state(teacher_state(build_teacher(cfg, 32)))
    assert clone.visual.downsample == 2


@pytest.mark.parametrize("cfg, message", [
    (TeacherConfig(source="bogus"), "unknown source"),
    (TeacherConfig(source="open_clip"), "arch"),
])
def test_build_errors_name_the_problem(cfg, message):
    with pytest.raises(CMGError, match=message):
        build_teacher(cfg, 64)


def test_state_without_weights_is_a_cmg_error(teacher):
    state = teacher_state(teacher)
    del state["state_dict"]
    with pytest.raises(CMGError, match="missing key 'state_dict'"):
        teacher_from_state(state)


# -- retrieval -------------------------------------------------------------------------


class MeanColour(nn.Module):
    """A hand-made image side: the embedding is the frame's mean normalised colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def corner_colour_teacher() -> tuple[Teacher, torch.Tensor]:
    """8 frames in the 8 corner colours of the RGB cube: 8 distinct embedding directions."""
    pp = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    t = Teacher(SMALL, 4, pp, MeanColour(), lambda caps: torch.zeros(len(caps), 3), 3).eval()
    bits = torch.tensor([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=torch.uint8) * 255
    return t, bits.view(8, 1, 1, 3).expand(8, 4, 4, 3).contiguous()


def test_retrieval_top1_on_hand_made_embeddings():
    t, f = corner_colour_teacher()
    with torch.no_grad():
        own = t(f)
    assert retrieval_top1(t, f, own, batch=8) == 1.0
    assert retrieval_top1(t, f, own.roll(1, 0), batch=8) == 0.0
    # identical captions cannot be told apart: every pick is a hit
    assert retrieval_top1(t, f, own[:1].expand(8, -1), batch=8) == 1.0
    # Retrieval is within groups of `batch`: with the halves swapped, image i's nearest caption
    # inside its group of 4 is colour i ^ 4 (one bit away), which sits at position i (a hit);
    # among all 8 its own caption wins, at position i ^ 4 (a miss).
    swapped = torch.cat([own[4:], own[:4]])
    assert retrieval_top1(t, f, swapped, batch=4) == 1.0
    assert retrieval_top1(t, f, swapped, batch=8) == 0.0


# -- occlusion practice ----------------------------------------------------------------


def test_random_keep_drops_between_one_and_share_of_the_patches():
    gen = torch.Generator().manual_seed(0)
    keep = random_keep(400, 4, share=0.25, prob=1.0, gen=gen)
    assert keep.shape == (400, 4, 4) and set(keep.unique().tolist()) == {0.0, 1.0}
    dropped = (keep == 0).flatten(1).sum(1)
    assert set(dropped.tolist()) == {1, 2, 3, 4}  # int(0.25 * 16) = 4 at most, all counts drawn
    assert torch.all(random_keep(50, 4, 0.25, 0.0, gen) == 1)


def test_random_keep_prob_is_the_share_of_images_touched():
    keep = random_keep(1000, 8, share=0.3, prob=0.6, gen=torch.Generator().manual_seed(1))
    touched = float((keep.flatten(1).min(1).values == 0).float().mean())
    assert abs(touched - 0.6) < 0.05


def test_random_keep_is_deterministic_under_one_seed():
    a = random_keep(20, 8, 0.3, 0.6, torch.Generator().manual_seed(3))
    b = random_keep(20, 8, 0.3, 0.6, torch.Generator().manual_seed(3))
    c = random_keep(20, 8, 0.3, 0.6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- training --------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "white": (240, 240, 240), "black": (15, 15, 15)}


def colour_pairs(n: int) -> tuple[torch.Tensor, list[str]]:
    """Noisy flat-colour frames and their captions: a task a tiny tower learns in seconds."""
    g = torch.Generator().manual_seed(0)
    names = list(COLOURS)
    out, caps = [], []
    for i in range(n):
        name = names[i % len(names)]
        noise = torch.randint(-20, 20, (32, 32, 3), generator=g)
        out.append((noise + torch.tensor(COLOURS[name])).clamp(0, 255).to(torch.uint8))
        caps.append(f"a {name} square")
    return torch.stack(out), caps


def test_train_teacher_learns_retrieval_and_logs():
    f, caps = colour_pairs(48)
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid = 32, 4
    cfg.teacher.channels, cfg.teacher.steps, cfg.teacher.batch_size, cfg.teacher.lr = [8, 16], 40, 36, 3e-3
    tr, va = torch.arange(12, 48), torch.arange(12)
    logs: list[dict] = []
    teacher, m = train_teacher(cfg, f, caps, tr, va, progress=False, log=logs.append)
    assert m["steps"] == 40 and m["unique_captions"] == 6
    assert m["loss_last"] < m["loss_first"]
    assert m["retrieval_chance"] == pytest.approx(1 / 12)
    assert m["retrieval_top1"] > 0.5 > m["retrieval_chance"]
    assert logs and {r["stage"] for r in logs} == {"teacher"} and logs[-1]["step"] == 39
    # normalisation fitted on the training frames only, and stored with the teacher
    np.testing.assert_allclose(teacher.preprocess.mean, Preprocess.fit(f[tr]).mean, atol=1e-6)
    np.testing.assert_allclose(m["mean"], teacher.preprocess.mean, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
