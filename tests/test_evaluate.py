"""`cmg eval`: AUROCs and AUPRO on hand-made scores, the paired bootstrap, the threshold rule and its
operating point, the aggregate over seeds, the markdown tables, the keep-mask threshold
sweep, and the ablation table on the tiny run."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from cmg_train import evaluate as ev
from cmg_train.evaluate import (
    ABLATION,
    SWEEP_ALPHAS,
    aggregate,
    alpha_medians,
    alpha_table,
    auroc,
    image_metrics,
    markdown_table,
    paired_bootstrap,
    pixel_auroc,
    threshold_table,
    worst_frames,
)
from cmg_train.metrics import aupro, normal_threshold, operating_point

N_BOOT = 100  # resamples: each costs one sklearn AUROC (~4 ms) per pair; the default is 1000



@pytest.fixture
def fast_bootstrap(monkeypatch):
    """Functions that call paired_bootstrap with its default n get N_BOOT resamples."""
    monkeypatch.setattr(ev, "paired_bootstrap", functools.partial(paired_bootstrap, n=N_BOOT))


# -- AUROCs ----------------------------------------------------------------------------


def test_auroc_needs_both_classes():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auroc(np.zeros(4), np.arange(4.0)) is None
    assert auroc(np.ones(4), np.arange(4.0)) is None


def test_image_metrics_per_defect_kind_against_the_good_images(fast_bootstrap):
    labels = np.array([0, 0, 1, 1])
    defects = ["good", "good", "hole", "scratch"]
    m = image_metrics(labels, defects, np.array([0.1, 0.2, 0.9, 0.15]))
    assert m["image_auroc"] == 0.75
    assert m["per_defect"] == {"hole": 1.0, "scratch": 0.5}
    lo, hi = m["image_auroc_ci95"]
    assert lo <= 0.75 <= hi


def test_worst_frames_are_the_top_false_alarms_then_the_lowest_misses():
    labels = np.array([0, 1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.05, 0.3])
    assert worst_frames(labels, scores, n=2) == [0, 4, 5, 1]  # normals 0.9, 0.7; defects 0.05, 0.1
    assert worst_frames(labels, scores, n=9) == [0, 4, 6, 2, 5, 1, 3]  # fewer frames than n: all of them


def test_pixel_auroc_upsamples_the_map_to_the_masks():
    gt = np.zeros((2, 4, 4), bool)
    gt[:, :2, :2] = True  # the top-left quadrant is defective
    maps = np.zeros((2, 2, 2), np.float32)
    maps[:, 0, 0] = 1.0   # bilinear 2 -> 4 keeps every quadrant pixel above every other
    assert pixel_auroc(maps, gt) == 1.0
    assert pixel_auroc(1.0 - maps, gt) == 0.0
    assert pixel_auroc(maps, np.zeros_like(gt)) is None


def _two_defects(small_found: bool) -> tuple[np.ndarray, np.ndarray]:
    """Three 32 x 32 frames: one normal, one with a 20 x 20 defect, one with a 3 x 3 defect;
    normal pixels score uniform [0, 1), the large defect 2, the small one 2 or -1."""
    rng = np.random.default_rng(0)
    gt = np.zeros((3, 32, 32), bool)
    gt[1, 4:24, 4:24] = True
    gt[2, 10:13, 10:13] = True
    maps = rng.random(gt.shape)
    maps[1][gt[1]] = 2.0
    maps[2][gt[2]] = 2.0 if small_found else -1.0
    return gt, maps


def test_aupro_counts_every_defect_region_the_same():
    gt, maps = _two_defects(small_found=True)
    assert aupro(gt, maps) == pytest.approx(1.0)
    assert aupro(gt, -maps) == pytest.approx(0.0, abs=0.01)  # both regions below every normal pixel
    gt, maps = _two_defects(small_found=False)
    # pixel AUROC barely sees the missed 9 pixels among 409; AUPRO loses half its regions
    assert auroc(gt.ravel().astype(np.int64), maps.ravel()) > 0.97
    assert aupro(gt, maps) == pytest.approx(0.5, abs=0.01)


def test_aupro_of_a_random_map_is_the_area_under_the_diagonal():
    gt = np.zeros((40, 32, 32), bool)
    gt[::2, 8:16, 8:16] = True
    gt[::4, 20:26, 2:30] = True
    maps = np.random.default_rng(1).random(gt.shape)
    assert aupro(gt, maps) == pytest.approx(0.15, abs=0.02)  # PRO = FPR: 0.3^2 / 2 / 0.3
    assert aupro(np.zeros_like(gt), maps) is None and aupro(np.ones_like(gt), maps) is None
    perfect = (gt * 200 + 10).astype(np.uint8)  # an unsigned map: its negation must not wrap around
    assert aupro(gt, perfect) == pytest.approx(1.0) and aupro(gt, gt) == pytest.approx(1.0)


def test_aupro_closes_the_curve_over_tied_zeros():
    """A gated map is 0 wherever the keep-mask dropped pixels: when those ties jump the FPR
    past 0.3, the curve is interpolated to (1, 1) instead of stopping short of 0.3."""
    gt = np.zeros((2, 20, 20), bool)
    gt[1, 5:10, 5:10] = True
    maps = np.zeros(gt.shape)
    maps[:, :, :2] = np.random.default_rng(2).random((2, 20, 2))  # 10% of the normal pixels scored
    assert not maps[gt].any()  # the defect (columns 5-9) ties at 0 with 90% of the normals
    got = aupro(gt, maps)
    fpr0 = 80 / 775  # 2 columns of 2 frames scored among 775 normal pixels
    # FPR fpr0 at PRO 0, then a straight line to (1, 1)
    want = 0.5 * (0.3 - fpr0) * (0.3 - fpr0) / (1 - fpr0) / 0.3
    assert got == pytest.approx(want, abs=1e-3)


def test_aupro_counts_a_diagonal_scratch_as_one_region():
    """Regions are 8-connected, as MVTec AD's and anomalib's: a diagonal scratch is one region,
    not ten. The map finds the square only: PRO 1/2 at FPR 0, a line to (1, 1) from there."""
    gt = np.zeros((1, 24, 24), bool)
    for d in range(10):
        gt[0, 2 + d, 2 + d] = True
    gt[0, 16:19, 16:19] = True
    maps = gt * 0.0
    maps[0, 16:19, 16:19] = 1.0
    pro_at_03 = 0.5 + 0.3 * 0.5  # interpolated at FPR 0.3 on the line from (0, 0.5) to (1, 1)
    assert aupro(gt, maps) == pytest.approx(0.3 * (0.5 + pro_at_03) / 2 / 0.3)  # 4-connected: 1/11 at FPR 0


@pytest.mark.slow
def test_aupro_agrees_with_anomalib():
    """The field's reference implementation (anomalib's AUPRO, the `peer` extra) on the same
    maps, thin diagonal regions and tied values included."""
    anomalib_metrics = pytest.importorskip("anomalib.metrics")
    import anomalib.metrics.aupro  # noqa: F401 - the module, for its _AUPRO
    import torch

    rng = np.random.default_rng(3)
    gt = np.zeros((12, 48, 48), bool)
    for i in range(1, 12, 2):
        y, x = rng.integers(4, 36, 2)
        gt[i, y:y + rng.integers(2, 12), x:x + rng.integers(2, 12)] = True
    for i in range(0, 12, 4):  # thin diagonal scratches: one region each when 8-connected
        y, x = rng.integers(4, 30, 2)
        for d in range(rng.integers(6, 14)):
            gt[i, y + d, x + d] = True
    maps = rng.random(gt.shape) + 0.8 * gt * rng.random(gt.shape)
    for case in (maps, np.round(maps * 4) / 4, np.where(rng.random(gt.shape) < 0.6, 0.0, maps)):
        # as is; plateaus (ties above the minimum); a gated map's zeros (ties at the minimum)
        metric = anomalib_metrics.aupro._AUPRO(fpr_limit=0.3)  # the metric itself; AUPRO wraps it for batches
        metric.update(torch.from_numpy(case).float(), torch.from_numpy(gt).int())
        assert aupro(gt, case) == pytest.approx(float(metric.compute()), abs=1e-4)


# -- paired bootstrap ------------------------------------------------------------------

LABELS = np.array([0] * 60 + [1] * 60)


def _scores(quality: float, seed: int) -> np.ndarray:
    """Scores separating the classes by `quality` standard deviations."""
    return LABELS * quality + np.random.default_rng(seed).normal(size=LABELS.size)


def test_bootstrap_interval_contains_a_clear_difference_and_excludes_zero():
    good, weak = _scores(3.0, 0), _scores(0.0, 1)
    diff = auroc(LABELS, good) - auroc(LABELS, weak)
    lo, hi = paired_bootstrap(LABELS, [(good, weak)], n=N_BOOT)
    assert diff > 0.3 and lo < diff < hi
    assert lo > 0


def test_bootstrap_interval_is_the_2_5_and_97_5_percentiles_of_resampled_sklearn_gains():
    """The interval against an independent reference: the same resampled images (the seeded
    generator's draw), sklearn's AUROC per resample, the central 95%."""
    from sklearn.metrics import roc_auc_score

    a, b = _scores(1.0, 4), _scores(0.6, 5)
    idx = np.random.default_rng(0).integers(0, len(LABELS), (N_BOOT, len(LABELS)))
    gains = [roc_auc_score(LABELS[i], a[i]) - roc_auc_score(LABELS[i], b[i]) for i in idx]
    want = np.percentile(gains, [2.5, 97.5])
    assert paired_bootstrap(LABELS, [(a, b)], n=N_BOOT, seed=0) == pytest.approx(want, abs=1e-12)


def test_bootstrap_interval_contains_zero_when_there_is_no_difference():
    a, b = _scores(0.5, 2), _scores(0.5, 3)
    lo, hi = paired_bootstrap(LABELS, [(a, b)], n=N_BOOT)
    assert lo < 0 < hi
    assert paired_bootstrap(LABELS, [(a, a)], n=N_BOOT) == [0.0, 0.0]  # paired: identical rows never differ


def test_bootstrap_of_a_single_row_is_an_auroc_interval_and_seeded():
    s = _scores(1.0, 4)
    lo, hi = paired_bootstrap(LABELS, [(s, None)], n=N_BOOT, seed=7)
    assert lo < auroc(LABELS, s) < hi and hi <= 1.0
    assert paired_bootstrap(LABELS, [(s, None)], n=N_BOOT, seed=7) == [lo, hi]
    assert paired_bootstrap(LABELS, [(s, None)], n=N_BOOT, seed=8) != [lo, hi]


def test_bootstrap_pools_pairs_over_seeds():
    """The pooled statistic is the mean gain over seeds on the same resampled images."""
    good, weak = _scores(3.0, 0), _scores(0.0, 1)
    alone = paired_bootstrap(LABELS, [(good, weak)], n=N_BOOT)
    pooled = paired_bootstrap(LABELS, [(good, weak), (weak, weak)], n=N_BOOT)
    np.testing.assert_allclose(pooled, np.array(alone) / 2, atol=1e-9)


# -- aggregate over seeds --------------------------------------------------------------

N = 20
SEED_LABELS = [0] * N + [1] * N


def _with_bottom_anomalies(k: int) -> list[float]:
    """Perfect scores, except k anomalies scored below every normal: AUROC = 1 - k / N."""
    s = list(range(2 * N))
    for i in range(k):
        s[N + i] = -1 - i
    return [float(v) for v in s]


def _report(seed: int, k: int, pixel: float | None, scratch: float) -> dict:
    base_auc = 1 - k / N
    rows = [
        {"name": "baseline", "image_auroc": base_auc, "pixel_auroc": None, "per_defect": {"scratch": 0.5}},
        {"name": "cmle (skipped)", "skipped": "too few captions"},
        {"name": "cmg", "image_auroc": 1.0, "pixel_auroc": pixel, "per_defect": {"scratch": scratch}},
    ]
    return {"rows": rows, "seed": seed, "data": "/data", "config": "tiny", "test_images": 2 * N,
            "labels": SEED_LABELS,
            "scores": {"baseline": _with_bottom_anomalies(k), "cmg": [float(v) for v in range(2 * N)]}}


@pytest.fixture(scope="module")
def seeds() -> dict:
    reports = [_report(0, 2, 0.8, 0.5), _report(1, 5, None, 0.6), _report(2, 8, 0.7, 0.9)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "paired_bootstrap", functools.partial(paired_bootstrap, n=N_BOOT))
        return aggregate(reports)


def test_aggregate_medians_and_ranges(seeds):
    rows = {r["name"]: r for r in seeds["rows"]}
    assert list(rows) == ["baseline", "cmg"]  # skipped rows are left out
    assert rows["baseline"]["image_auroc"] == pytest.approx(0.75)
    assert rows["baseline"]["image_auroc_range"] == pytest.approx([0.6, 0.9])
    assert "pixel_auroc" not in rows["baseline"] and "gain_vs_baseline" not in rows["baseline"]
    assert rows["cmg"]["pixel_auroc"] == pytest.approx(0.75)  # median of the seeds that have one
    assert rows["cmg"]["pixel_auroc_range"] == pytest.approx([0.7, 0.8])
    assert rows["cmg"]["per_defect"] == {"scratch": pytest.approx(0.6)}
    assert rows["cmg"]["seeds"] == 3
    assert (seeds["seeds"], seeds["config"], seeds["test_images"]) == ([0, 1, 2], "tiny", 2 * N)


def test_aggregate_gain_is_paired_over_seeds(seeds):
    cmg = next(r for r in seeds["rows"] if r["name"] == "cmg")
    assert cmg["gain_vs_baseline"] == pytest.approx(0.25)  # median of 0.1, 0.25, 0.4
    lo, hi = cmg["gain_vs_baseline_ci95"]
    assert 0 < lo < 0.25 < hi  # pooled mean gain on the full set is also 0.25


# -- the threshold and what it does -------------------------------------------------------


def test_normal_threshold_keeps_its_false_positive_promise_on_new_normals():
    """Over many held-out sets of 30 normals, a new normal frame is flagged at most `fpr` of the
    time (the split-conformal guarantee); the interpolated quantile it replaced flags more."""
    rng = np.random.default_rng(0)
    fpr, trials = 0.05, 4000
    held, new = rng.normal(size=(trials, 30)), rng.normal(size=(trials, 200))
    ours = np.array([normal_threshold(h, fpr)[0] for h in held])
    plain = np.quantile(held, 1 - fpr, axis=1)
    assert (new > ours[:, None]).mean() <= fpr + 0.003  # k = 30: bound 1/31 = 0.032
    assert (new > plain[:, None]).mean() > fpr + 0.005
    assert all((h > t).mean() <= fpr for h, t in zip(held, ours, strict=True))  # and on the frames it was set on


def test_normal_threshold_order_statistic_and_bound():
    s = np.arange(1.0, 101.0)[::-1]  # 100 held-out scores, unsorted
    thr, bound = normal_threshold(s, 0.05)  # k = ceil(101 * 0.95) = 96
    assert thr == 96.0 and bound == pytest.approx(5 / 101)
    thr, bound = normal_threshold(np.arange(10.0), 0.05)  # too few for 5%: the maximum, and the honest bound
    assert thr == 9.0 and bound == pytest.approx(1 / 11) and bound > 0.05
    with pytest.raises(ValueError, match="no held-out normal scores"):
        normal_threshold(np.array([]), 0.05)
    with pytest.raises(ValueError, match="1 of 3 normal scores are not finite"):  # NaN sorts last: no error, a NaN
        normal_threshold(np.array([1.0, np.nan, 2.0]), 0.05)


def test_operating_point_counts_flags_above_the_threshold():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    defects = ["good"] * 4 + ["hole", "hole", "stain", "stain"]
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9, 0.4, 0.5, 0.7])
    p = operating_point(labels, defects, scores, 0.5)  # 0.5 itself is not above it
    assert p["false_positive_rate"] == 0.25 and p["recall"] == 0.5 and p["normal_frames"] == 4
    assert p["recall_per_defect"] == {"hole": 0.5, "stain": 0.5}
    lo, hi = p["false_positive_rate_ci95"]  # Clopper-Pearson for 1 of 4
    assert lo == pytest.approx(0.00631, abs=1e-4) and hi == pytest.approx(0.80589, abs=1e-4)


def _at(seed: int, fp: float, rec: float) -> dict:
    return {"name": "run", "at_threshold": {
        "threshold": 1.0 + seed, "normal_frames": 20, "false_positive_rate": fp, "false_positive_rate_ci95": [0.0, 0.3],
        "recall": rec, "recall_per_defect": {"hole": rec, "stain": rec / 2}, "target_false_positive_rate": 0.05}}


def test_threshold_table_per_seed_and_median():
    reports = [{"seed": s, "rows": [_at(s, fp, rec)]} for s, fp, rec in ((0, 0.1, 0.4), (1, 0.0, 0.2), (2, 0.05, 0.6))]
    lines = threshold_table(reports).splitlines()
    assert lines[3] == "| seed | threshold | target FPR | test FPR (95% CI) | recall | hole | stain |"
    assert lines[5] == "| 0 | 1.000 | 0.050 | 0.100 (0.00-0.30) | 0.400 | 0.400 | 0.200 |"
    assert lines[-1] == "| median | - | 0.050 | 0.050 | 0.400 | 0.400 | 0.200 |"
    assert threshold_table(reports[:1]).splitlines()[-1].startswith("| 0 | 1.000 |")  # one run: no median line
    assert threshold_table([{"seed": 0, "rows": [{"name": "baseline"}]}]) == ""


# -- tables ----------------------------------------------------------------------------


def test_single_run_table():
    rows = [
        {"name": "run", "image_auroc": 0.8, "image_auroc_ci95": [0.7, 0.9], "pixel_auroc": None,
         "per_defect": {"hole": 0.75, "scratch": None}},
        {"name": "cmg", "image_auroc": 0.85, "image_auroc_ci95": [0.75, 0.95], "pixel_auroc": 0.6,
         "pixel_aupro": 0.4, "per_defect": {"hole": 0.8, "scratch": 0.9}, "delta_vs_baseline": 0.05,
         "delta_vs_baseline_ci95": [-0.01, 0.1]},
        {"name": "cmle (skipped)", "skipped": "too few captions"},
    ]
    assert markdown_table(rows).splitlines()[0].endswith("| hole | scratch |")  # without the kinds' counts
    assert markdown_table(rows, ["good", "hole", "hole", "scratch"]).splitlines() == [
        "| row | image AUROC (95% CI) | vs baseline (paired 95% CI) | pixel AUROC | pixel AUPRO (FPR <= 0.3) | "
        "hole (2) | scratch (1) |",
        "|---|---|---|---|---|---|---|",
        "| run | 0.800 (0.70-0.90) | - | - | - | 0.750 | - |",
        "| cmg | 0.850 (0.75-0.95) | +0.050 (-0.010 to +0.100) | 0.600 | 0.400 | 0.800 | 0.900 |",
        "| cmle (skipped) | skipped: too few captions |",
    ]


def test_seeds_table(seeds):
    lines = markdown_table(seeds["rows"]).splitlines()
    assert lines[0].startswith("| row | image AUROC, median (range) | gain vs baseline: median (range over seeds); "
                               "mean, paired 95% CI |")
    assert lines[2] == "| baseline | 0.750 (0.60-0.90) | - | - | - | 0.500 |"
    assert lines[3].startswith("| cmg | 1.000 (1.00-1.00) | +0.250 (+0.100 to +0.400); mean +0.250, CI +")
    assert lines[3].endswith("| 0.750 | - | 0.600 |")  # pixel AUROC, no AUPRO in these reports, scratch


def test_the_seeds_gain_shows_the_mean_its_interval_is_of():
    """The median gain was printed beside the interval of the mean gain: with gains 0.05,
    0.05, 0.45 the cell read +0.050 (CI +0.1 to +0.2), a gain outside its own interval."""
    reports = [_report(0, 1, None, 0.5), _report(1, 1, None, 0.5), _report(2, 9, None, 0.5)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "paired_bootstrap", functools.partial(paired_bootstrap, n=N_BOOT))
        cmg = next(r for r in aggregate(reports)["rows"] if r["name"] == "cmg")
    assert cmg["gain_vs_baseline"] == pytest.approx(0.05) and cmg["gain_vs_baseline_range"] == pytest.approx([0.05, 0.45])
    assert cmg["gain_vs_baseline_mean"] == pytest.approx(0.55 / 3)
    lo, hi = cmg["gain_vs_baseline_ci95"]
    assert lo <= cmg["gain_vs_baseline_mean"] <= hi and not lo <= cmg["gain_vs_baseline"] <= hi
    assert f"mean +0.183, CI {lo:+.3f} to {hi:+.3f}" in markdown_table([cmg])


def _sweep_report(seed: int, aucs: tuple[float, float], alpha: float = 0.3) -> dict:
    return {"seed": seed, "alpha": alpha,
            "alpha_sweep": [{"alpha": a, "image_auroc": v, "pixel_auroc": 0.9, "kept": 1 - a}
                            for a, v in zip((0.0, 0.3), aucs, strict=True)]}


def test_alpha_sweep_over_seeds_is_paired_with_each_seeds_alpha_0():
    reports = [_sweep_report(0, (0.80, 0.83)), _sweep_report(1, (0.70, 0.71)), _sweep_report(2, (0.90, 0.89))]
    rows = alpha_medians(reports)
    assert [r["alpha"] for r in rows] == [0.0, 0.3]
    assert rows[1]["image_auroc"] == pytest.approx(0.83) and rows[1]["image_auroc_range"] == pytest.approx([0.71, 0.89])
    assert rows[1]["gain"] == pytest.approx(0.01) and rows[1]["gain_range"] == pytest.approx([-0.01, 0.03])
    assert rows[0]["gain"] == 0.0 and rows[1]["kept"] == pytest.approx(0.7) and rows[1]["seeds"] == 3
    lines = alpha_table(reports).splitlines()
    assert lines[-2] == "| 0.00 | 0.800 (0.700-0.900) | +0.000 (+0.000 to +0.000) | 0.900 | 1.00 |"
    assert lines[-1] == "| 0.30 (run) | 0.830 (0.710-0.890) | +0.010 (-0.010 to +0.030) | 0.900 | 0.70 |"
    # with a global weight the other rows keep the run's CMLE head and global bank: said so
    reports[1]["global_weight"] = 0.25
    assert alpha_table(reports).splitlines()[-1].startswith("Rows other than the run's are estimates")


def test_one_runs_alpha_table_shows_no_range_and_says_what_a_difference_is_worth():
    """One run's table was headed "median (range)" and "range over seeds", with a range of one
    value, and invited a change of cmer.alpha on a 0.005 difference."""
    lines = alpha_table([_sweep_report(0, (0.80, 0.83))]).splitlines()
    assert "| alpha | image AUROC | gain over alpha 0 | pixel AUROC | frame kept |" in lines
    assert "| 0.30 (run) | 0.830 | +0.030 | 0.900 | 0.70 |" in lines
    assert lines[-1].startswith("One run: a gain of a point or two between rows is within")


def test_alpha_sweep_needs_the_same_sweep_in_every_report():
    assert alpha_medians([_sweep_report(0, (0.8, 0.9)), {"seed": 1}]) == []  # a report cached before the sweep
    assert alpha_table([{"seed": 0}]) == ""
    odd = _sweep_report(1, (0.8, 0.9))
    odd["alpha_sweep"][1]["alpha"] = 0.4
    assert alpha_medians([_sweep_report(0, (0.8, 0.9)), odd]) == []


# -- the tiny run ----------------------------------------------------------------------

TINY_DEFECTS = {"scratch", "hole", "stain", "deformation", "wrong_part"}


def test_ablation_table_on_the_tiny_run(tiny_run, tiny_data, fast_bootstrap):
    import torch

    from cmg_train.checkpoint import load_run
    from cmg_train.cmer.model import keep_mask_cfg
    from cmg_train.cmer.report import defect_coverage, false_alarm_peaks
    from cmg_train.evaluate import TestSet, alpha_sweep, evaluate, local_maps
    from cmg_train.loop import batched

    run = load_run(tiny_run)
    report = evaluate(run, tiny_data, ablation=True, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) >= {"run", *ABLATION, "cmg_exact", "patchcore", "teacher_knn", "pyod_ecod"}  # + diagnostic rows
    assert report["test_images"] == 135 and report["anomalies"] == 75
    assert [f.startswith("test/good/") for f in report["files"]] == [lab == 0 for lab in report["labels"]]
    head = (tiny_run / "eval" / "ablation.md").read_text().splitlines()[0]  # which data, which checkpoint
    assert str(Path(tiny_data).resolve()) in head and report["checkpoint_sha256"][:12] in head
    assert "no defect image has a ground-truth mask" not in head  # this data has masks
    for name in ("run", *ABLATION, "cmg_exact"):
        assert set(rows[name]["per_defect"]) == TINY_DEFECTS
        lo, hi = rows[name]["image_auroc_ci95"]
        assert lo <= rows[name]["image_auroc"] <= hi
        assert rows[name]["pixel_auroc"] is not None  # every detector row has anomaly maps
        assert 0.0 <= rows[name]["pixel_aupro"] <= 1.0
    for name in ("teacher_knn", "pyod_ecod"):
        assert rows[name]["pixel_auroc"] is None and np.isfinite(rows[name]["image_auroc"])
        assert rows[name]["pixel_aupro"] is None
    d, (lo, hi) = rows["cmg"]["delta_vs_baseline"], rows["cmg"]["delta_vs_baseline_ci95"]
    assert lo <= d <= hi
    assert d == pytest.approx(rows["cmg"]["image_auroc"] - rows["baseline"]["image_auroc"])
    # Same seed, same code path: the run's own configuration (CMG) is reproduced exactly.
    assert rows["cmg"]["image_auroc"] == pytest.approx(rows["run"]["image_auroc"], abs=1e-6)
    assert report["scores"]["cmg"] == pytest.approx(report["scores"]["run"], abs=1e-5)
    cover = report["keep_mask_on_test"]
    assert set(cover) == {"scorer", "teacher", "normal_false_alarms"}
    test = TestSet(tiny_data, run.cfg.data.image_size, progress=False)
    (ps,) = batched(run.scorer_graph(), test.frames)
    assert cover["scorer"] == defect_coverage(keep_mask_cfg(ps, run.cfg.cmer), test.gt)
    normal = torch.from_numpy(test.labels == 0)
    alarms = false_alarm_peaks(local_maps(run.detector, test.frames[normal]), keep_mask_cfg(ps[normal], run.cfg.cmer))
    assert cover["normal_false_alarms"] == pytest.approx(alarms)
    assert alarms["normal_frames"] == int(normal.sum()) and 0 <= alarms["peak_outside_keep"] <= 1
    assert 0 < cover["teacher"]["defect_pixels_kept"] <= 1
    at = rows["run"]["at_threshold"]  # the served threshold on the test split
    assert at == operating_point(report["labels"], report["defects"], np.array(report["scores"]["run"]),
                                 float(run.detector.threshold)) | {"target_false_positive_rate": run.cfg.scoring.fpr}
    assert set(at["recall_per_defect"]) == TINY_DEFECTS and 0 <= at["false_positive_rate"] <= 1
    eval_dir = run.path / "eval"
    for f in ("ablation.json", "ablation.md", "ablation_roc.png", "ablation_masks.png", "ablation_alpha.png",
              "ablation_errors.png"):
        assert (eval_dir / f).stat().st_size > 0
    assert (eval_dir / "ablation.md").read_text().split("\n\n", 1)[1] == (
        markdown_table(report["rows"], report["defects"]) + threshold_table([report]) + alpha_table([report]))
    # The keep-mask threshold sweep: at the run's own alpha it is the run, exactly; a higher
    # threshold never keeps more; alpha 0 keeps every patch; the detector is left as it was.
    sweep = {r["alpha"]: r for r in report["alpha_sweep"]}
    assert list(sweep) == sorted({*SWEEP_ALPHAS, run.cfg.cmer.alpha})
    assert sweep[run.cfg.cmer.alpha]["image_auroc"] == pytest.approx(rows["run"]["image_auroc"], abs=1e-9)
    assert sweep[run.cfg.cmer.alpha]["pixel_auroc"] == pytest.approx(rows["run"]["pixel_auroc"], abs=1e-9)
    kept = [sweep[a]["kept"] for a in SWEEP_ALPHAS]
    assert kept[0] == 1.0 and kept == sorted(kept, reverse=True) and kept[-1] < 1.0
    assert run.detector.cmer_cfg == run.cfg.cmer and run.detector.use_mask
    assert report["global_weight"] == float(run.detector.global_weight)
    few = alpha_sweep(run.detector, test, ps, local_maps(run.detector, test.frames), alphas=(0.0, 0.5))
    assert [r["alpha"] for r in few] == [0.0, run.cfg.cmer.alpha, 0.5]  # the run's own alpha always in
    assert few[1]["image_auroc"] == pytest.approx(rows["run"]["image_auroc"], abs=1e-9)


@pytest.mark.parametrize("change", ["alpha", "data"])
def test_eval_of_several_runs_refuses_a_run_of_another_config(tiny_run, tmp_path, change):
    """`cmg eval --run A --run B`: medians over seeds of one config. A run of another config had
    been scored with A's test frames (an internal error on another image size) or, from cached
    reports, folded into A's table without a word."""
    import argparse
    import shutil

    import torch

    from cmg.errors import CMGError

    other = Path(shutil.copytree(tiny_run, tmp_path / "other", ignore=shutil.ignore_patterns("eval", "onnx")))
    state = torch.load(other / "checkpoint.pt", weights_only=False)
    if change == "alpha":
        state["config"]["cmer"]["alpha"] = 0.45
    else:  # the same config trained on another folder (`cmg bench shots` runs of 10 and 25 images)
        state["metrics"]["data"] = str(tmp_path / "another folder")
    torch.save(state, other / "checkpoint.pt")
    args = argparse.Namespace(run=[tiny_run, other], data=None, ablation=False, out=tmp_path / "seeds",
                              recompute=False, no_progress=True)
    want = r"cmer.alpha 0\.45 -> 0\.2" if change == "alpha" else "trained on .*another folder"
    with pytest.raises(CMGError, match=r"is not another seed of .*" + want):
        ev.run(args)
    assert not (tmp_path / "seeds").exists()


def test_the_ablation_retrains_from_the_data_option_when_the_runs_folder_moved(tiny_run, tiny_data, tmp_path):
    """A run copied to another machine names a training folder that is not there: the rows
    retrain from the folder --data names, and without one the error says to pass it."""
    from cmg.errors import CMGError
    from cmg_train.checkpoint import load_run
    from cmg_train.evaluate import training_folder

    run = load_run(tiny_run)
    assert training_folder(run).root.resolve() == tiny_data.resolve()
    run.metrics["data"] = str(tmp_path / "moved_away")
    assert training_folder(run, tiny_data).root == tiny_data
    with pytest.raises(CMGError, match="not there any more: pass --data"):
        training_folder(run)


def test_ablation_without_a_caption_graph_lists_the_cmle_rows_as_skipped(tiny_run, tiny_data, tmp_path,
                                                                          fast_bootstrap):
    """A training folder whose captions cannot make CMLE's graph (here: one caption for every
    image, as a folder captioned by a name template is): the ablation still runs, its CMLE
    rows say why they are skipped and carry no figures (no AUROC, delta or ROC curve), and the
    masks pictures show the run itself (this crashed with a KeyError before, in `cmg bench
    shots` on 10 images)."""
    import json
    import shutil

    from cmg_train.checkpoint import load_run
    from cmg_train.evaluate import evaluate

    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    for kind in (data / "test").iterdir():  # a few test frames per kind: the path, not the figures, is tested
        for path in sorted(kind.iterdir())[3:]:
            path.unlink()
    for name in ("captions.jsonl", "meta.jsonl"):  # their lines about the removed frames go too
        rows = [json.loads(line) for line in (data / name).read_text().splitlines()]
        rows = [r | {"caption": "a part"} if name == "captions.jsonl" else r for r in rows if (data / r["file"]).exists()]
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "onnx")))
    run = load_run(run_dir)
    run.metrics["data"] = str(data)  # the training folder the ablation retrains from: the one-caption copy
    report = evaluate(run, data, ablation=True, progress=False)
    by = {r["name"]: r for r in report["rows"]}
    assert {"cmle (skipped)", "cmg (skipped)"} <= set(by) and "unique captions" in by["cmg (skipped)"]["skipped"]
    assert {"run", "baseline", "cmer", "patchcore"} <= set(by)
    for name in ("cmle (skipped)", "cmg (skipped)"):  # no model, so no figure: they read 0.5 and a delta before
        assert set(by[name]) == {"name", "skipped"} and name not in report["scores"]
    for f in ("ablation_masks.png", "ablation_errors.png"):
        assert (run_dir / "eval" / f).stat().st_size > 0


