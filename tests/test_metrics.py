"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvae_em.geometry import transform_images
from tvae_em.metrics import (
    angle_error_summary,
    angle_errors,
    circular_correlation,
    class_average_sharpness,
    cluster_embedding_accuracy,
    clustering_accuracy,
    frc,
    frc_resolution,
    kmeans,
    pairwise_view_correlation,
    pearson_r,
    pose_scores,
    recentred_shift_errors,
    relion_align,
    shift_correlation,
    template_correlation,
)
from tvae_em.synthetic import render_glyph


@pytest.fixture
def angles() -> np.ndarray:
    return np.random.default_rng(0).uniform(-math.pi, math.pi, 200)


def test_circular_correlation_identical_offset_negated(angles):
    assert circular_correlation(angles, angles) == pytest.approx(1.0)
    assert circular_correlation(angles, angles + 1.234) == pytest.approx(1.0)
    wrapped = np.remainder(angles + 2.0, 2 * math.pi)  # same angles, other branch
    assert circular_correlation(angles, wrapped) == pytest.approx(1.0)
    assert circular_correlation(angles, -angles) == pytest.approx(-1.0)


def test_circular_correlation_hand_computed():
    # a = (0, pi/2, pi): mean direction atan2(1, 0) = pi/2, sin(a - pi/2) = (-1, 0, 1).
    # b = (0, pi/2, pi/2): mean direction m = atan2(2, 1), sin m = 2/sqrt5, cos m = 1/sqrt5,
    #   sin(b - m) = (-2/sqrt5, 1/sqrt5, 1/sqrt5).
    # numerator = 2/sqrt5 + 0 + 1/sqrt5 = 3/sqrt5; sums of squares 2 and 6/5;
    # r = (3/sqrt5) / sqrt(12/5) = 3/sqrt12 = sqrt(3)/2.
    a = np.array([0.0, math.pi / 2, math.pi])
    b = np.array([0.0, math.pi / 2, math.pi / 2])
    assert circular_correlation(a, b) == pytest.approx(math.sqrt(3) / 2, abs=1e-12)


def test_circular_correlation_independent_is_small(angles):
    other = np.random.default_rng(1).uniform(-math.pi, math.pi, angles.size)
    assert abs(circular_correlation(angles, other)) < 0.2


def test_circular_correlation_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        circular_correlation(np.zeros(3), np.zeros(4))


def test_pearson_and_shift_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # y = (2, 1, 4, 3): deviations (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5);
    # sum of products = .75 + .75 + .75 + .75 = 3, sums of squares 5 and 5 -> r = 0.6
    assert pearson_r(x, [2.0, 1.0, 4.0, 3.0]) == pytest.approx(0.6)
    assert pearson_r(x, 3 * x + 1) == pytest.approx(1.0)
    pred = np.stack([x, -x], 1)
    rx, ry = shift_correlation(pred, np.stack([x, x], 1))
    assert (rx, ry) == (pytest.approx(1.0), pytest.approx(-1.0))
    assert math.isnan(pearson_r(x, np.ones(4)))


def test_clustering_accuracy_permuted_labels_is_one():
    true = np.repeat(np.arange(4), 5)
    perm = np.array([2, 0, 3, 1])
    assert clustering_accuracy(perm[true], true) == 1.0
    assert clustering_accuracy(perm[true] + 10, true) == 1.0  # any cluster ids


def test_clustering_accuracy_known_confusion():
    true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([1, 1, 0, 2, 2, 2, 0, 0, 0, 1])
    # confusion (pred x true): 0 -> (1, 0, 3), 1 -> (2, 0, 1), 2 -> (0, 3, 0).
    # best matching 1->0, 2->1, 0->2: 2 + 3 + 3 = 8 of 10.
    assert clustering_accuracy(pred, true) == pytest.approx(0.8)
    # more clusters than classes: only one cluster per class counts (3 + 1 of 6).
    assert clustering_accuracy([0, 0, 0, 1, 2, 3], [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)


def _blobs(n_per: int, centres: np.ndarray, sd: float, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per)
    return centres[labels] + rng.normal(0, sd, (len(labels), centres.shape[1])), labels


def test_kmeans_separated_blobs():
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0], [-8.0, -8.0, 8.0]])
    x, labels = _blobs(50, centres, 1.0, seed=3)
    pred = kmeans(x, 4, n_init=5, seed=0)
    assert pred.shape == labels.shape
    assert clustering_accuracy(pred, labels) == 1.0
    assert cluster_embedding_accuracy(x, labels, k=4, n_init=5) == 1.0


