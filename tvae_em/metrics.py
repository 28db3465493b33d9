"""Scores against ground truth, as the paper reports them: angles, shifts, clusters, class averages.

All functions take numpy arrays (or anything ``np.asarray`` accepts) and return plain floats/arrays,
so benchmarks and tests can use them on values read back from a star file.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch
from scipy.optimize import linear_sum_assignment

from .clustering import kmeans
from .geometry import transform_images


def circular_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Jammalamadaka-SenGupta circular correlation of two angle samples (radians), in [-1, 1].

    r = sum sin(a - a_bar) sin(b - b_bar) / sqrt(sum sin^2(a - a_bar) sum sin^2(b - b_bar)),
    with a_bar, b_bar the circular means. Invariant to a constant offset of either sample; NaN when
    either sample has no spread around its mean.
    """
    a, b = _paired(a, b)
    sa = np.sin(a - _circular_mean(a))
    sb = np.sin(b - _circular_mean(b))
    den = np.sqrt(np.sum(sa**2) * np.sum(sb**2))
    return float(np.sum(sa * sb) / den) if den > 0 else float("nan")


def _circular_mean(a: np.ndarray) -> float:
    """Direction of the mean resultant vector of angles a (radians)."""
    return float(np.arctan2(np.sin(a).sum(), np.cos(a).sum()))


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two same-length float64 vectors, or ValueError."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two samples of the same length >= 2, got {a.size} and {b.size}")
    return a, b


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation coefficient of two samples; NaN when either is constant."""
    a, b = _paired(a, b)
    da, db = a - a.mean(), b - b.mean()
    den = np.sqrt(np.sum(da**2) * np.sum(db**2))
    return float(np.sum(da * db) / den) if den > 0 else float("nan")


def shift_correlation(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pearson r per axis between predicted and true shifts, both (n, 2) as (x, y)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape != true.shape:
        raise ValueError(f"shifts must both be (n, 2), got {pred.shape} and {true.shape}")
    return pearson_r(pred[:, 0], true[:, 0]), pearson_r(pred[:, 1], true[:, 1])


def clustering_accuracy(pred_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Fraction of items correctly clustered after the best one-to-one matching of clusters to
    classes (Hungarian algorithm on the confusion matrix); cluster and class ids are arbitrary."""
    pred, true = np.asarray(pred_labels).ravel(), np.asarray(true_labels).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"label vectors differ in length: {pred.size} and {true.size}")
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(true, return_inverse=True)
    confusion = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(confusion, (p, t), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / len(pred))


def cluster_embedding_accuracy(
    embedding: np.ndarray, labels: np.ndarray, k: int, n_init: int = 20, seed: int = 0
) -> float:
    """The paper's clustering accuracy: k-means (k clusters, n_init restarts) on the embedding
    (n, d), scored against the true labels with Hungarian matching."""
    return clustering_accuracy(kmeans(embedding, k, n_init=n_init, seed=seed), labels)


def template_correlation(
    averages: np.ndarray,
    templates: np.ndarray,
    n_angles: int = 72,
    max_shift_px: int = 3,
    one_to_one: bool = False,
) -> np.ndarray:
    """Best Pearson correlation of each true template (K, D, D) with the class averages (M, D, D).

    The model's canonical frame is arbitrary, so each average is searched over n_angles in-plane
    rotations (n_angles=1: no search) and integer shifts up to max_shift_px (circular); no mirror.
    one_to_one: match averages to templates with the Hungarian algorithm instead of a free maximum
    (templates left without an average get NaN). Returns (K,) correlations.
    """
    averages = np.asarray(averages, dtype=np.float32)
    templates = np.asarray(templates, dtype=np.float32)
    if averages.ndim != 3 or templates.ndim != 3 or averages.shape[1:] != templates.shape[1:]:
        raise ValueError(f"need (M, D, D) and (K, D, D), got {averages.shape} {templates.shape}")
    cc = np.stack([_best_cc_over_poses(a, templates, n_angles, max_shift_px) for a in averages])
    cc = cc.T.astype(np.float64)  # (K, M)
    if not one_to_one:
        return cc.max(1)
    rows, cols = linear_sum_assignment(-cc)
    out = np.full(len(templates), np.nan)
    out[rows] = cc[rows, cols]
    return out


def _best_cc_over_poses(
    average: np.ndarray, templates: np.ndarray, n_angles: int, max_shift: int
) -> np.ndarray:
    """(K,) best correlation of one average (D, D) with each template over rotations and shifts."""
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * np.pi / n_angles)
    img = torch.from_numpy(average)[None].expand(n_angles, -1, -1)
    rotated = transform_images(img, angles, torch.zeros(n_angles, 2)).numpy()  # (A, D, D)
    r = _standardise(rotated)[:, None]  # (A, 1, D, D)
    t = _standardise(templates)[None]  # (1, K, D, D)
    # circular cross-correlation over all shifts, (A, K, D, D); entry [dy, dx] = shift of r
    xc = np.fft.ifft2(np.fft.fft2(t) * np.conj(np.fft.fft2(r))).real / average.size
    d = average.shape[-1]
    near = np.r_[0 : max_shift + 1, d - max_shift : d] if max_shift > 0 else np.array([0])
    return xc[:, :, near][:, :, :, near].max(axis=(0, 2, 3))


def _standardise(x: np.ndarray) -> np.ndarray:
    """Each image (last two axes) to zero mean and unit standard deviation (flat images -> 0)."""
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    sd = x.std(axis=(-2, -1), keepdims=True)
    return np.divide(x, sd, out=np.zeros_like(x), where=sd > 0)


def relion_align(img: np.ndarray, psi_deg: float, ox_px: float, oy_px: float) -> np.ndarray:
    """RELION's alignment of one particle (D, D): shift by +origin (pixels), then rotate by +psi.

    The oracle of DESIGN.md section 3, independent of geometry.py, for tests of the pose export.
    """
    c = img.shape[-1] // 2
    a = np.deg2rad(psi_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])  # acts on (x, y)
    m = rot.T[::-1, ::-1]  # inverse, in (row, col)
    off = np.array([c, c]) - m @ np.array([c, c]) - np.array([oy_px, ox_px])
    return scipy.ndimage.affine_transform(img, m, offset=off, order=1)