def test_evaluate_without_progress_silences_the_libraries_bars(tiny_run, tiny_data, tmp_path):
    """`cmg eval --no-progress`: no bar on stderr, MiniLM's "Loading weights" included (the
    ablation loads it; evaluate turns the libraries' bars off, as `cmg train` does)."""
    import shutil

    from transformers.utils import logging as hf_logging

    from cmg_train.checkpoint import load_run
    from cmg_train.evaluate import evaluate

    run_dir = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "onnx")))
    hf_logging.enable_progress_bar()
    try:
        evaluate(load_run(run_dir), tiny_data, ablation=False, progress=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()


def test_a_cached_report_is_reused_only_while_the_test_split_is_unchanged(tmp_path):
    """`cmg eval` answers from RUN/eval/eval.json; it had kept answering with a defect kind
    deleted from the folder (the key was the folder's path alone)."""
    import json
    import os
    from types import SimpleNamespace

    from cmg_train.evaluate import cached_report, test_split_fingerprint

    data = tmp_path / "data"
    for f in ("test/good/000.png", "test/stain/000.png", "ground_truth/stain/000_mask.png"):
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        (data / f).write_bytes(b"x")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"the model")
    from cmg.checksum import file_sha256

    report = {"data": str(data.resolve()), "data_fingerprint": test_split_fingerprint(data), "rows": [],
              "checkpoint_sha256": file_sha256(run / "checkpoint.pt"), "eval_version": ev.EVAL_VERSION}
    (run / "eval" / "eval.json").write_text(json.dumps(report))
    r = SimpleNamespace(path=run)
    assert cached_report(r, data, ablation=False) == report
    older = {k: v for k, v in report.items() if k != "eval_version"}  # scored by an older version
    (run / "eval" / "eval.json").write_text(json.dumps(older))
    assert cached_report(r, data, ablation=False) is None
    (run / "eval" / "eval.json").write_text(json.dumps(report))
    import shutil

    twin = Path(shutil.copytree(data, tmp_path / "twin"))  # copy2 keeps the times: the same fingerprint
    assert test_split_fingerprint(twin) == report["data_fingerprint"]
    assert cached_report(r, twin, ablation=False) is None  # another folder: its report names its own path
    mask = data / "ground_truth/stain/000_mask.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))  # a mask redrawn
    assert cached_report(r, data, ablation=False) is None
    report["data_fingerprint"] = test_split_fingerprint(data)
    (run / "eval" / "eval.json").write_text(json.dumps(report))
    assert cached_report(r, data, ablation=False) == report
    # another checkpoint put in with an older time (cp -p, rsync -a): another model all the same
    old = (run / "eval" / "eval.json").stat().st_mtime_ns - 10**12
    (run / "checkpoint.pt").write_bytes(b"another model")
    os.utime(run / "checkpoint.pt", ns=(old, old))
    assert cached_report(r, data, ablation=False) is None
    (run / "checkpoint.pt").write_bytes(b"the model")
    assert cached_report(r, data, ablation=False) == report
    # a mask that meta.jsonl names outside ground_truth/ is part of what was scored
    (data / "masks").mkdir()
    (data / "masks" / "m.png").write_bytes(b"m")
    (data / "meta.jsonl").write_text(json.dumps({"file": "test/stain/000.png", "gt_mask": "masks/m.png"}) + "\n")
    report["data_fingerprint"] = test_split_fingerprint(data)
    (run / "eval" / "eval.json").write_text(json.dumps(report))
    assert cached_report(r, data, ablation=False) == report
    (data / "masks" / "m.png").write_bytes(b"redrawn")
    assert cached_report(r, data, ablation=False) is None
    (run / "eval" / "eval.json").write_text(json.dumps(report)[:40])  # torn: scored again, not an error
    assert cached_report(r, data, ablation=False) is None
    (data / "test/stain/000.png").unlink()  # a kind removed
    assert cached_report(r, data, ablation=False) is None


