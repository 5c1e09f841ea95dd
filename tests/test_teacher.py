"""The teacher: the one normalisation, the scratch image tower, the frozen MiniLM text side,
state round trip, retrieval, occlusion practice masks and a short training run."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmg.config import Config, TeacherConfig
from cmg.errors import CMGError
from cmg_build.opcheck import check_model
from cmg_train.cmer.fit import attention_relevance, occlusion_relevance
from cmg_train.cmer.model import OcclusionTeacher
from cmg_train.export import _export
from cmg_train.preprocess import Preprocess
from cmg_train.teacher.fit import learned_from_captions, random_keep, train_teacher
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


def test_preprocess_fit_in_chunks_is_the_whole_sets_statistics():
    """Chunks of frames, not every pixel at once in float64 (16 times the frames' bytes: 2.3 GB
    for 1,000 frames of 224 px): the same mean and sample std, whatever the chunk."""
    f = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8))
    pix = f.reshape(-1, 3).double() / 255.0
    for chunk in (7, 64, 1000):
        pp = Preprocess.fit(f, chunk=chunk)
        np.testing.assert_allclose(pp.mean, pix.mean(0).tolist(), rtol=1e-6)
        np.testing.assert_allclose(pp.std, pix.std(0).tolist(), rtol=1e-6)


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
    assert m["loss_last"] < m["loss_first"] and m["learned_from_captions"]
    assert m["retrieval_chance"] == pytest.approx(1 / 12)
    assert m["retrieval_top1"] > 0.5 > m["retrieval_chance"]
    assert logs and {r["stage"] for r in logs} == {"teacher"} and logs[-1]["step"] == 39
    # normalisation fitted on the training frames only, and stored with the teacher
    np.testing.assert_allclose(teacher.preprocess.mean, Preprocess.fit(f[tr]).mean, atol=1e-6)
    np.testing.assert_allclose(m["mean"], teacher.preprocess.mean, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_teacher_whose_captions_tell_nothing_apart_is_said(capsys):
    """One caption for every image leaves the contrastive loss at log(batch): the keep-mask's
    attention then learned from no language, which training says instead of reporting CMER."""
    f, _ = colour_pairs(24)
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid = 32, 4
    cfg.teacher.channels, cfg.teacher.steps, cfg.teacher.batch_size, cfg.teacher.lr = [8, 16], 3, 16, 3e-3
    tr, va = torch.arange(8, 24), torch.arange(8)
    _, m = train_teacher(cfg, f, ["a photo of a square"] * 24, tr, va, progress=False)
    assert not m["learned_from_captions"] and m["loss_last"] >= 0.99 * m["loss_chance"]
    assert "learned nothing from the captions" in capsys.readouterr().err
    assert learned_from_captions(1.15, 64) and not learned_from_captions(3.9, 64)
    assert not learned_from_captions(0.0, 1)  # one image per batch: nothing to tell apart


# -- the attention tower: a teacher that localises ---------------------------------------

ATTENTION = TeacherConfig(source="backbone", pool="attention", hidden=64)


def square_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[tuple[int, int]]]:
    """64 px grey noise, one captioned coloured square in a random cell of the 4 x 4 grid and
    an uncaptioned white one (clutter) in another: which cell does the caption need?"""
    g = torch.Generator().manual_seed(seed)
    names = [k for k in COLOURS if k not in ("white", "black")]
    out, caps, cells = [], [], []
    for i in range(n):
        f = (torch.randint(90, 130, (64, 64, 1), generator=g)).expand(64, 64, 3).clone()
        a, b = torch.randperm(16, generator=g)[:2].tolist()
        name = names[i % len(names)]
        for cell, colour in ((a, COLOURS[name]), (b, COLOURS["white"])):
            y, x = 16 * (cell // 4), 16 * (cell % 4)
            f[y + 3:y + 13, x + 3:x + 13] = torch.tensor(colour)
        out.append(f.to(torch.uint8))
        caps.append(f"a {name} square")
        cells.append((a, b))
    return torch.stack(out), caps, cells


def test_attention_tower_state_round_trip_and_grid_errors():
    torch.manual_seed(0)
    teacher = build_teacher(ATTENTION, 64, MEAN, STD, grid=4)
    clone = teacher_from_state(teacher_state(teacher))
    f = frames(3, size=64)
    with torch.no_grad():
        assert torch.equal(clone(f), teacher(f)) and clone(f).shape == (3, MINILM_DIM)
        _, weight = teacher.visual.cells(teacher.preprocess(f))
    assert clone.visual.grid == 4 and weight.shape == (3, 16)
    torch.testing.assert_close(weight.sum(1), torch.ones(3))
    with pytest.raises(CMGError, match="on the 3 x 3 CMER grid needs a stride-21.3333 block"):
        build_teacher(ATTENTION, 64, MEAN, STD, grid=3)


@pytest.mark.slow  # trains a teacher on the real backbone: about 15 s
def test_attention_teacher_relevance_finds_the_captioned_square_not_the_clutter():
    """Occlusion relevance on the trained attention teacher peaks on the cell the caption
    describes: what CMER's keep-mask needs (the grid tower's did not localise on real data)."""
    f, caps, cells = square_pairs(96)
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid = 64, 4
    cfg.backbone.variant = "efficientnet_lite0"
    cfg.teacher = TeacherConfig(source="backbone", pool="attention", hidden=64, steps=80, batch_size=48,
                                lr=3e-3, shift=0, fill_prob=0.3)
    tr, va = torch.arange(24, 96), torch.arange(24)
    teacher, m = train_teacher(cfg, f, caps, tr, va, progress=False)
    assert m["retrieval_top1"] > 0.5
    text = teacher.encode_text([caps[i] for i in va.tolist()])
    for rel in (occlusion_relevance(teacher, f[va], text, grid=4), attention_relevance(teacher, f[va], grid=4)):
        assert rel.shape == (24, 4, 4)
        top = rel.flatten(1).argmax(1).tolist()
        hits = sum(t == cells[i][0] for t, i in zip(top, va.tolist(), strict=True))
        clutter = sum(t == cells[i][1] for t, i in zip(top, va.tolist(), strict=True))
        assert hits >= 18 and clutter <= 2, (hits, clutter)


def test_grid_tower_state_round_trip():
    """The grid tower (`teacher.pool: grid`, the other shipped configs) still builds, embeds
    and round-trips; the attention one is `small`'s and `tiny`'s."""
    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig(source="backbone", hidden=32), 64, MEAN, STD)
    clone = teacher_from_state(teacher_state(teacher))
    f = frames(2, size=64)
    with torch.no_grad():
        assert torch.equal(clone(f), teacher(f)) and teacher(f).shape == (2, MINILM_DIM)
    assert type(clone.visual).__name__ == "BackboneTower"


def test_attention_relevance_needs_the_attention_tower():
    with pytest.raises(CMGError, match="not the attention tower"):
        attention_relevance(build_teacher(TeacherConfig(source="backbone", hidden=32), 64, MEAN, STD),
                            frames(2, size=64), grid=4)


@pytest.mark.filterwarnings("ignore")
def test_attention_teacher_exports_as_the_occlusion_graph(tmp_path):
    """The exact-mode graph (P+1 passes of the attention teacher) passes TensorRT's op rules
    and ONNX Runtime gives the PyTorch relevance at any batch."""
    torch.manual_seed(0)
    teacher = build_teacher(ATTENTION, 64, MEAN, STD, grid=4)
    bank = F.normalize(torch.randn(3, MINILM_DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    graph = OcclusionTeacher(teacher, bank, 4).eval()
    path = tmp_path / "cmer_teacher.onnx"
    f = frames(3, size=64, seed=2)
    _export(graph, (f[:2],), path, ["IMAGE"], ["PATCH_SCORES"])
    model = onnx.load(path)
    for d in model.graph.output[0].type.tensor_type.shape.dim[1:]:
        d.dim_value = 4  # the contract's static G x G, as cmg export declares it
    assert check_model(model) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = graph(f).numpy()
    for n in (1, 3):
        (got,) = sess.run(None, {"IMAGE": f[:n].numpy()})
        np.testing.assert_allclose(got, want[:n], atol=1e-5, rtol=1e-4)
