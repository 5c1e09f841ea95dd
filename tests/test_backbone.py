"""The packaged pretrained backbone, the patch bank built on it, and the greedy coreset."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from cmg.config import BackboneConfig, Config
from cmg.errors import CMGError
from cmg_build.opcheck import check_file
from cmg_train.backbone import VARIANTS, EfficientNetLite, backbone_taps, default_taps, weights_file
from cmg_train.export import _export
from cmg_train.local.bank import (
    LUMA,
    PatchBank,
    PatchFeatures,
    bank_from_state,
    bank_state,
    fit_patch_bank,
)
from cmg_train.memory_bank import KNNDistance, greedy_coreset


def _pattern(size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([x, y, x * y]).unsqueeze(0)


@pytest.mark.parametrize("variant, want", [
    ("efficientnet_lite0", [-0.15635, 8.50513, 0.0502, 6.78413, -55.90806, -1.05493]),   # tiny's
    ("efficientnet_lite1", [-0.51661, 10.86563, -0.99234, 6.41864, -0.56741, -3.36602]),  # small's
])
def test_weights_load_and_give_fixed_outputs(variant, want):
    """The weights come from the installed package (nothing downloaded) with batch norms folded;
    the figures were taken once from this module after checking it, block by block, against
    the EfficientNet-PyTorch lite implementation those weights were published with (rel. 3e-6)."""
    assert weights_file(variant).is_file()
    net = EfficientNetLite(variant, 64, default_taps(variant)).eval()
    net.load_package_weights()
    with torch.no_grad():
        a, b = net(_pattern(64))
    assert a.shape == (1, 40, 8, 8) and b.shape == (1, 112, 4, 4)
    got = [float(v) for v in (a.mean(), a.std(), b.mean(), b.std(), a[0, :, 3, 4].sum(), b[0, 7, 2, 1])]
    assert got == pytest.approx(want, abs=2e-4)
    random = EfficientNetLite(variant, 64, default_taps(variant)).eval()
    with torch.no_grad():
        assert not torch.allclose(random(_pattern(64))[0], a)  # the figures are the weights', not the shapes'


def test_default_taps_are_the_last_blocks_at_stride_8_and_16():
    for variant in VARIANTS:
        net = EfficientNetLite(variant, 64, default_taps(variant))
        assert net.tap_strides == [8, 16]
        assert len(net.blocks) == max(net.taps) + 1  # nothing deeper is built or exported


def test_strides_name_the_last_block_at_each_and_taps_override_them():
    for variant in VARIANTS:
        taps = default_taps(variant, [16, 4, 8])
        assert EfficientNetLite(variant, 64, taps).tap_strides == [4, 8, 16]
    assert backbone_taps(BackboneConfig(variant="efficientnet_lite1")) == default_taps("efficientnet_lite1")
    assert backbone_taps(BackboneConfig(strides=[4, 8, 16], taps=[2, 5])) == [2, 5]
    with pytest.raises(CMGError, match=r"backbone.strides \[8, 64\]: efficientnet_lite0 has blocks at strides"):
        default_taps("efficientnet_lite0", [8, 64])


def test_a_stride_4_tap_is_averaged_onto_the_stride_8_grid():
    """The map keeps its stride-8 grid (the contract's map side, the kNN's cost); the finer
    block's 3 x 3-pooled cells are averaged 2 x 2 into each map cell."""
    taps = default_taps("efficientnet_lite0", [4, 8, 16])
    fine = PatchFeatures("efficientnet_lite0", 64, 2, taps).eval()
    plain = PatchFeatures("efficientnet_lite0", 64, 2, None).eval()
    frames = (torch.rand(2, 64, 64, 3) * 255).to(torch.uint8)
    with torch.no_grad():
        got, want = fine(frames), plain(frames)
        x = torch.nn.functional.interpolate(fine.preprocess(frames), size=(128, 128), mode="bilinear",
                                            align_corners=False)
        f4 = fine.backbone(x)[0]
    c4 = fine.backbone.channels[0]
    assert got.shape == (2, c4 + plain.dim, 16, 16) and fine.side == plain.side == 16
    torch.testing.assert_close(got[:, c4:], want)  # the stride-8 and stride-16 parts are unchanged
    pooled = torch.nn.functional.avg_pool2d(torch.nn.functional.avg_pool2d(f4, 3, 1, 1, count_include_pad=True), 2)
    torch.testing.assert_close(got[:, :c4], pooled)


def test_bad_variant_and_taps_are_one_line_errors():
    with pytest.raises(CMGError, match="unknown variant 'efficientnet_b9'"):
        EfficientNetLite("efficientnet_b9", 64, [1])
    with pytest.raises(CMGError, match="taps"):
        EfficientNetLite("efficientnet_lite0", 64, [99])