def test_a_defect_image_without_its_mask_is_left_out_of_the_pixel_metrics(tiny_data, tmp_path, capsys):
    """It had entered them as a frame of normal pixels, without a word."""
    import shutil

    from cmg_train.evaluate import TestSet

    data = tmp_path / "data"
    shutil.copytree(tiny_data / "test", data / "test")
    shutil.copytree(tiny_data / "ground_truth", data / "ground_truth")
    (data / "train" / "good").mkdir(parents=True)
    mask = sorted((data / "ground_truth" / "hole").glob("*_mask.png"))[0]
    mask.unlink()
    test = TestSet(data, 64, progress=False)
    gone = [i for i, s in enumerate(test.samples) if s.path.name == mask.name.replace("_mask", "")
            and s.defect == "hole"]
    assert len(gone) == 1 and not test.pixel[gone[0]] and test.pixel.sum() == len(test.samples) - 1
    err = capsys.readouterr().err
    assert "1 defect image(s) have no mask or an empty one (first: test/hole/" in err
    assert "no ground_truth/hole/" in err and "_mask.png (or " in err  # the name it looked for
    maps = np.random.default_rng(0).random((len(test.samples), 16, 16)).astype(np.float32)
    want = ev.pixel_metrics(maps[test.pixel], test.gt[test.pixel])
    assert test.pixel_metrics(maps) == want
    # a mask that marks no pixel is no mask either; a 0/1 mask (not 0/255) marks its pixels
    from PIL import Image

    masks = sorted((data / "ground_truth" / "hole").glob("*_mask.png"))
    with Image.open(masks[0]) as im:
        marked = np.asarray(im.convert("L")) > 127
    Image.fromarray(np.zeros(marked.shape, np.uint8)).save(masks[0])
    Image.fromarray(marked.astype(np.uint8)).save(masks[1])  # values 0 and 1
    test = TestSet(data, 64, progress=False)
    err = capsys.readouterr().err
    assert "2 defect image(s) have no mask or an empty one" in err and test.pixel.sum() == len(test.samples) - 2
    one = next(i for i, s in enumerate(test.samples) if s.mask_path == masks[1])
    assert test.pixel[one] and test.gt[one].any()
    for other in (data / "ground_truth").rglob("*.png"):  # ground_truth/ there, no mask found: said
        other.rename(other.with_name(other.stem + "_old.txt"))
    TestSet(data, 64, progress=False)
    assert "have no mask or an empty one" in capsys.readouterr().err
    shutil.rmtree(data / "ground_truth")  # no masks at all: pixel metrics are '-', no warning
    test = TestSet(data, 64, progress=False)
    assert test.pixel_metrics(maps)["pixel_auroc"] is None and not capsys.readouterr().err


