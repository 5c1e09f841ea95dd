"""CMER: occlusion relevance, the keep rule and fill, the exact-mode graph, the scorer and
its distillation, the mask metrics, and the ONNX export of everything the graphs apply."""

from __future__ import annotations

import io
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmg.config import CMERConfig, Config, TeacherConfig
from cmg.errors import CMGError
from cmg_train.augment import dihedral
from cmg_train.cmer.fit import normalised_target, occlusion_relevance, train_scorer
from cmg_train.cmer.model import (
    CMERScorer,
    OcclusionTeacher,
    ScorerGraph,
    keep_mask,
    keep_mask_cfg,
    occlusion_masks,
    scorer_from_state,
    scorer_state,
)
from cmg_train.cmer.report import (
    cmer_metrics,
    defect_coverage,
    keep_iou,
    mask_quality,
    random_keep_like,
    speed_ratio,
)
from cmg_train.masking import apply_mask, upsample_keep
from cmg_train.preprocess import Preprocess
from cmg_train.teacher.model import build_teacher

G, S, P = 8, 64, 8  # grid, image size, patch size
PLANTED = (3, 5)


class OnePatchTeacher(nn.Module):
    """A hand-made teacher whose image embedding depends on patch PLANTED only."""

    image_size = S

    def __init__(self):
        super().__init__()
        self.preprocess = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        r, c = PLANTED
        colour = x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P].mean(dim=(2, 3))  # [B,3]
        return F.normalize(torch.cat([torch.ones_like(colour[:, :1]), colour], dim=1), dim=-1)


def text_for(colour) -> torch.Tensor:
    """The 'caption' embedding agreeing with a normalised patch colour."""
    return F.normalize(torch.tensor([[1.0, *colour]]), dim=-1)