def test_greedy_coreset_covers_a_rare_cluster_that_random_sampling_misses():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(5000, 8, generator=gen)
    rare = torch.randn(5, 8, generator=gen) * 0.1 + 20.0
    x = torch.cat([common, rare])
    idx = greedy_coreset(x, 50, seed=0)
    assert len(set(idx.tolist())) == 50 and (idx >= 5000).any()
    far = KNNDistance(x[idx], 1)(rare)
    assert float(far.max()) < 1.0
    assert torch.equal(greedy_coreset(x, 20, seed=0), idx[:20])  # greedy: a prefix is the smaller coreset
    assert torch.equal(greedy_coreset(x[:10], 50), torch.arange(10))


def test_lazy_greedy_coreset_picks_what_one_pass_per_centre_picks():
    """The lazy selection (candidates by their kept distance, a Gemm per `flush` centres)
    against the plain algorithm: one pass over every row per chosen row."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, 40, generator=gen) * s + 3 * torch.randn(1, 40, generator=gen)
                   for s in (0.2, 0.5, 1.0, 2.0)])
    m = 300
    draw = torch.Generator().manual_seed(7)  # the projection, then the first row, as greedy_coreset draws them
    proj = x @ (torch.randn(40, 32, generator=draw) / 32 ** 0.5)
    first = int(torch.randint(len(x), (1,), generator=draw))
    plain, dist = [first], ((proj - proj[first]) ** 2).sum(1)
    for _ in range(m - 1):
        plain.append(int(torch.argmax(dist)))
        dist = torch.minimum(dist, ((proj - proj[plain[-1]]) ** 2).sum(1))
    for top, flush in ((64, 8), (8192, 64)):  # candidates run out often / never
        lazy = greedy_coreset(x, m, seed=7, top=top, flush=flush)
        assert set(lazy.tolist()) == set(plain)
        assert torch.equal(lazy[:2], torch.tensor(plain[:2]))  # the same start


def _frames(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_patch_bank_scores_its_own_training_patches_zero_and_round_trips():
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size = 32, 10_000  # bank = every training patch
    train = _frames(3, 32, 0)
    bank, metrics = fit_patch_bank(cfg, train, progress=False)
    assert isinstance(bank, PatchBank) and metrics["map_side"] == 8 and metrics["bank_rows"] == 3 * 64
    with torch.no_grad():
        own, other = bank(train), bank(_frames(2, 32, 1))
    # |a|^2 + |b|^2 - 2ab rounding on features of norm ~100 leaves a few hundredths
    assert own.shape == (3, 1, 8, 8) and float(own.max()) < 0.02 * float(other.min())
    clone = bank_from_state(bank_state(bank))
    with torch.no_grad():
        assert torch.equal(clone(other_frames := _frames(2, 32, 1)), bank(other_frames))


@pytest.mark.parametrize("colour", ["grey", "grey+rgb"])
def test_a_fitted_frame_left_out_scores_as_against_the_other_frames(colour):
    """Threshold calibration scores training frames without their own bank rows: with every
    patch in the bank, that is exactly a bank fitted on the other frames."""
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size, cfg.local.colour = 32, 10_000, colour
    train, held_out = _frames(3, 32, 0), _frames(2, 32, 2)
    bank, _ = fit_patch_bank(cfg, train, progress=False, held_out=held_out)
    assert [r.tolist() for r in bank.row_frames] == [sorted(r.tolist()) for r in bank.row_frames]  # frame-major
    with torch.no_grad():
        got = bank.map_without_own_rows(train[[2, 0]], torch.tensor([2, 0]))
        for row, i in enumerate((2, 0)):
            others, _ = fit_patch_bank(cfg, train[[j for j in range(3) if j != i]], progress=False)
            others.scales.copy_(bank.scales)  # the same units as the full bank's
            torch.testing.assert_close(got[row:row + 1], others(train[i:i + 1]), rtol=1e-4, atol=1e-3)
        assert float(got.min()) > 10 * float(bank(train).max())  # not its own zero distance
    with pytest.raises(ValueError, match="rows' frames"):
        bank_from_state(bank_state(bank)).map_without_own_rows(train[:1], torch.tensor([0]))


def test_the_coreset_is_chosen_among_at_most_max_patches_an_even_share_of_each_frame(capsys):
    """A folder of thousands of images held every training patch's features (2,304 x 352 FP32
    numbers per frame with `small`): `local.max_patches` bounds memory and the coreset's time.
    Each kept row still knows its frame, which the left-out threshold scores need."""
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size, cfg.local.max_patches = 32, 10_000, 96
    train = _frames(3, 32, 0)
    bank, metrics = fit_patch_bank(cfg, train, progress=False)
    assert (metrics["patches"], metrics["training_patches"], metrics["bank_rows"]) == (96, 192, 96)
    assert "chosen among 96 of 192 training patches (local.max_patches 96" in capsys.readouterr().err
    frames_of_rows = bank.row_frames[0]
    assert torch.bincount(frames_of_rows).tolist() == [32, 32, 32]  # the same share of every frame
    with torch.no_grad():
        per_frame = bank.features(train).flatten(2).transpose(1, 2)  # [3, 64, D]
    rows = bank.knn.bank_t.t()
    nearest = torch.cdist(rows, per_frame.reshape(-1, rows.shape[1])).argmin(1) // 64
    assert torch.equal(nearest, frames_of_rows)
    cfg.local.max_patches = 0  # all of them
    assert fit_patch_bank(cfg, train, progress=False)[1]["patches"] == 192
    assert "max_patches" not in capsys.readouterr().err


def test_patch_features_upsample_the_frame_before_the_backbone():
    f1 = PatchFeatures("efficientnet_lite0", 32, 1, None)
    f2 = PatchFeatures("efficientnet_lite0", 32, 2, None)
    with torch.no_grad():
        assert f1(_frames(1, 32, 0)).shape == (1, 152, 4, 4)
        assert f2(_frames(1, 32, 0)).shape == (1, 152, 8, 8)


def test_grey_features_see_only_the_luma_and_survive_the_checkpoint():
    grey = PatchFeatures("efficientnet_lite0", 32, 1, None, colour="grey").eval()
    rgb = PatchFeatures("efficientnet_lite0", 32, 1, None).eval()
    frames = _frames(2, 32, 0)
    luma = (frames.float() * torch.tensor(LUMA)).sum(-1, keepdim=True).expand(-1, -1, -1, 3)
    swapped = frames[..., [2, 0, 1]]  # same pixels, other colours: a different luma, unless grey
    with torch.no_grad():
        assert torch.allclose(grey(frames), rgb(luma), atol=1e-3)
        assert not torch.allclose(grey(frames), grey(swapped), atol=1e-2)
        assert not torch.allclose(grey(frames), rgb(frames), atol=1e-2)
    bank = PatchBank(grey, torch.randn(5, grey.dim))
    clone = bank_from_state(bank_state(bank))
    assert clone.features.colour == "grey"
    with torch.no_grad():
        assert torch.equal(clone(frames), bank(frames))
    with pytest.raises(ValueError, match="colour"):
        PatchFeatures("efficientnet_lite0", 32, 1, None, colour="hsv")


def test_edge_patches_count_the_zero_padding_and_old_checkpoints_keep_their_pooling():
    zeros = PatchFeatures("efficientnet_lite0", 64, 1, None).eval()
    valid = PatchFeatures("efficientnet_lite0", 64, 1, None, edge_zeros=False).eval()
    frames = _frames(1, 64, 0)
    with torch.no_grad():
        a, b = zeros(frames), valid(frames)
    c0 = zeros.backbone.channels[0]  # the stride-8 tap: pooled at its own resolution, not resized
    torch.testing.assert_close(a[:, :c0, 1:-1, 1:-1], b[:, :c0, 1:-1, 1:-1])  # inside: 9 of 9 cells
    torch.testing.assert_close(a[:, :c0, 0, 0], b[:, :c0, 0, 0] * 4 / 9)    # corner: 4 real cells of 9
    torch.testing.assert_close(a[:, :c0, 0, 3], b[:, :c0, 0, 3] * 6 / 9)    # edge: 6 of 9
    state = bank_state(PatchBank(zeros, torch.randn(5, zeros.dim)))
    assert bank_from_state(state).features.edge_zeros is True
    del state["edge_zeros"]  # a checkpoint written before the flag existed
    assert bank_from_state(state).features.edge_zeros is False


def test_grey_and_colour_views_each_match_their_own_bank_in_held_out_units():
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size, cfg.local.colour = 32, 10_000, "grey+rgb"
    train, held_out, frames = _frames(3, 32, 0), _frames(2, 32, 2), _frames(2, 32, 1)
    bank, metrics = fit_patch_bank(cfg, train, progress=False, held_out=held_out)
    bb = cfg.backbone
    grey = PatchFeatures(bb.variant, 32, bb.upsample, backbone_taps(bb), colour="grey").eval()
    rgb = PatchFeatures(bb.variant, 32, bb.upsample, backbone_taps(bb)).eval()
    with torch.no_grad():
        both = bank.features(frames)
        torch.testing.assert_close(both, torch.cat([grey(frames), rgb(frames)], 1))  # grey view first
        views = bank.view_distances(held_out)
        assert metrics["view_scales"] == [round(float(v.median()), 4) for v in views]
        d_grey, d_rgb = bank.view_distances(frames)
        expect = (d_grey / bank.scales[0] + d_rgb / bank.scales[1]) / 2
        torch.testing.assert_close(bank(frames).flatten(1), expect)
        assert float(bank(train).max()) < 0.02 * float(bank(frames).min())  # each view's own patches are in its bank
    assert metrics["feature_dim"] == 2 * grey.dim and metrics["bank_rows"] == 3 * 64
    clone = bank_from_state(bank_state(bank))
    with torch.no_grad():
        assert torch.equal(clone(frames), bank(frames)) and torch.equal(clone.scales, bank.scales)
    with pytest.raises(ValueError, match="2 feature view"):
        PatchBank(bank.features, torch.randn(5, bank.features.dim))


def test_two_view_bank_exports_with_a_dynamic_batch(tmp_path):
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size, cfg.local.colour = 32, 50, "grey+rgb"
    bank, _ = fit_patch_bank(cfg, _frames(3, 32, 0), progress=False, held_out=_frames(2, 32, 2))
    path = tmp_path / "bank.onnx"
    _export(bank, (_frames(2, 32, 1),), path, ["IMAGE"], ["MAP"])
    assert check_file(path) == []  # TensorRT's op rules: the uint8 frame is cast before its batch is read
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # the grey and colour halves are sliced at the batch the graph is given
        frames = _frames(n, 32, 5 + n)
        with torch.no_grad():
            want = bank(frames).numpy()
        got = sess.run(None, {"IMAGE": frames.numpy()})[0]
        assert got.shape == want.shape
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-3)


def test_a_backbone_ensemble_is_one_view_per_backbone_each_with_its_own_bank(tmp_path):
    """`backbone.ensemble`: the second backbone's features follow the first's along the
    channels, exactly as each computes them alone; each view is matched against its own bank
    in held-out units; the checkpoint and the exported graph keep both."""
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size, cfg.local.colour = 32, 10_000, "grey"
    cfg.backbone.ensemble = ["efficientnet_lite1"]
    train, held_out, frames = _frames(3, 32, 0), _frames(2, 32, 2), _frames(2, 32, 1)
    bank, metrics = fit_patch_bank(cfg, train, progress=False, held_out=held_out)
    bb = cfg.backbone
    first = PatchFeatures(bb.variant, 32, bb.upsample, backbone_taps(bb), colour="grey").eval()
    second = PatchFeatures("efficientnet_lite1", 32, bb.upsample, default_taps("efficientnet_lite1", bb.strides),
                           colour="grey").eval()
    assert bank.features.view_dims == [first.dim, second.dim]
    assert metrics["backbone"] == "efficientnet_lite0+efficientnet_lite1"
    with torch.no_grad():
        torch.testing.assert_close(bank.features(frames), torch.cat([first(frames), second(frames)], 1))
        d_first, d_second = bank.view_distances(frames)
        expect = (d_first / bank.scales[0] + d_second / bank.scales[1]) / 2
        torch.testing.assert_close(bank(frames).flatten(1), expect)
        assert float(bank(train).max()) < 0.02 * float(bank(frames).min())
    assert metrics["view_scales"] == [round(float(v.median()), 4) for v in bank.view_distances(held_out)]
    clone = bank_from_state(bank_state(bank))
    with torch.no_grad():
        assert torch.equal(clone(frames), bank(frames))
    path = tmp_path / "bank.onnx"
    _export(bank, (frames,), path, ["IMAGE"], ["MAP"])
    assert check_file(path) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"IMAGE": frames.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), bank(frames), rtol=1e-4, atol=1e-3)
    # Views of unequal width (another block of the second backbone) split where they were joined.
    uneven = PatchFeatures(bb.variant, 32, 1, None, colour="grey", ensemble=[("efficientnet_lite1", [2])]).eval()
    with torch.no_grad():
        rows = uneven(train).flatten(2).transpose(1, 2).reshape(-1, uneven.dim)
        own = PatchBank(uneven, list(rows.split(uneven.view_dims, 1)))
        assert uneven.view_dims[0] != uneven.view_dims[1] and float(own(train).max()) < 0.1 * float(own(frames).mean())
    with pytest.raises(ValueError, match="grey\\+rgb"):
        PatchFeatures(bb.variant, 32, 1, None, colour="grey+rgb", ensemble=[("efficientnet_lite1", [2])])