@pytest.mark.parametrize(("keep", "said"), [("good", "only normal images"), ("bad", "only anomalous images")])
def test_a_test_split_of_one_kind_is_refused_naming_what_is_missing(tmp_path, keep, said):
    import shutil

    from cmg.errors import CMGError
    from cmg_data.synth import synthesize
    from cmg_train.evaluate import TestSet

    data = synthesize(tmp_path / "d", "tiny", seed=0, n_train=4, n_test_good=2, n_test_per_anomaly=1, progress=False)
    for kind in (data / "test").iterdir():
        if (kind.name == "good") != (keep == "good"):
            shutil.rmtree(kind)
    with pytest.raises(CMGError, match=f"needs normal and anomalous images to measure AUROC; it has {said}"):
        TestSet(data, 64, progress=False)


def test_a_folder_of_test_frames_alone_is_scored(tmp_path):
    """`cmg eval --data NEW` on frames from the line (test/ and ground_truth/, no train/) had
    been refused for a missing train/good, which eval never reads."""
    import shutil

    from cmg_data.synth import synthesize
    from cmg_train.evaluate import TestSet

    data = synthesize(tmp_path / "d", "tiny", seed=0, n_train=4, n_test_good=2, n_test_per_anomaly=1, progress=False)
    shutil.rmtree(data / "train")
    for index in ("meta.jsonl", "captions.jsonl"):  # the generator's indexes name the training images too
        (data / index).unlink()
    test = TestSet(data, 64, progress=False)
    assert len(test.labels) > 2 and 0 < test.labels.sum() < len(test.labels) and test.gt.any()