def planted_frames(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(0, 256, (n, S, S, 3), dtype=torch.uint8, generator=g)
    r, c = PLANTED
    f[:, r * P:(r + 1) * P, c * P:(c + 1) * P] = torch.tensor([250, 20, 20], dtype=torch.uint8)
    return f


def planted_colour(t: OnePatchTeacher, f: torch.Tensor) -> list[float]:
    return t.preprocess(f[:1])[0, :, PLANTED[0] * P, PLANTED[1] * P].tolist()


@pytest.fixture(scope="module")
def scratch_teacher():
    """A real (untrained) scratch teacher, frozen as train.py leaves it."""
    torch.manual_seed(0)
    t = build_teacher(TeacherConfig(source="scratch", channels=[8, 16, 16]), S, (0.45, 0.5, 0.55), (0.25, 0.25, 0.25))
    return t.eval().requires_grad_(False)


# -- occlusion (exact mode) ------------------------------------------------------------


def test_occlusion_masks_fill_one_patch_each_row_major():
    m = occlusion_masks(G, S)
    assert m.shape == (G * G + 1, 1, S, S)
    assert m[0].min() == 1
    filled = (m[1:] == 0).flatten(1).sum(1)
    assert torch.all(filled == P * P)
    i = 1 + 2 * G + 6  # row 2, column 6
    assert m[i, 0, 2 * P, 6 * P] == 0 and m[i, 0, 2 * P, 5 * P] == 1 and m[i, 0, 3 * P, 6 * P] == 1


def test_occlusion_relevance_finds_the_planted_patch():
    t = OnePatchTeacher()
    f = planted_frames(3)
    r0, c0 = PLANTED
    text = text_for(planted_colour(t, f)).expand(3, -1)
    rel = occlusion_relevance(t, f, text, G, batch=70)  # 70 // 65 = 1 image per forward
    assert rel.shape == (3, G, G)
    flat = rel.flatten(1)
    assert torch.all(flat.argmax(1) == r0 * G + c0)
    assert torch.all(flat[:, r0 * G + c0] > 0.3)
    others = torch.cat([flat[:, :r0 * G + c0], flat[:, r0 * G + c0 + 1:]], dim=1)
    assert others.abs().max() < 1e-6
    # batching must not change the numbers
    torch.testing.assert_close(rel, occlusion_relevance(t, f, text, G, batch=1000), atol=1e-6, rtol=0)


@pytest.mark.parametrize("frames, text, message", [
    (torch.zeros(2, 3, S, S, dtype=torch.uint8), torch.zeros(2, 4), r"\[N,H,W,3\]"),
    (torch.zeros(3, S, S, 3, dtype=torch.uint8), torch.zeros(2, 4), "text embeddings"),
])
def test_occlusion_relevance_rejects_misaligned_inputs(frames, text, message):
    with pytest.raises(ValueError, match=message):
        occlusion_relevance(OnePatchTeacher(), frames, text, G)


def test_occlusion_teacher_retrieves_the_caption_and_matches():
    t = OnePatchTeacher()
    f = planted_frames(2, seed=3)
    bank = torch.cat([text_for([-1.0, 1.0, 0.0]), text_for(planted_colour(t, f)), text_for([0.0, -2.0, 2.0])])
    with torch.no_grad():
        got = OcclusionTeacher(t, bank, G)(f)
    torch.testing.assert_close(got, occlusion_relevance(t, f, bank[[1, 1]], G), atol=1e-6, rtol=0)


def test_occlusion_teacher_equals_the_batched_procedure_on_a_real_teacher(scratch_teacher):
    bank = torch.randn(4, scratch_teacher.embed_dim, generator=torch.Generator().manual_seed(0))
    f = planted_frames(4, seed=4)
    with torch.no_grad():
        got = OcclusionTeacher(scratch_teacher, bank, G).eval()(f)
        best = (scratch_teacher(f) @ F.normalize(bank, dim=-1).T).argmax(1)
    ref = occlusion_relevance(scratch_teacher, f, F.normalize(bank, dim=-1)[best], G, batch=130)
    assert got.shape == (4, G, G) and ref.abs().max() > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_occlusion_teacher_rejects_an_empty_bank():
    with pytest.raises(ValueError, match="caption bank"):
        OcclusionTeacher(OnePatchTeacher(), torch.zeros(0, 4), G)


# -- keep rule and fill ----------------------------------------------------------------


def test_keep_mask_relative_threshold_and_growth():
    s = torch.zeros(1, G, G)
    s[0, 4, 4], s[0, 1, 1], s[0, 6, 1] = 1.0, 0.25, 0.15  # 0.25 > 0.2*max, 0.15 is not
    k = keep_mask(s, "relative", alpha=0.2, grow=False)
    assert k.dtype == torch.float32 and set(k.unique().tolist()) == {0.0, 1.0}
    assert k.sum() == 2 and k[0, 4, 4] == 1 and k[0, 1, 1] == 1 and k[0, 6, 1] == 0
    g = keep_mask(s, "relative", alpha=0.2, grow=True)
    assert g.sum() == 18  # two 3x3 blocks, no overlap
    assert g[0, 3, 3] == 1 and g[0, 5, 5] == 1 and g[0, 0, 0] == 1 and g[0, 6, 6] == 0
    assert keep_mask(s, "relative", alpha=0.1, grow=False).sum() == 3
    s[0, 2, 6] = 0.25  # exactly 0.25 * max: kept only above it (r > alpha max), as the design says
    assert keep_mask(s, "relative", alpha=0.25, grow=False).sum() == 1


def test_keep_mask_keeps_everything_when_nothing_is_relevant():
    """max <= 0: nothing is relevant, so nothing may be discarded."""
    s = torch.stack([torch.zeros(G, G), -torch.rand(G, G), torch.rand(G, G)])
    k = keep_mask(s, "relative", alpha=0.2, grow=False)
    assert k[0].min() == 1 and k[1].min() == 1
    assert k[2].min() == 0  # a positive map is still thresholded


def test_keep_mask_top_rho_keeps_a_fixed_fraction():
    s = torch.randperm(G * G).float().view(1, G, G).repeat(2, 1, 1)
    k = keep_mask(s, "top_rho", rho=0.4)
    assert torch.all(k.flatten(1).sum(1) == round(0.4 * G * G))
    assert torch.all(k.flatten(1)[s.flatten(1) >= G * G - 26] == 1)
    ties = torch.zeros(1, G, G)
    ties[0, 0, 0] = 1.0
    assert keep_mask(ties, "top_rho", rho=0.4).sum() == round(0.4 * G * G)  # noise-floor ties


@pytest.mark.parametrize("scores, kwargs, message", [
    (torch.zeros(1, G, G), {"rule": "bogus"}, "rule"),
    (torch.zeros(G, G), {}, r"\[B,G,G\]"),
])
def test_keep_mask_errors(scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        keep_mask(scores, **kwargs)


@pytest.mark.parametrize("cfg", [CMERConfig(), CMERConfig(alpha=0.5, grow=False),
                                 CMERConfig(rule="top_rho", rho=0.25)], ids=["default", "no-grow", "top-rho"])
def test_keep_mask_cfg_applies_the_configured_rule(cfg):
    s = torch.rand(3, G, G, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep_mask_cfg(s, cfg), keep_mask(s, cfg.rule, cfg.alpha, cfg.rho, cfg.grow))


def test_upsample_keep_covers_each_patch_exactly():
    keep = torch.zeros(1, 2, 2)
    keep[0, 1, 0] = 1
    up = upsample_keep(keep, (4, 6))
    want = torch.zeros(1, 1, 4, 6)
    want[0, 0, 2:, :3] = 1
    assert torch.equal(up, want)


def test_apply_mask_fills_zeros_at_the_dropped_patch():
    x = torch.randn(2, 3, S, S) + 5.0
    keep = torch.ones(2, G, G)
    keep[1, 2, 7] = 0
    y = apply_mask(x, keep)
    assert torch.equal(y[0], x[0])
    assert torch.all(y[1, :, 2 * P:3 * P, 7 * P:8 * P] == 0)
    assert (y[1] == 0).sum() == 3 * P * P


# -- the scorer ------------------------------------------------------------------------


@pytest.mark.parametrize("channels, grid, size", [
    ([16, 32, 64], 8, 64),   # 64 -> 8 by strides
    ([8, 8, 8, 8], 8, 64),   # the 4th stage would go below G: stride 1
    ([8], 8, 48),            # 48 -> 24, average-pooled to 8
    ([8, 8], 4, 32),
])
def test_scorer_maps_any_planned_size_to_the_grid(channels, grid, size):
    scorer = CMERScorer(channels, grid, size).eval()
    with torch.no_grad():
        assert scorer(torch.randn(2, 3, size, size)).shape == (2, grid, grid)


def test_scorer_rejects_a_grid_that_does_not_divide_the_frame():
    with pytest.raises(ValueError, match="not a multiple of grid"):
        CMERScorer([8], 6, 64)


def test_scorer_state_round_trip():
    torch.manual_seed(0)
    scorer = CMERScorer([8, 16], G, S).eval()
    buf = io.BytesIO()
    torch.save(scorer_state(scorer), buf)
    buf.seek(0)
    clone = scorer_from_state(torch.load(buf, weights_only=False))
    x = torch.randn(3, 3, S, S)
    with torch.no_grad():
        assert torch.equal(clone(x), scorer(x))
    assert (clone.channels, clone.grid, clone.image_size) == ([8, 16], G, S) and not clone.training


def test_scorer_graph_serves_the_estimate_of_the_normalised_target():
    """PATCH_SCORES = sigmoid(logits), the scorer's estimate of r / max r (its training target),
    so `r > alpha * max r` means the same on the scorer's maps as on the teacher's."""
    pp = Preprocess((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    torch.manual_seed(0)
    scorer = CMERScorer([8, 16], G, S).eval()
    f = planted_frames(2)
    with torch.no_grad():
        logits = scorer(pp(f))
        served = ScorerGraph(pp, scorer)(f)
    assert torch.equal(served, torch.sigmoid(logits))
    assert logits.min() < 0 < served.min()  # the keep rule never sees a negative peak


def test_normalised_target():
    r = torch.stack([torch.full((G, G), -0.1), torch.zeros(G, G)])
    r[1, 0, 0], r[1, 0, 1], r[1, 0, 2] = 2.0, -1.0, 0.5
    t = normalised_target(r)
    assert torch.all(t[0] == 1)  # nothing relevant: keep all, like keep_mask
    assert t[1, 0, 0] == 1 and t[1, 0, 1] == 0 and t[1, 0, 2] == 0.25 and t[1, 1, 1] == 0


def test_dihedral_moves_image_and_map_together():
    """Relevance moves with its pixels: the image stays the nearest-upsampled map."""
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(2, 4, 4, generator=gen)  # no symmetry: the 8 transforms give 8 maps
    x = upsample_keep(y, (16, 16)).repeat(1, 3, 1, 1)
    seen = set()
    for _ in range(60):
        x2, y2 = dihedral(gen, x, y)
        assert torch.equal(x2, upsample_keep(y2, (16, 16)).repeat(1, 3, 1, 1))
        seen.add(tuple(y2[0].flatten().tolist()))
    assert len(seen) == 8  # all rotations and flips occur
    a = dihedral(torch.Generator().manual_seed(5), x, y)
    b = dihedral(torch.Generator().manual_seed(5), x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _red_patches(n: int, g: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise with 2 red patches per image; relevance is positive exactly there."""
    gen = torch.Generator().manual_seed(seed)
    size = g * p
    f = torch.randint(60, 140, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    rel = torch.zeros(n, g, g)
    for i in range(n):
        for cell in torch.randperm(g * g, generator=gen)[:2].tolist():
            r, c = divmod(cell, g)
            f[i, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.tensor([230, 30, 30], dtype=torch.uint8)
            rel[i, r, c] = 0.05
    return f, rel


def test_distillation_learns_the_relevance_maps():
    f, rel = _red_patches(64, 4, 8)
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid = 32, 4
    sc = cfg.cmer.scorer
    sc.channels, sc.steps, sc.batch_size, sc.lr = [8, 16], 60, 32, 5e-3
    pp = Preprocess((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    teacher = type("T", (), {"preprocess": pp})()  # the scorer reads only the normalisation
    scorer, m = train_scorer(cfg, teacher, f, rel, progress=False)
    assert m["steps"] == 60 and m["val_images"] == 10 and m["train_images"] == 54
    assert m["loss_last"] < 0.8 * m["loss_first"]
    assert m["keep_iou"] > 0.6
    assert m["keep_fraction_teacher"] == pytest.approx(float(keep_mask_cfg(rel, cfg.cmer).mean()), abs=0.1)
    with torch.no_grad():
        assert scorer(pp(f[:5])).shape == (5, 4, 4)
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())


@pytest.mark.parametrize("n, n_rel, error, message", [
    (7, 7, CMGError, "at least 8 images"),
    (8, 9, ValueError, "relevance maps"),
])
def test_distillation_input_errors(n, n_rel, error, message):
    with pytest.raises(error, match=message):
        train_scorer(Config(), None, torch.zeros(n, S, S, 3, dtype=torch.uint8), torch.zeros(n_rel, G, G),
                     progress=False)


# -- metrics ---------------------------------------------------------------------------


def test_keep_iou_and_random_control():
    a = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert keep_iou(a, b) == pytest.approx((0.5 + 1.0) / 2)  # both empty counts 1
    big = (torch.rand(5, G, G, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    rnd = random_keep_like(big, seed=1)
    assert torch.equal(rnd.flatten(1).sum(1), big.flatten(1).sum(1)) and not torch.equal(rnd, big)
    assert torch.equal(rnd, random_keep_like(big, seed=1))


def test_mask_quality_on_hand_made_masks():
    keep = torch.zeros(1, 2, 2)
    keep[0, 0, 0] = 1
    part = np.zeros((1, 4, 4), bool)
    part[0, 0, :] = True  # 2 pixels in the kept patch, 2 outside
    clutter = np.zeros((1, 4, 4), bool)
    clutter[0, 3, 3] = clutter[0, 1, 1] = True  # one removed, one kept
    assert mask_quality(keep, part, clutter) == {"part_recall": 0.5, "clutter_removed": 0.5, "keep_fraction": 0.25}
    none = mask_quality(keep, np.zeros_like(part), np.zeros_like(clutter))
    assert none["part_recall"] is None and none["clutter_removed"] is None


def test_defect_coverage_on_hand_made_masks():
    keep = torch.zeros(2, 2, 2)
    keep[0, 0, 0] = 1
    keep[1] = 1
    gt = np.zeros((2, 4, 4), bool)
    gt[0, 0, 1:3] = True  # one defect pixel kept, one dropped
    gt[1, 3, 3] = True    # kept (everything is)
    cov = defect_coverage(keep, gt)
    assert cov["defect_pixels_kept"] == pytest.approx(2 / 3)
    assert cov["pixels_dropped"] == pytest.approx((12 + 0) / 32)
    assert defect_coverage(keep, np.zeros_like(gt))["defect_pixels_kept"] is None


def test_cmer_metrics_rows():
    t = OnePatchTeacher()
    f = planted_frames(4)
    rel = occlusion_relevance(t, f, text_for(planted_colour(t, f)).expand(4, -1), G)
    part = np.zeros((4, S, S), bool)
    part[:, PLANTED[0] * P:(PLANTED[0] + 1) * P, PLANTED[1] * P:(PLANTED[1] + 1) * P] = True
    clutter = np.zeros((4, S, S), bool)
    clutter[:, :8, :8] = True
    m = cmer_metrics(rel, CMERConfig(), part, clutter, scorer_scores=rel)
    assert m["images"] == 4 and m["alpha"] == 0.2
    assert m["teacher"]["relative"]["part_recall"] == 1.0
    assert m["teacher"]["relative"]["clutter_removed"] == 1.0
    assert m["teacher"]["relative"]["keep_fraction"] == pytest.approx(9 / 64)  # one patch, grown
    assert m["teacher"]["top_rho"]["keep_fraction"] == pytest.approx(round(0.4 * 64) / 64)
    assert m["teacher"]["random"]["keep_fraction"] == pytest.approx(9 / 64)
    assert m["keep_iou"] == 1.0 and set(m["scorer"]) == {"relative", "top_rho", "random"}
    plain = cmer_metrics(rel, CMERConfig())  # folders without part/clutter masks
    assert plain["teacher"] == {"keep_fraction": pytest.approx(9 / 64)} and "keep_iou" not in plain


def test_speed_ratio_is_exact_over_one_pass():
    def exact(_):
        time.sleep(0.02)

    r = speed_ratio(exact, lambda _: None, torch.zeros(3, 1), repeats=3)
    assert r["batch"] == 3 and r["exact_s"] >= 0.02
    assert r["speed_ratio"] == pytest.approx(r["exact_s"] / max(r["scorer_s"], 1e-9))
    assert r["speed_ratio"] > 10


# -- ONNX ------------------------------------------------------------------------------


def _export(module: nn.Module, path, example: torch.Tensor) -> ort.InferenceSession:
    torch.onnx.export(
        module, (example,), str(path), dynamo=False, opset_version=17,
        input_names=["IMAGE"], output_names=["PATCH_SCORES"],
        dynamic_axes={"IMAGE": {0: "batch"}, "PATCH_SCORES": {0: "batch"}},
    )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class KeepGraph(nn.Module):
    """Scorer + keep rule + fill, as the serving graph strings them together."""

    def __init__(self, graph: ScorerGraph, rule: str):
        super().__init__()
        self.graph, self.rule = graph, rule

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        scores = self.graph(frames)
        keep = keep_mask(scores, self.rule)
        x = apply_mask(self.graph.preprocess(frames), keep)
        return keep + x.mean(dim=1)[:, ::P, ::P]


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_of_teacher_and_scorer_graphs(tmp_path, scratch_teacher):
    bank = torch.randn(3, scratch_teacher.embed_dim, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    scorer = CMERScorer([16, 32, 64], G, S).eval()
    graphs: dict[str, nn.Module] = {
        "cmer_teacher": OcclusionTeacher(scratch_teacher, bank, G).eval(),
        "cmer_scorer": ScorerGraph(scratch_teacher.preprocess, scorer).eval(),
    }
    graphs["keep_relative"] = KeepGraph(graphs["cmer_scorer"], "relative").eval()
    graphs["keep_top_rho"] = KeepGraph(graphs["cmer_scorer"], "top_rho").eval()
    f = planted_frames(7, seed=5)
    for name, graph in graphs.items():
        sess = _export(graph, tmp_path / f"{name}.onnx", f[:2])
        with torch.no_grad():
            ref = graph(f).numpy()
        for n in (1, 7):
            (out,) = sess.run(None, {"IMAGE": f[:n].numpy()})
            assert out.shape == (n, G, G) and out.dtype == np.float32
            np.testing.assert_allclose(out, ref[:n], atol=1e-5, rtol=1e-4, err_msg=name)


def test_false_alarm_peaks_take_the_middle_of_an_even_count():
    """Two normal frames: the keep-mask leaves one peak (drop 0) and halves the other (drop
    0.5). The median is 0.25 as numpy and every report take it; torch's `.median()` gave the
    lower value, 0."""
    import torch

    from cmg_train.cmer.report import false_alarm_peaks

    maps = torch.tensor([[[[1.0, 0.2], [0.1, 0.0]]], [[[1.0, 0.5], [0.1, 0.0]]]])
    keep = torch.tensor([[[1, 1], [1, 1]], [[0, 1], [1, 1]]])
    out = false_alarm_peaks(maps, keep)
    assert out == {"normal_frames": 2, "peak_outside_keep": 0.5, "median_peak_drop": 0.25}