def test_kmeans_restarts_reach_the_best_inertia():
    # Two close pairs and a far blob: a single unlucky seeding can merge a pair; 20 restarts must
    # give an inertia no worse than any single run.
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [40.0, 0.0], [43.0, 0.0]])
    x, labels = _blobs(30, centres, 0.5, seed=1)

    def inertia(lab):
        return sum(((x[lab == j] - x[lab == j].mean(0)) ** 2).sum() for j in np.unique(lab))

    singles = [inertia(kmeans(x, 4, n_init=1, seed=s)) for s in range(10)]
    best = inertia(kmeans(x, 4, n_init=20, seed=0))
    assert best <= min(singles) + 1e-9
    assert clustering_accuracy(kmeans(x, 4, n_init=20, seed=0), labels) == 1.0


def _pose(img: np.ndarray, theta: float, t=(0.0, 0.0)) -> np.ndarray:
    out = transform_images(
        torch.from_numpy(img)[None], torch.tensor([theta]), torch.tensor([t], dtype=torch.float32)
    )
    return out[0].numpy()


def test_template_correlation_searches_rotation_and_shift():
    templates = np.stack([render_glyph(g, 32) for g in "FLP"])
    # averages: the templates in another order, rotated and shifted (an arbitrary canonical frame)
    averages = np.stack(
        [_pose(templates[2], 1.0, (1.0, -2.0)), _pose(templates[0], -2.5), _pose(templates[1], 0.4)]
    )
    cc = template_correlation(averages, templates, n_angles=72, max_shift_px=3)
    assert cc.shape == (3,)
    assert np.all(cc > 0.9)
    no_search = template_correlation(averages, templates, n_angles=1, max_shift_px=0)
    assert np.all(no_search < cc - 0.1)
    matched = template_correlation(averages, templates, one_to_one=True)
    np.testing.assert_allclose(matched, cc, atol=1e-6)


def test_template_correlation_one_to_one_penalises_collapse():
    templates = np.stack([render_glyph(g, 32) for g in "FLP"])
    collapsed = templates[:1]  # a single class average, the F, for three true classes
    free = template_correlation(collapsed, templates)
    matched = template_correlation(collapsed, templates, one_to_one=True)
    assert free[0] == pytest.approx(1.0, abs=1e-4) and matched[0] == pytest.approx(free[0])
    assert np.all(np.isfinite(free)) and np.isnan(matched[1:]).all()  # L, P unmatched