def test_the_long_pass_of_an_eval_shows_progress(capsys):
    """`cmg eval` had shown one bar (frames, under a second), then minutes of silence."""
    from types import SimpleNamespace

    import torch

    from cmg_train.evaluate import local_maps

    det = SimpleNamespace(teacher=SimpleNamespace(preprocess=lambda f: f.float()),
                          local_map=lambda f, p: p.mean(dim=-1))
    maps = local_maps(det, torch.zeros(3, 4, 4, 3, dtype=torch.uint8), progress=True)
    assert maps.shape == (3, 4, 4) and "anomaly maps" in capsys.readouterr().err
    local_maps(det, torch.zeros(3, 4, 4, 3, dtype=torch.uint8))
    assert "anomaly maps" not in capsys.readouterr().err


def test_a_read_only_run_is_said_before_scoring(tiny_run, tiny_data, monkeypatch):
    """A run on a read-only mount had been scored for minutes, then failed writing its report."""
    import cmg_train.evaluate as ev
    from cmg.errors import CMGError
    from cmg_train.checkpoint import load_run

    run = load_run(tiny_run)
    monkeypatch.setattr(ev.os, "access", lambda path, mode: False)
    monkeypatch.setattr(ev, "TestSet", lambda *a, **k: pytest.fail("scored a run it cannot write the report of"))
    with pytest.raises(CMGError, match="is read-only: evaluate a copy of the run"):
        ev.evaluate(run, tiny_data, ablation=False, progress=False)


