"""The local anomaly model: the U-Net's interface, the synthetic anomaly families, where
synthesize() may and may not label anomalies, the segmentation loss, a short training run
and the synthetic check. Hyper-parameters are set here, not read from configs (they move)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmg.config import Config
from cmg_train.filters import gaussian_blur
from cmg_train.local import anomalies
from cmg_train.local.fit import segmentation_loss, synthetic_check, train_local
from cmg_train.local.model import LocalNet, local_from_state, local_state
from cmg_train.preprocess import Preprocess


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_frames(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A regular 'product surface': stripes and a gradient plus sensor noise, uint8 NHWC."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([100 + 40 * torch.sin(xx / 3.0), 110 + 30 * torch.cos(yy / 4.0), 120 + 0 * xx], -1)
    f = base.unsqueeze(0) + torch.randint(-8, 9, (n, size, size, 3), generator=gen(seed))
    return f.clamp(0, 255).to(torch.uint8)


def unit(frames: torch.Tensor) -> torch.Tensor:
    return frames.permute(0, 3, 1, 2).float() / 255.0


# -- the network -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 48, 64])
def test_localnet_gives_logits_at_half_resolution(size):
    net = LocalNet([4, 8, 8]).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, size, size)).shape == (2, 1, size // 2, size // 2)


def test_localnet_needs_three_widths():
    with pytest.raises(ValueError, match="3 widths"):
        LocalNet([8, 16])


def test_local_state_round_trip():
    torch.manual_seed(0)
    net = LocalNet([4, 8, 8]).eval()
    buf = io.BytesIO()
    torch.save(local_state(net), buf)
    buf.seek(0)
    clone = local_from_state(torch.load(buf, weights_only=False))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clone(x), net(x))
    assert clone.channels == [4, 8, 8] and not clone.training


# -- anomaly shapes --------------------------------------------------------------------

FAMILIES = {"noise": anomalies.noise_masks, "stroke": anomalies.stroke_masks, "rect": anomalies.rect_masks}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shape_families_are_binary_non_empty_and_seeded(family):
    fn = FAMILIES[family]
    a = fn(16, 32, 32, gen(0))
    assert a.shape == (16, 1, 32, 32) and set(a.unique().tolist()) == {0.0, 1.0}
    area = a.flatten(1).mean(1)
    assert torch.all(area > 0) and torch.all(area < 0.5)  # a defect, not the whole crop
    assert torch.equal(a, fn(16, 32, 32, gen(0))) and not torch.equal(a, fn(16, 32, 32, gen(1)))


def test_random_shapes_is_a_seeded_bool_bank():
    bank = anomalies.random_shapes(40, 24, gen(0))
    assert bank.shape == (40, 1, 24, 24) and bank.dtype == torch.bool
    assert torch.equal(bank, anomalies.random_shapes(40, 24, gen(0)))
    assert bool(bank.flatten(1).any(1).all())


def test_draw_shapes_are_rotations_and_flips_of_bank_members():
    ell = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    ell[0, 0, 1:6, 2] = True
    ell[0, 0, 5, 2:5] = True  # an 'L': all 8 dihedral images differ
    variants = set()
    for k in range(4):
        r = torch.rot90(ell.float(), k, (2, 3))
        variants |= {tuple(r.flatten().tolist()), tuple(r.flip(3).flatten().tolist())}
    assert len(variants) == 8
    g = gen(0)
    drawn = {tuple(m.flatten().tolist()) for _ in range(40) for m in anomalies.draw_shapes(ell, 2, g)}
    assert drawn <= variants and len(drawn) >= 4


# -- pixel operations ------------------------------------------------------------------


def test_gaussian_blur_of_a_delta_is_the_normalised_kernel():
    sigma = 1.0
    x = torch.zeros(1, 2, 21, 21)
    x[:, :, 10, 10] = 1.0
    y = gaussian_blur(x, sigma)
    t = torch.arange(-3, 4, dtype=torch.float32)  # k = 2 * round(3 sigma) + 1 = 7 taps
    g = torch.exp(-t**2 / 2)
    g = g / g.sum()
    torch.testing.assert_close(y[0, 0, 7:14, 7:14], torch.outer(g, g))
    assert y.sum().item() == pytest.approx(2.0, abs=1e-5) and y[0, 0, 10, 14] == 0
    const = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)  # reflect padding


def test_random_affine_keeps_constant_images_and_is_seeded():
    const = torch.full((3, 3, 16, 16), 0.4)
    torch.testing.assert_close(anomalies.random_affine(const, gen(0)), const)
    x = unit(normal_frames(3, 16))
    a = anomalies.random_affine(x, gen(1))
    assert a.shape == x.shape and not torch.allclose(a, x)
    assert torch.equal(a, anomalies.random_affine(x, gen(1)))


def test_colour_jitter_is_a_per_channel_gain_and_shared_offset():
    x = torch.full((4, 3, 5, 5), 0.5)
    assert torch.equal(anomalies.colour_jitter(x, gen(0), strength=0.0), x)
    y = anomalies.colour_jitter(x, gen(0))
    assert torch.all(y == y[:, :, :1, :1])  # the same change at every pixel of a channel
    assert not torch.equal(y, x)
    bright = anomalies.colour_jitter(torch.ones(64, 3, 2, 2), gen(0))
    assert bright.max() == 1.0 and bright.min() < 1.0  # clamped, still changed


# -- synthesize ------------------------------------------------------------------------


def _synth(seed: int = 0, n: int = 16, prob: float = 1.0, allowed=None, **kw):
    x = unit(normal_frames(n, 32, seed=seed))
    shapes = anomalies.draw_shapes(anomalies.random_shapes(n, 32, gen(seed)), n, gen(seed))
    out, mask = anomalies.synthesize(x, shapes, gen(seed + 100), prob=prob, allowed=allowed, **kw)
    return x, shapes, out, mask


def test_synthesize_labels_anomalies_inside_the_shapes():
    x, shapes, out, mask = _synth()
    assert out.shape == x.shape and mask.shape == (16, 1, 32, 32)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(mask <= shapes)
    assert int((mask.flatten(1).amax(1) > 0).sum()) >= 12  # prob=1: (almost) every image gets one


def test_synthesize_prob_zero_changes_nothing():
    x, _, out, mask = _synth(prob=0.0)
    assert torch.equal(out, x) and mask.max() == 0


def test_synthesize_respects_allowed():
    """No anomaly label (and no change beyond a feathered edge) where `allowed` is 0."""
    allowed = torch.zeros(16, 1, 32, 32)
    allowed[..., :16] = 1  # left half only
    x, shapes, out, mask = _synth(allowed=allowed)
    assert mask[..., 16:].max() == 0 and mask[..., :16].max() == 1
    reach = F.max_pool2d(shapes * allowed, 7, 1, 3)  # feathering blurs by at most 3 px
    assert torch.equal(out * (1 - reach), x * (1 - reach))
    _, _, out0, mask0 = _synth(allowed=torch.zeros(16, 1, 32, 32))
    assert mask0.max() == 0 and torch.equal(out0, unit(normal_frames(16, 32)))


def test_synthesize_does_not_label_invisible_changes():
    x, _, out, mask = _synth(min_change=0.06)
    change = (out - x).abs().amax(1, keepdim=True)
    assert torch.all(change[mask > 0] > 0.06)
    _, _, out_hi, mask_hi = _synth(min_change=2.0)  # nothing can change by more than 2
    assert mask_hi.max() == 0 and not torch.equal(out_hi, x)


def test_synthesize_is_deterministic_under_one_seed():
    a, b, c = _synth(seed=3), _synth(seed=3), _synth(seed=4)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert not torch.equal(a[2], c[2])


# -- loss, training, check -------------------------------------------------------------


def test_segmentation_loss_rewards_the_right_map_at_half_resolution():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, 0, 5, 9] = 1  # one full-resolution pixel: pixel (2, 4) at half resolution
    pooled = F.adaptive_max_pool2d(mask, (8, 8))
    assert pooled[0, 0, 2, 4] == 1 and pooled.sum() == 1
    right = 20 * (2 * pooled - 1)
    assert segmentation_loss(right, mask).item() < 0.01
    assert segmentation_loss(-right, mask).item() > 1.5
    assert segmentation_loss(torch.zeros_like(right), mask).item() > segmentation_loss(right, mask).item()


def _cfg(steps: int) -> Config:
    cfg = Config()
    cfg.data.image_size, cfg.cmer.grid = 32, 4
    lc = cfg.local
    lc.channels, lc.steps, lc.batch_size, lc.crop, lc.shapes, lc.lr = [8, 16, 16], steps, 16, 32, 64, 5e-3
    return cfg


@pytest.fixture(scope="module")
def trained():
    f = normal_frames(40)
    pp = Preprocess.fit(f)
    net, m = train_local(_cfg(60), pp, f, None, progress=False)
    return net, pp, m


def test_train_local_learns_to_segment(trained):
    net, pp, m = trained
    assert m["steps"] == 60 and m["crop"] == 32 and m["placement"] == "uniform"
    assert m["loss_last"] < 0.9 * m["loss_first"]
    assert not net.training and not any(p.requires_grad for p in net.parameters())


class Constant(nn.Module):
    """A model that knows nothing: the same logit everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1, x.shape[2] // 2, x.shape[3] // 2)