def test_relion_align_blob_centred_by_negative_origin():
    d = 33
    img = np.zeros((d, d))
    img[d // 2, d // 2 + 5] = 1.0  # a point at x = +5
    out = relion_align(img, 0.0, -5.0, 0.0)
    assert np.unravel_index(out.argmax(), out.shape) == (d // 2, d // 2)


def test_relion_align_undoes_the_project_pose():
    # particle = T(t) R(theta) template -> RELION psi = -theta (deg), origin = -t (pixels)
    template = render_glyph("F", 48)
    theta, t = 0.7, (3.0, -2.0)
    particle = _pose(template, theta, t)
    aligned = relion_align(particle, -math.degrees(theta), -t[0], -t[1])
    assert np.corrcoef(aligned.ravel(), template.ravel())[0, 1] > 0.97
    wrong = relion_align(particle, math.degrees(theta), t[0], t[1])
    assert np.corrcoef(wrong.ravel(), template.ravel())[0, 1] < 0.7


# ---- distinct views ---------------------------------------------------------------------------


def test_pairwise_view_correlation_sees_through_rotation_shift_and_mirror():
    f, l_ = render_glyph("F", 32), render_glyph("L", 32)
    turned = _pose(f, math.radians(90), (2.0, -1.0))
    mirrored = np.ascontiguousarray(f[:, ::-1])
    cc = pairwise_view_correlation(np.stack([f, turned, mirrored, l_]), n_angles=72)
    assert cc[0, 1] > 0.99 and cc[0, 2] > 0.99  # one image, turned and shifted / mirrored
    assert cc[0, 3] < 0.9 and np.allclose(cc, cc.T)
    no_mirror = pairwise_view_correlation(np.stack([f, mirrored]), n_angles=72, mirror=False)
    assert no_mirror[0, 1] < cc[0, 2] - 0.1


# ---- pose errors ------------------------------------------------------------------------------


def test_angle_errors_remove_one_offset_per_true_class():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.arange(n) % 2
    true = rng.uniform(-math.pi, math.pi, n)
    err = np.where(np.arange(n) % 4 < 2, 2.0, -2.0)  # +-2 deg, zero mean in each class
    pred = true + np.where(labels == 0, 1.0, -2.5) + np.radians(err)  # class offsets removed
    e = angle_errors(pred, true, labels)
    np.testing.assert_allclose(e, 2.0, atol=1e-9)
    flipped = pred.copy()
    flipped[:40] += math.pi  # 10% half-turn flips
    s = angle_error_summary(angle_errors(flipped, true, labels))
    assert s["angle_beyond_150"] == pytest.approx(0.1, abs=0.005)
    assert s["angle_within_3"] == pytest.approx(0.9, abs=0.005)
    assert s["angle_err_median_deg"] < 12  # the flips drag the class mean a little


def test_recentred_shift_errors_fit_an_offset_that_turns_with_the_particle():
    rng = np.random.default_rng(1)
    n = 600
    labels = np.arange(n) % 3
    theta = rng.uniform(-math.pi, math.pi, n)
    true_t = rng.normal(0, 2, (n, 2))
    d = np.array([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0]])  # each class's template-frame offset
    c, s = np.cos(theta), np.sin(theta)
    moved = np.stack([c * d[labels, 0] - s * d[labels, 1], s * d[labels, 0] + c * d[labels, 1]], 1)
    resid = rng.normal(0, 0.3, (n, 2))
    pred_t = true_t + moved + resid
    err, offsets = recentred_shift_errors(pred_t, true_t, theta, labels)
    np.testing.assert_allclose(offsets, d, atol=0.05)
    np.testing.assert_allclose(err, np.linalg.norm(resid, axis=1), atol=0.1)
    raw = np.linalg.norm(pred_t - true_t, axis=1)
    assert np.median(raw) > 1.0 > np.median(err)
    # a constant offset in the particle frame is not a frame offset: it stays an error
    err2, _ = recentred_shift_errors(true_t + np.array([2.0, 0.0]), true_t, theta, labels)
    assert np.median(err2) > 1.5


def test_pose_scores_of_the_truth_and_of_permuted_labels():
    rng = np.random.default_rng(2)
    n = 90
    labels = np.arange(n) % 3
    theta, t = rng.uniform(-math.pi, math.pi, n), rng.normal(0, 2, (n, 2))
    s = pose_scores(theta + labels, t, (labels + 1) % 3, theta, t, labels)
    assert s["class_acc"] == 1.0 and s["angle_err_median_deg"] == pytest.approx(0, abs=1e-9)
    assert s["shift_err_median_px"] == pytest.approx(0, abs=1e-9) and s["shift_r"] == 1.0


# ---- sharpness --------------------------------------------------------------------------------


def test_frc_resolution_of_identical_lowpassed_and_noisy_images():
    from tvae_em.fourier import lowpass

    img = render_glyph("P", 64) + np.random.default_rng(3).normal(0, 0.05, (64, 64))
    assert frc(img, img) == pytest.approx(np.ones(32))
    assert frc_resolution(img, img, apix=2.0) == 4.0  # Nyquist
    soft = lowpass(img[None].astype(np.float32), 2.0, 16.0, kind="hard")[0]
    res = frc_resolution(img, soft, apix=2.0)
    assert 12.0 < res < 20.0  # the cut at 16 A
    other = np.random.default_rng(4).normal(0, 1, (64, 64))
    assert frc_resolution(img, other, apix=2.0) > 30.0


def test_class_average_sharpness_perfect_vs_misaligned():
    templates = np.stack([render_glyph(g, 32) for g in "FLP"])
    labels = np.arange(60) % 3
    good = class_average_sharpness(templates[labels], labels, templates, apix=4.0)
    assert good["avg_cc_mean"] > 0.99 and good["avg_frc05_median_A"] == pytest.approx(8.0)
    rng = np.random.default_rng(5)
    smeared = np.stack([_pose(templates[k], rng.uniform(-0.6, 0.6)) for k in labels])
    bad = class_average_sharpness(smeared, labels, templates, apix=4.0)
    assert bad["avg_cc_mean"] < good["avg_cc_mean"] - 0.05
    assert bad["avg_frc05_median_A"] > 12.0
    merged = class_average_sharpness(templates[labels], np.zeros(60, int), templates, apix=4.0)
    assert merged["avg_cc"].count(0.0) == 2  # one class for three templates: two unmatched
