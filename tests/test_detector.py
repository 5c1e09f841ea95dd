"""CMGDetector, the cmle_encoder graph: output order and shapes of the contract, the keep-mask
gating the local map and the global embedding, fusion, threshold, and the state round trip.

Built from small untrained parts: these are properties of the graph, not of training."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from cmg.config import Config, TeacherConfig
from cmg.contract import CMLE_ENCODER, ENCODER_OUTPUTS, Contract
from cmg_train.checkpoint import detector_from_state, detector_state
from cmg_train.cmer.model import keep_mask_cfg
from cmg_train.cmle.model import CMLEHead
from cmg_train.detector import CMGDetector, DetectorOutput, RawScores
from cmg_train.filters import gaussian_blur
from cmg_train.local.model import LocalNet
from cmg_train.masking import upsample_keep
from cmg_train.teacher.model import build_teacher

SIZE, G, D = 32, 4, 8


def config(map_size: int = 8, fusion: str = "mean", k_global: int = 1) -> Config:
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid, cfg.cmle.embed_dim = SIZE, G, D
    cfg.scoring.map_size, cfg.scoring.fusion, cfg.scoring.k_global = map_size, fusion, k_global
    cfg.local.model, cfg.local.pool, cfg.local.score = "unet", 3, "max"
    return cfg


def make_detector(cfg: Config, use_mask: bool = True, seed: int = 0) -> CMGDetector:
    torch.manual_seed(seed)
    teacher = build_teacher(TeacherConfig(source="scratch", channels=[8, 16]), SIZE).requires_grad_(False)
    det = CMGDetector(cfg, teacher, LocalNet([4, 8, 8]), CMLEHead(teacher.embed_dim, D), use_mask).eval()
    det.set_bank(F.normalize(torch.randn(20, D), dim=-1))
    return det


def frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def corner_scores(n: int) -> torch.Tensor:
    """Relevance only at patch (0, 0): the relative rule keeps the top-left 2x2 patches (grown)."""
    s = torch.zeros(n, G, G)
    s[:, 0, 0] = 1.0
    return s


def run(det: CMGDetector, f: torch.Tensor, ps: torch.Tensor, th: float = 0.0) -> DetectorOutput:
    with torch.no_grad():
        return det(f, ps, torch.full((len(f), 1), th))


@pytest.fixture(scope="module")
def det() -> CMGDetector:
    return make_detector(config())


def test_output_fields_are_the_contract_order(det):
    """The ONNX export names outputs positionally: DetectorOutput must follow ENCODER_OUTPUTS."""
    assert tuple(f.upper() for f in DetectorOutput._fields) == ENCODER_OUTPUTS
    out = run(det, frames(2), corner_scores(2))
    assert isinstance(out, DetectorOutput)
    assert out.keep_mask is out[ENCODER_OUTPUTS.index("KEEP_MASK")]


@pytest.mark.parametrize("map_size", [4, 8, 16])
def test_outputs_follow_the_contract(map_size):
    """ANOMALY_MAP is [M, M] (here M = G, 2G, 4G = H/2); KEEP_MASK stays [G, G]."""
    det = make_detector(config(map_size))
    out = run(det, frames(3), corner_scores(3))
    specs = Contract(SIZE, SIZE, G, D, map_size).models[CMLE_ENCODER].outputs
    for spec, tensor in zip(specs, out, strict=True):
        spec.check(tensor.numpy())
    assert out.anomaly_map.shape == (3, map_size, map_size)


@pytest.mark.parametrize("map_size", [4, 8, 16])
def test_anomaly_map_is_exactly_zero_outside_the_keep_mask(map_size):
    det = make_detector(config(map_size))
    out = run(det, frames(3), corner_scores(3))
    keep = upsample_keep(out.keep_mask.float(), (map_size, map_size)).squeeze(1)
    assert out.keep_mask[:, :2, :2].min() == 1 and out.keep_mask.sum() == 3 * 4
    assert torch.all(out.anomaly_map[keep == 0] == 0)
    assert torch.all(out.anomaly_map[keep == 1] > 0)


def test_map_sigma_smooths_the_map_only_and_keeps_it_zero_outside_the_keep_mask():
    """`scoring.map_sigma`: ANOMALY_MAP blurred (the picture a person reads), re-gated by the
    keep-mask; the score, the flag and the mask are those of the unblurred detector."""
    cfg = config(16)
    cfg.scoring.map_sigma = 1.0
    plain, smooth = make_detector(config(16)), make_detector(cfg)  # same seed: same weights
    f, ps = frames(3), corner_scores(3)
    a, b = run(plain, f, ps), run(smooth, f, ps)
    for name in ("anomaly_score", "is_anomaly", "keep_mask", "embedding"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    keep = upsample_keep(b.keep_mask.float(), (16, 16)).squeeze(1)
    torch.testing.assert_close(b.anomaly_map, gaussian_blur(a.anomaly_map[:, None], 1.0)[:, 0] * keep)
    assert torch.all(b.anomaly_map[keep == 0] == 0) and not torch.allclose(a.anomaly_map, b.anomaly_map)


def test_score_sigma_keeps_the_larger_of_the_plain_and_blurred_views_standardised():
    """`local.score_sigma`: the local score is the larger of the plain map's and the blurred
    map's scores, each standardised by the view statistics fitted on normals; a tint spread
    thin over many cells wins on the blurred view, a one-cell spike on the plain one."""
    cfg = config(16)
    cfg.local.score_sigma = 1.0
    det = make_detector(cfg)
    spike, tint = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    spike[..., 8, 8] = 1.0
    tint[..., 6:11, 6:11] = 0.4
    maps, keep = torch.cat([spike, tint]), torch.ones(2, G, G)
    with torch.no_grad():
        _, peaks = det.local_peaks(maps, keep)
        torch.testing.assert_close(peaks[:, 0], torch.tensor([1.0, 0.4]))
        torch.testing.assert_close(peaks[:, 1], gaussian_blur(maps, 1.0).flatten(1).amax(1))
        assert peaks[0, 1] < peaks[1, 1] < peaks[1, 0]  # blurred, the tint outranks the spike
        det.view_stats.copy_(torch.tensor([0.0, 1.0, 0.0, 0.25]))
        _, score = det.local_scores(maps, keep)
    torch.testing.assert_close(score, torch.maximum(peaks[:, 0], peaks[:, 1] / 0.25))
    assert score[1] > score[0]
    normals = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    det.fit_view_stats(normals, torch.ones(6, G, G))
    _, p = det.local_peaks(normals, torch.ones(6, G, G))
    torch.testing.assert_close(det.view_stats, torch.stack([p[:, 0].mean(), p[:, 0].std(), p[:, 1].mean(),
                                                            p[:, 1].std()]))


def test_score_sigma_statistics_travel_with_the_state():
    cfg = config(16)
    cfg.local.score_sigma = 1.0
    det = make_detector(cfg)
    det.view_stats.copy_(torch.tensor([0.1, 0.5, 0.2, 0.25]))
    clone = detector_from_state(cfg, det.teacher, detector_state(det))
    assert torch.equal(clone.view_stats, det.view_stats)
    f, ps = frames(3, seed=2), corner_scores(3)
    assert torch.equal(run(det, f, ps).anomaly_score, run(clone, f, ps).anomaly_score)
    assert "view_stats" not in detector_state(make_detector(config(16)))  # off: old checkpoints load as before


def test_a_second_map_channel_is_what_is_shown_and_the_score_reads_the_first(det):
    """`local.self_radius`: the bank returns its distances and the map a person reads; the
    score, the flag and the keep-mask come from the first channel alone."""
    f, ps = frames(3), corner_scores(3)
    with torch.no_grad():
        d = det.local_map(f, det.teacher.preprocess(f))
        shown = d * torch.linspace(0.5, 2.0, d.numel()).reshape(d.shape)
        one = det.outputs(det.raw(f, ps, d), torch.zeros(3, 1))
        two = det.outputs(det.raw(f, ps, torch.cat([d, shown], 1)), torch.zeros(3, 1))
        alone = det.outputs(det.raw(f, ps, shown), torch.zeros(3, 1))
    for name in ("anomaly_score", "is_anomaly", "keep_mask", "embedding"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    torch.testing.assert_close(two.anomaly_map, alone.anomaly_map)
    assert not torch.allclose(two.anomaly_map, one.anomaly_map)


def test_keep_mask_is_the_configured_rule_on_the_patch_scores(det):
    ps = torch.rand(4, G, G, generator=torch.Generator().manual_seed(2))
    out = run(det, frames(4), ps)
    assert out.keep_mask.dtype == torch.uint8
    assert torch.equal(out.keep_mask, keep_mask_cfg(ps, det.cmer_cfg).to(torch.uint8))


def test_use_mask_false_keeps_everything_whatever_the_scores():
    det = make_detector(config(), use_mask=False)
    f = frames(3)
    a, b = run(det, f, corner_scores(3)), run(det, f, -torch.rand(3, G, G))
    assert torch.all(a.keep_mask == 1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert torch.all(a.anomaly_map > 0)


def test_discarded_pixels_cannot_move_the_embedding(det):
    """Clutter outside the keep-mask is filled before the teacher sees it: z and the global
    score are unchanged, and the local map stays zero there."""
    f = frames(3)
    cluttered = f.clone()
    cluttered[:, SIZE // 2:, :] = 255  # the bottom half: all discarded by corner_scores
    cluttered[:, :, SIZE // 2:] = 0
    ps = corner_scores(3)
    with torch.no_grad():
        a, b = det.raw(f, ps), det.raw(cluttered, ps)
    assert torch.equal(a.z, b.z) and torch.equal(a.global_score, b.global_score)
    assert torch.all(b.local_map[..., SIZE // 4:, :] == 0) and torch.all(b.local_map[..., SIZE // 4:] == 0)


def test_raw_scores_and_anomaly_map_pooling(det):
    f, ps = frames(2), corner_scores(2)
    with torch.no_grad():
        raw = det.raw(f, ps)
    out = run(det, f, ps)
    assert isinstance(raw, RawScores) and raw.local_map.shape == (2, 1, SIZE // 2, SIZE // 2)
    assert torch.equal(raw.local_score, raw.local_map.flatten(1).amax(1))
    assert torch.equal(out.anomaly_map, F.avg_pool2d(raw.local_map, 2).squeeze(1))  # 16 -> M = 8
    assert torch.equal(out.embedding, raw.z)
    torch.testing.assert_close(raw.z.norm(dim=-1), torch.ones(2))


def test_max_minus_p90_subtracts_the_ungated_maps_90th_percentile(det):
    f, ps = frames(2), corner_scores(2)
    det.local_score = "max_minus_p90"
    try:
        with torch.no_grad():
            raw = det.raw(f, ps)
            ungated = det.local_map(f, det.teacher.preprocess(f)).flatten(1)
    finally:
        det.local_score = "max"
    p90 = torch.quantile(ungated, 0.9, dim=1, interpolation="higher")
    k = ungated.shape[1] // 10
    assert torch.equal(ungated.sort(1, descending=True).values[:, k - 1], torch.topk(ungated, k, 1).values[:, -1])
    torch.testing.assert_close(raw.local_score, raw.local_map.flatten(1).amax(1) - p90, atol=2e-3, rtol=0)


def test_global_score_is_zero_for_a_bank_member():
    det = make_detector(config(k_global=1))
    f, ps = frames(4), corner_scores(4)
    with torch.no_grad():
        z = det.raw(f, ps).z
        det.set_bank(z[:2])
        g = det.raw(f, ps).global_score
    assert torch.all(g[:2] < 1e-2) and torch.all(g[2:] > 1e-2)


@pytest.mark.parametrize("fusion, want", [("mean", 1.5), ("max", 2.0), ("local", 1.0)])
def test_fusion_of_normalised_scores(fusion, want):
    det = make_detector(config(fusion=fusion))
    det.stats.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # global (5-1)/2 = 2, local (7-3)/4 = 1
    assert det.fuse(torch.tensor([5.0]), torch.tensor([7.0])).item() == pytest.approx(want)


def test_is_anomaly_compares_with_the_threshold_input(det):
    f, ps = frames(4), corner_scores(4)
    out = run(det, f, ps)
    score = out.anomaly_score[:, 0]
    th = score.clone().unsqueeze(1)
    th[::2] -= 1e-3  # just below for rows 0, 2; equal (not greater) for rows 1, 3
    with torch.no_grad():
        flag = det(f, ps, th).is_anomaly
    assert flag[:, 0].tolist() == [True, False, True, False]
    assert torch.equal(out.is_anomaly, out.anomaly_score > 0.0)


def test_detector_state_round_trip_reproduces_outputs():
    det = make_detector(config(16))
    det.stats.copy_(torch.tensor([0.5, 2.0, 0.25, 0.5]))
    det.threshold.fill_(0.3)
    buf = io.BytesIO()
    torch.save(detector_state(det), buf)
    buf.seek(0)
    clone = detector_from_state(config(16), det.teacher, torch.load(buf, weights_only=False))
    f, ps = frames(3, seed=5), torch.rand(3, G, G, generator=torch.Generator().manual_seed(5))
    a, b = run(det, f, ps), run(clone, f, ps)
    for name, x, y in zip(DetectorOutput._fields, a, b, strict=True):
        assert torch.equal(x, y), name
    assert float(clone.threshold) == pytest.approx(0.3) and clone.use_mask
    assert not clone.training


def test_a_score_the_held_out_normals_do_not_spread_is_used_unscaled_and_said(capsys):
    """Identical or constant training images (or two held-out frames that tie) give a zero
    spread: its unit had been clamped to 1e-6, every score became a million times its
    distance and the threshold about 1e13 (nothing flagged, nothing said)."""
    from cmg_train.detector import spread

    assert float(spread(torch.tensor([1.0, 3.0, 5.0]), "x")) == pytest.approx(2.0)
    assert capsys.readouterr().err == ""
    for tied in (torch.full((5,), 0.707), torch.zeros(5), torch.tensor([4.2])):
        assert float(spread(tied, "local score")) == 1.0
        assert "local score does not vary" in capsys.readouterr().err
