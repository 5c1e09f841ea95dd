"""CMER: occlusion relevance, keep-mask rule, fill, scorer distillation, ONNX export."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmg.config import CMERConfig, Config, TeacherConfig
from cmg_train.cmer import (
    CMERScorer,
    OcclusionTeacher,
    ScorerGraph,
    apply_mask,
    cmer_metrics,
    keep_iou,
    keep_mask,
    mask_quality,
    normalised_target,
    occlusion_masks,
    occlusion_relevance,
    random_keep_like,
    train_scorer,
)
from cmg_train.teacher import Preprocess, build_teacher

G, S, P = 8, 64, 8  # grid, image size, patch size
PLANTED = (3, 5)


class OnePatchTeacher(nn.Module):
    """A hand-made teacher whose image embedding depends on patch PLANTED only."""

    grid, image_size = G, S

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


@pytest.fixture(scope="module")
def vit_teacher():
    torch.manual_seed(0)
    return build_teacher(TeacherConfig(), S, (0.45, 0.5, 0.55), (0.25, 0.25, 0.25))


def test_occlusion_masks_fill_one_patch_each():
    m = occlusion_masks(G, S)
    assert m.shape == (G * G + 1, 1, S, S)
    assert m[0].min() == 1
    filled = (m[1:] == 0).flatten(1).sum(1)
    assert torch.all(filled == P * P)
    assert m[1 + 2 * G + 6, 0, 2 * P, 6 * P] == 0 and m[1 + 2 * G + 6, 0, 2 * P, 5 * P] == 1


def test_occlusion_relevance_finds_the_planted_patch():
    t = OnePatchTeacher()
    f = planted_frames(3)
    x = t.preprocess(f[:1])
    r0, c0 = PLANTED
    colour = x[0, :, r0 * P, c0 * P].tolist()
    text = text_for(colour).expand(3, -1)
    rel = occlusion_relevance(t, f, text, batch=70)  # 70 // 65 = 1 image per forward
    assert rel.shape == (3, G, G)
    flat = rel.flatten(1)
    assert torch.all(flat.argmax(1) == r0 * G + c0)
    assert torch.all(flat[:, r0 * G + c0] > 0.3)
    others = torch.cat([flat[:, :r0 * G + c0], flat[:, r0 * G + c0 + 1:]], dim=1)
    assert others.abs().max() < 1e-6
    # batching must not change the numbers
    assert torch.allclose(rel, occlusion_relevance(t, f, text, batch=1000), atol=1e-6)
    with pytest.raises(ValueError, match="text embeddings"):
        occlusion_relevance(t, f, text[:2])


def test_occlusion_teacher_retrieves_the_caption_and_matches(vit_teacher):
    t = OnePatchTeacher()
    f = planted_frames(2, seed=3)
    colour = t.preprocess(f[:1])[0, :, PLANTED[0] * P, PLANTED[1] * P].tolist()
    bank = torch.cat([text_for([-1.0, 1.0, 0.0]), text_for(colour), text_for([0.0, -2.0, 2.0])])
    ot = OcclusionTeacher(t, bank)
    with torch.no_grad():
        got = ot(f)
    assert torch.allclose(got, occlusion_relevance(t, f, bank[[1, 1]]), atol=1e-6)
    # the real ViT: whatever caption it retrieves, the graph equals the batched procedure
    bank = vit_teacher.encode_text(["a red hex nut", "a blue washer", "a small gear", "a screw"])
    ot = OcclusionTeacher(vit_teacher, bank).eval()
    f = planted_frames(4, seed=4)
    with torch.no_grad():
        got = ot(f)
        best = (vit_teacher.encode_image(vit_teacher.preprocess(f)) @ bank.T).argmax(1)
    ref = occlusion_relevance(vit_teacher, f, bank[best], batch=130)
    assert got.shape == (4, G, G) and ref.abs().max() > 0
    assert torch.allclose(got, ref, atol=1e-5)


def test_keep_mask_relative_threshold_and_growth():
    s = torch.zeros(1, G, G)
    s[0, 4, 4], s[0, 1, 1], s[0, 6, 1] = 1.0, 0.25, 0.15  # 0.25 > 0.2*max, 0.15 is not
    k = keep_mask(s, "relative", alpha=0.2, grow=False)
    assert k.dtype == torch.float32 and set(k.unique().tolist()) <= {0.0, 1.0}
    assert k.sum() == 2 and k[0, 4, 4] == 1 and k[0, 1, 1] == 1 and k[0, 6, 1] == 0
    g = keep_mask(s, "relative", alpha=0.2, grow=True)
    assert g.sum() == 18  # two 3x3 blocks, no overlap
    assert g[0, 3, 3] == 1 and g[0, 5, 5] == 1 and g[0, 0, 0] == 1 and g[0, 6, 6] == 0
    assert keep_mask(s, "relative", alpha=0.1, grow=False).sum() == 3


def test_keep_mask_keeps_everything_when_nothing_is_relevant():
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
    with pytest.raises(ValueError, match="rule"):
        keep_mask(s, "bogus")


def test_apply_mask_fills_zeros_at_the_dropped_patch():
    x = torch.randn(2, 3, S, S) + 5.0
    keep = torch.ones(2, G, G)
    keep[1, 2, 7] = 0
    y = apply_mask(x, keep)
    assert torch.equal(y[0], x[0])
    assert torch.all(y[1, :, 2 * P:3 * P, 7 * P:8 * P] == 0)
    assert (y[1] == 0).sum() == 3 * P * P


def test_mask_quality_iou_and_random_control():
    keep = torch.zeros(1, 2, 2)
    keep[0, 0, 0] = 1
    part = torch.zeros(1, 4, 4, dtype=torch.bool)
    part[0, 0, :] = True  # 2 pixels in the kept patch, 2 outside
    clutter = torch.zeros(1, 4, 4, dtype=torch.bool)
    clutter[0, 3, 3] = clutter[0, 1, 1] = True  # one removed, one kept
    q = mask_quality(keep, part, clutter, grid=2)
    assert q == {"part_recall": 0.5, "clutter_removed": 0.5, "keep_fraction": 0.25}
    a = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert keep_iou(a, b) == pytest.approx((0.5 + 1.0) / 2)
    big = (torch.rand(5, G, G) > 0.7).float()
    rnd = random_keep_like(big, seed=1)
    assert torch.equal(rnd.flatten(1).sum(1), big.flatten(1).sum(1)) and not torch.equal(rnd, big)


def test_cmer_metrics_rows():
    t = OnePatchTeacher()
    f = planted_frames(4)
    colour = t.preprocess(f[:1])[0, :, PLANTED[0] * P, PLANTED[1] * P].tolist()
    rel = occlusion_relevance(t, f, text_for(colour).expand(4, -1))
    part = torch.zeros(4, S, S, dtype=torch.bool)
    part[:, PLANTED[0] * P:(PLANTED[0] + 1) * P, PLANTED[1] * P:(PLANTED[1] + 1) * P] = True
    clutter = torch.zeros(4, S, S, dtype=torch.bool)
    clutter[:, :8, :8] = True
    m = cmer_metrics(rel, part, clutter, CMERConfig(), scorer_scores=rel)
    assert m["teacher"]["relative"]["part_recall"] == 1.0
    assert m["teacher"]["relative"]["clutter_removed"] == 1.0
    assert m["teacher"]["top_rho"]["keep_fraction"] == pytest.approx(round(0.4 * 64) / 64)
    assert m["keep_iou"] == 1.0 and set(m["scorer"]) == {"relative", "top_rho", "random"}


def test_normalised_target():
    r = torch.stack([torch.full((G, G), -0.1), torch.zeros(G, G)])
    r[1, 0, 0], r[1, 0, 1] = 2.0, -1.0
    t = normalised_target(r)
    assert torch.all(t[0] == 1)  # nothing relevant: keep all, like keep_mask
    assert t[1, 0, 0] == 1 and t[1, 0, 1] == 0 and t.max() <= 1 and t.min() >= 0


def test_distillation_lowers_its_loss(tmp_path, vit_teacher):
    # a learnable target: relevance = 1 on a few planted red patches, 0 on grey noise
    g = torch.Generator().manual_seed(0)
    f = torch.randint(60, 140, (96, S, S, 3), dtype=torch.uint8, generator=g)
    rel = torch.zeros(96, G, G)
    for i in range(96):
        for cell in torch.randperm(G * G, generator=g)[:3].tolist():
            r, c = divmod(cell, G)
            f[i, r * P:(r + 1) * P, c * P:(c + 1) * P] = torch.tensor([230, 30, 30], dtype=torch.uint8)
            rel[i, r, c] = 0.05
    cfg = Config()
    cfg.cmer.scorer.epochs, cfg.cmer.scorer.batch_size = 15, 32
    scorer, m = train_scorer(cfg, vit_teacher, f, rel, tmp_path, progress=False)
    assert m["loss_last"] < 0.8 * m["loss_first"]
    assert m["keep_iou"] > 0.5 and m["speed_ratio"] > 0
    with torch.no_grad():
        out = scorer(vit_teacher.preprocess(f[:5]))
    assert out.shape == (5, G, G)
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == m["steps"] and json.loads(lines[0])["stage"] == "cmer_scorer"


def test_scorer_without_image_size_matches_planned_one():
    a = CMERScorer([16, 32, 64], G, S)
    b = CMERScorer([16, 32, 64], G)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, S, S)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    c = CMERScorer([8, 8], G)  # 64 -> 16 px: pooled to the grid
    assert c.eval()(x).shape == (2, G, G)
    with pytest.raises(ValueError, match="grid"):
        CMERScorer([8, 8, 8, 8], G).eval()(x)  # 64 -> 4 px < G


def _export(module: nn.Module, path, example: torch.Tensor) -> ort.InferenceSession:
    torch.onnx.export(
        module, (example,), str(path), dynamo=False, opset_version=17,
        input_names=["IMAGE"], output_names=["PATCH_SCORES"],
        dynamic_axes={"IMAGE": {0: "batch"}, "PATCH_SCORES": {0: "batch"}},
    )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class KeepGraph(nn.Module):
    """Scorer + keep rule + fill, as the serving graph strings them together."""

    def __init__(self, graph: nn.Module, rule: str):
        super().__init__()
        self.graph, self.rule = graph, rule

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        scores = self.graph(frames)
        keep = keep_mask(scores, self.rule)
        x = apply_mask(self.graph.preprocess(frames), keep)
        return keep + x.mean(dim=1)[:, ::P, ::P]


@pytest.mark.filterwarnings("ignore")
def test_onnx_export_of_teacher_and_scorer_graphs(tmp_path, vit_teacher):
    # frozen, as train.py leaves it: eval + no grad puts attention on its fused fast path
    vit_teacher = copy.deepcopy(vit_teacher).eval().requires_grad_(False)
    bank = vit_teacher.encode_text(["a red hex nut", "a blue washer", "a small gear"])
    scorer = CMERScorer([16, 32, 64], G, S).eval()
    graphs = {
        "cmer_teacher": OcclusionTeacher(vit_teacher, bank).eval(),
        "cmer_scorer": ScorerGraph(vit_teacher.preprocess, scorer).eval(),
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
