"""`local.self_radius`: the map a person reads weighted by how unlike the rest of its own
frame each patch is (cmg_train/local/bank.py SelfDistance); the image score unchanged."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from cmg.config import Config, config_from_dict
from cmg_build.opcheck import check_file
from cmg_train.export import _export
from cmg_train.local.bank import (
    SELF_STRIDE,
    SelfDistance,
    bank_from_state,
    bank_state,
    fit_patch_bank,
)


def _frames(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_self_distance_is_the_nearest_far_reference_cell_of_the_same_frame():
    side, radius = 8, 2
    x = torch.randn(2, side * side, 5, generator=torch.Generator().manual_seed(0))
    got = SelfDistance(side, radius)(x)
    want = torch.empty(2, side * side)
    for b in range(2):
        for p in range(side * side):
            py, px = divmod(p, side)
            want[b, p] = min(float((x[b, p] - x[b, q]).norm()) for q in range(side * side)
                             if q // side % SELF_STRIDE == 0 and q % side % SELF_STRIDE == 0
                             and max(abs(q // side - py), abs(q % side - px)) > radius)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_patch_unlike_its_frame_stands_out_and_a_frame_alike_throughout_scores_zero():
    """What it is for: a rare part whose patches are alike within the frame is damped (zero
    here), a patch unlike the rest of its frame keeps its distance."""
    side = 8
    x = torch.full((1, side * side, 4), 3.0)
    odd = 3 * side + 3  # an odd cell: not a reference cell itself
    x[0, odd] = torch.tensor([3.0, 3.0, 3.0, 7.0])
    d = SelfDistance(side, 2)(x)[0]
    assert float(d[odd]) == pytest.approx(4.0, abs=1e-3)
    assert float(d[torch.arange(side * side) != odd].abs().max()) < 1e-2


def test_a_radius_that_leaves_nothing_to_compare_is_refused():
    with pytest.raises(ValueError, match="radius 4 leaves no cell"):
        SelfDistance(8, 4)
    with pytest.raises(ValueError, match="local.self_radius 24 needs"):
        config_from_dict({"data": {"image_size": 128}, "backbone": {"upsample": 3}, "local": {"self_radius": 24}})
    with pytest.raises(ValueError, match="local.self_radius 2 needs local.model bank"):
        config_from_dict({"local": {"model": "unet", "self_radius": 2}})


def _banks(radius: int):
    cfg = Config()
    cfg.data.image_size, cfg.local.bank_size = 32, 100
    plain, _ = fit_patch_bank(cfg, _frames(4, 32, 0), progress=False)
    cfg.local.self_radius = radius
    weighted, metrics = fit_patch_bank(cfg, _frames(4, 32, 0), progress=False)
    return plain, weighted, metrics


def test_the_bank_adds_the_shown_channel_and_keeps_its_distances():
    plain, bank, metrics = _banks(2)
    frames = _frames(3, 32, 1)
    with torch.no_grad():
        d, both = plain(frames), bank(frames)
        f = bank.features(frames).flatten(2).transpose(1, 2)
        self_d = SelfDistance(8, 2)(f).reshape(d.shape)
        train_self_d = SelfDistance(8, 2)(bank.features(_frames(4, 32, 0)).flatten(2).transpose(1, 2))
    assert both.shape == (3, 2, 8, 8) and torch.equal(both[:, :1], d)  # the score's channel as before
    assert metrics["self_median"] == pytest.approx(float(train_self_d.median()), rel=1e-4)
    torch.testing.assert_close(both[:, 1:], d * torch.sqrt(self_d / bank.self_median))
    clone = bank_from_state(bank_state(bank))
    with torch.no_grad():
        assert torch.equal(clone(frames), both)
        left_out = bank.map_without_own_rows(_frames(4, 32, 0)[:2], torch.tensor([0, 1]))
    assert left_out.shape == (2, 2, 8, 8)  # threshold calibration reads the same channels


def test_the_weighted_bank_exports_with_a_dynamic_batch_and_passes_the_op_check(tmp_path):
    _, bank, _ = _banks(2)
    path = tmp_path / "bank.onnx"
    _export(bank, (_frames(2, 32, 1),), path, ["IMAGE"], ["MAP"])
    assert check_file(path) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        frames = _frames(n, 32, 5 + n)
        with torch.no_grad():
            want = bank(frames).numpy()
        got = sess.run(None, {"IMAGE": frames.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-3)