def test_eval_of_several_runs_counts_each_seed_once(tiny_run, tmp_path):
    """`cmg eval --run R --run ./R` printed a "median over seeds" of one run counted twice
    (a copy of a run passed as another seed too)."""
    import argparse
    import shutil

    from cmg.errors import CMGError

    copy = Path(shutil.copytree(tiny_run, tmp_path / "copy", ignore=shutil.ignore_patterns("eval", "onnx")))
    for runs, want in (([tiny_run, tiny_run / "."], "are the same run"), ([tiny_run, copy], "are seed 0 too")):
        args = argparse.Namespace(run=runs, data=None, ablation=False, out=tmp_path / "seeds", recompute=False,
                                  no_progress=True)
        with pytest.raises(CMGError, match=want):
            ev.run(args)
    assert not (tmp_path / "seeds").exists()


def test_an_eval_stopped_while_drawing_leaves_no_report_to_reuse(tiny_run, tiny_data, tmp_path, monkeypatch):
    """STEM.json marks a finished report: written first, an eval stopped while drawing left it,
    and the rerun answered from it, claiming pictures missing or drawn from other data."""
    import shutil

    from cmg_train.checkpoint import load_run

    run_dir = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "onnx")))
    run = load_run(run_dir)
    ev.evaluate(run, tiny_data, ablation=False, progress=False)
    assert ev.cached_report(run, tiny_data, ablation=False) is not None  # a finished report is reused

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "mask_grid", stop)  # the pictures: drawn after the json, before the fix
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(run, tiny_data, ablation=False, progress=False)
    assert ev.cached_report(run, tiny_data, ablation=False) is None
    assert not (run_dir / "eval" / "eval.json").exists()