def test_synthetic_check_measures_the_model(trained):
    net, pp, _ = trained
    held_out = normal_frames(16, seed=1)
    chance = synthetic_check(Constant(), pp, held_out, seed=0, pool=3)
    assert chance == {"pixel_auroc": 0.5, "image_auroc": 0.5}
    m = synthetic_check(net, pp, held_out, seed=0, pool=3)
    torch.manual_seed(0)
    untrained = synthetic_check(LocalNet(net.channels).eval(), pp, held_out, seed=0, pool=3)
    # synthetic anomalies are salient: even random features find some, so compare with them
    assert m["pixel_auroc"] > untrained["pixel_auroc"] + 0.08 and m["image_auroc"] > 0.6
    assert synthetic_check(net, pp, held_out, seed=0, pool=3) == m  # seeded


def test_synthetic_check_places_anomalies_inside_allowed(trained):
    net, pp, _ = trained
    held_out = normal_frames(16, seed=1)
    allowed = torch.zeros(16, 1, 32, 32)
    allowed[..., 8:24, 8:24] = 1
    m = synthetic_check(net, pp, held_out, seed=0, pool=3, allowed=allowed)
    assert m != synthetic_check(net, pp, held_out, seed=0, pool=3) and m["pixel_auroc"] > 0.5


def test_train_local_is_seeded_and_records_keep_placement():
    f = normal_frames(12)
    pp = Preprocess.fit(f)
    allowed = torch.zeros(12, 1, 32, 32)
    allowed[..., 4:28, 4:28] = 1
    a, ma = train_local(_cfg(3), pp, f, allowed, progress=False)
    b, _ = train_local(_cfg(3), pp, f, allowed, progress=False)
    assert ma["placement"] == "keep"
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_synthesize_stays_in_the_unit_range():
    """Every fill (the grainy flat colour too) stays a valid image: the model never sees values above 1."""
    x = torch.ones(16, 3, 32, 32)  # bright frames: a fill above 1 would show at once
    shapes = anomalies.draw_shapes(anomalies.random_shapes(16, 32, gen(0)), 16, gen(0))
    for seed in range(8):
        out, _ = anomalies.synthesize(x, shapes, gen(seed), prob=1.0)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
