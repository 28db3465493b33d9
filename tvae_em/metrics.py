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


# ---------------------------------------------------------------------------------------------
# Distinct views: no two classes may be one image under an in-plane rotation, shift or mirror


def pairwise_view_correlation(
    templates: np.ndarray,
    n_angles: int = 360,
    max_shift_px: int | None = None,
    mirror: bool = True,
    mask_radius: float = 0.75,
) -> np.ndarray:
    """(K, K) best normalised cross-correlation of each pair of images (K, D, D) over n_angles
    in-plane rotations of the second, shifts up to max_shift_px (default D//4) and its mirror
    (x -> -x), computed inside a disc of mask_radius * D/2 about the first one's centre (the
    empty background would make any two round objects alike); the diagonal is 1. Symmetric:
    the larger of the two directions."""
    templates = np.asarray(templates, dtype=np.float64)
    k, d = len(templates), templates.shape[-1]
    shift = d // 4 if max_shift_px is None else max_shift_px
    cc = np.eye(k)
    for j in range(k):
        variants = [templates[j], templates[j][:, ::-1]] if mirror else [templates[j]]
        for v in variants:
            best = _masked_ncc_over_poses(v, templates, n_angles, shift, mask_radius)
            cc[:, j] = np.maximum(cc[:, j], np.where(np.arange(k) == j, 1.0, best))
    return np.maximum(cc, cc.T)


def _masked_ncc_over_poses(
    image: np.ndarray, templates: np.ndarray, n_angles: int, max_shift: int, mask_radius: float
) -> np.ndarray:
    """(K,) best masked normalised cross-correlation of image (D, D), rotated and shifted, with
    each template over the template's centred disc (the mean and variance of the moving image are
    taken over the disc at each shift, by FFT; Padfield's masked NCC)."""
    d = image.shape[-1]
    r = np.arange(d) - d // 2
    m = (np.hypot(r[:, None], r[None, :]) <= mask_radius * d / 2).astype(np.float64)
    n = m.sum()
    angles = torch.arange(n_angles, dtype=torch.float64) * (2 * np.pi / n_angles)
    img = torch.from_numpy(np.ascontiguousarray(image, np.float64))[None].expand(n_angles, -1, -1)
    moving = transform_images(img, angles, torch.zeros(n_angles, 2, dtype=torch.float64)).numpy()
    t = m * (templates - (templates * m).sum((-2, -1), keepdims=True) / n)  # (K, D, D)
    t /= np.sqrt((t**2).sum((-2, -1), keepdims=True))
    fm = np.fft.fft2(moving)  # (A, D, D); entry [dy, dx] below: moving shifted by (dy, dx)
    num = np.fft.ifft2(np.fft.fft2(t)[None] * np.conj(fm)[:, None]).real  # (A, K, D, D)
    fmask = np.fft.fft2(m)
    s1 = np.fft.ifft2(fmask * np.conj(fm)).real  # (A, D, D): sum over the disc of moving
    s2 = np.fft.ifft2(fmask * np.conj(np.fft.fft2(moving**2))).real
    var = np.maximum(s2 - s1**2 / n, 1e-12 * n)
    ncc = num / np.sqrt(var)[:, None]
    near = np.r_[0 : max_shift + 1, d - max_shift : d] if max_shift > 0 else np.array([0])
    return ncc[:, :, near][:, :, :, near].max(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# Per-particle pose errors against the truth, in the project's pose convention (geometry.py):
# particle = T(t) R(theta) template. A method's class template may sit in its own frame, turned by
# a constant and shifted by a constant per class; these scores remove one such offset per TRUE
# class (so a method that splits or merges classes is not excused).


def angle_errors(pred_rad: np.ndarray, true_rad: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|predicted - true| in-plane angle (n,) in degrees, in [0, 180], after removing one offset
    per true class (the circular mean of the differences within the class)."""
    pred, true = _paired(pred_rad, true_rad)
    labels = np.asarray(labels).ravel()
    diff = pred - true
    out = np.empty_like(diff)
    for c in np.unique(labels):
        sel = labels == c
        d = diff[sel] - _circular_mean(diff[sel])
        out[sel] = np.abs(np.angle(np.exp(1j * d)))
    return np.degrees(out)


def angle_error_summary(errors_deg: np.ndarray) -> dict[str, float]:
    """Median error and the fractions within 3 and 10 degrees and beyond 150 (half-turn flips)."""
    e = np.asarray(errors_deg, dtype=np.float64)
    return {
        "angle_err_median_deg": float(np.median(e)),
        "angle_within_3": float(np.mean(e <= 3.0)),
        "angle_within_10": float(np.mean(e <= 10.0)),
        "angle_beyond_150": float(np.mean(e > 150.0)),
    }


def recentred_shift_errors(
    pred_t: np.ndarray, true_t: np.ndarray, pred_theta: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shift error (n,) in pixels after re-centring each true class's template frame, and the
    fitted frame offsets (K, 2).

    A method whose template for class k is the true one shifted by c_k (and turned) predicts
    t_pred = t_true + R(theta_pred) d_k with d_k = -c_k: the offset is constant in the TEMPLATE's
    frame, so it turns with the particle. d_k is fitted by least squares per true class (the mean of
    R(theta_pred)^T (t_pred - t_true)); the error is the length of what remains.
    """
    pred_t, true_t = np.asarray(pred_t, np.float64), np.asarray(true_t, np.float64)
    theta = np.asarray(pred_theta, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if pred_t.shape != true_t.shape or pred_t.shape != (len(theta), 2):
        raise ValueError(f"shifts must both be (n, 2), got {pred_t.shape} and {true_t.shape}")
    c, s = np.cos(theta), np.sin(theta)
    r = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (n, 2, 2) on (x, y)
    resid = pred_t - true_t
    in_frame = np.einsum("nji,nj->ni", r, resid)  # R^T resid
    classes = np.unique(labels)
    offsets = np.zeros((len(classes), 2))
    err = np.empty(len(theta))
    for i, k in enumerate(classes):
        sel = labels == k
        offsets[i] = in_frame[sel].mean(0)
        err[sel] = np.linalg.norm(resid[sel] - np.einsum("nij,j->ni", r[sel], offsets[i]), axis=1)
    return err, offsets


def shift_error_summary(errors_px: np.ndarray, raw_errors_px: np.ndarray) -> dict[str, float]:
    """Median shift error after re-centring, the fraction within 1 px, and the raw median."""
    e = np.asarray(errors_px, dtype=np.float64)
    return {
        "shift_err_median_px": float(np.median(e)),
        "shift_within_1px": float(np.mean(e <= 1.0)),
        "shift_err_raw_median_px": float(np.median(np.asarray(raw_errors_px, np.float64))),
    }


# ---------------------------------------------------------------------------------------------
# Sharpness of class averages: correlation and Fourier ring correlation with the true template


def frc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of two images (D, D): (D//2,) values for rings 1 .. D//2 pixels
    of radius in Fourier space (ring r: frequency r / (D * apix))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need two square images of one size, got {a.shape} and {b.shape}")
    d = a.shape[0]
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    f = np.fft.fftfreq(d) * d
    ring = np.rint(np.hypot(f[:, None], f[None, :])).astype(int).ravel()
    num = np.bincount(ring, (fa * np.conj(fb)).real.ravel(), minlength=d)
    pa = np.bincount(ring, (np.abs(fa) ** 2).ravel(), minlength=d)
    pb = np.bincount(ring, (np.abs(fb) ** 2).ravel(), minlength=d)
    den = np.sqrt(pa * pb)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return out[1 : d // 2 + 1]


def frc_resolution(a: np.ndarray, b: np.ndarray, apix: float, threshold: float = 0.5) -> float:
    """Resolution (Angstrom) where the FRC of a and b first falls below threshold, linearly
    interpolated between rings; the Nyquist 2 * apix when it never does."""
    curve = frc(a, b)
    d = np.asarray(a).shape[0]
    below = np.flatnonzero(curve < threshold)
    if below.size == 0:
        return 2.0 * apix
    i = int(below[0])
    if i == 0:
        return float(d * apix)  # below the threshold already at the first ring
    f0, f1 = curve[i - 1], curve[i]
    ring = i + (f0 - threshold) / (f0 - f1)  # rings are 1-based: index i-1 is ring i
    return float(d * apix / ring)


def best_alignment(
    image: np.ndarray, template: np.ndarray, n_angles: int = 360, max_shift_px: int = 3
) -> tuple[np.ndarray, float]:
    """image (D, D) rotated and shifted (integer, circular) to best match template: (aligned,
    correlation). Used to put a class average in the template's frame before an FRC."""
    d = image.shape[-1]
    angles = torch.arange(n_angles, dtype=torch.float32) * (2 * np.pi / n_angles)
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    rotated = transform_images(img.expand(n_angles, -1, -1), angles, torch.zeros(n_angles, 2))
    rotated = rotated.numpy()
    r, t = _standardise(rotated), _standardise(np.asarray(template, np.float32))[None]
    xc = np.fft.ifft2(np.fft.fft2(t) * np.conj(np.fft.fft2(r))).real / (d * d)  # (A, D, D)
    near = np.r_[0 : max_shift_px + 1, d - max_shift_px : d] if max_shift_px > 0 else np.r_[0]
    sub = xc[:, near][:, :, near]
    a, iy, ix = np.unravel_index(int(sub.argmax()), sub.shape)
    aligned = np.roll(rotated[a], (int(near[iy]), int(near[ix])), axis=(0, 1))
    return aligned, float(sub[a, iy, ix])


def class_average_sharpness(
    aligned: np.ndarray,
    pred_labels: np.ndarray,
    templates: np.ndarray,
    apix: float,
    n_angles: int = 120,
    max_shift_px: int = 3,
) -> dict[str, object]:
    """Average the pose-aligned noise-free images (n, D, D) per predicted class, match averages
    to the true templates (K, D, D) one-to-one (Hungarian on correlation), and score each match:
    correlation and FRC-0.5 resolution (A). Unmatched templates score correlation 0 and no
    resolution. Returns the means and the per-template lists."""
    aligned = np.asarray(aligned, np.float32)
    labels = np.asarray(pred_labels).ravel()
    classes = np.unique(labels)
    averages = np.stack([aligned[labels == c].mean(0) for c in classes])
    templates = np.asarray(templates, np.float32)
    cc = np.stack([_best_cc_over_poses(a, templates, n_angles, max_shift_px) for a in averages]).T
    rows, cols = linear_sum_assignment(-cc)
    corr = np.zeros(len(templates))
    res = np.full(len(templates), np.nan)
    for k, m in zip(rows, cols, strict=True):
        avg, corr[k] = best_alignment(averages[m], templates[k], n_angles * 3, max_shift_px)
        res[k] = frc_resolution(avg, templates[k], apix)
    return {
        "avg_cc_mean": float(corr.mean()),
        "avg_frc05_median_A": float(np.nanmedian(res)) if np.isfinite(res).any() else float("nan"),
        "avg_cc": corr.tolist(),
        "avg_frc05_A": res.tolist(),
    }


def pose_scores(
    pred_theta: np.ndarray,
    pred_t: np.ndarray,
    pred_labels: np.ndarray,
    true_theta: np.ndarray,
    true_t: np.ndarray,
    true_labels: np.ndarray,
) -> dict[str, object]:
    """Every per-particle score of one method's poses and classes against the truth (angles in
    radians, shifts (n, 2) in pixels of one box, project convention): class accuracy (Hungarian),
    angle errors after one offset per true class, shift errors after re-centring each true class's
    frame (`recentred_shift_errors`), the per-axis shift correlation, and per-class medians."""
    true_labels = np.asarray(true_labels).ravel()
    ang = angle_errors(pred_theta, true_theta, true_labels)
    sh, offsets = recentred_shift_errors(pred_t, true_t, pred_theta, true_labels)
    raw = np.linalg.norm(np.asarray(pred_t, np.float64) - np.asarray(true_t, np.float64), axis=1)
    rx, ry = shift_correlation(pred_t, true_t)
    classes = np.unique(true_labels)
    out: dict[str, object] = {"class_acc": clustering_accuracy(pred_labels, true_labels)}
    out.update(angle_error_summary(ang))
    out.update(shift_error_summary(sh, raw))
    out.update(
        shift_r=float(np.nanmean([rx, ry])),
        angle_err_median_class=[float(np.median(ang[true_labels == c])) for c in classes],
        frame_offset_px_class=np.linalg.norm(offsets, axis=1).tolist(),
    )
    return out


def latent_parameter_correlation(z: np.ndarray, param: np.ndarray) -> dict[str, object]:
    """How well a latent z (n, Z) carries a hidden continuous parameter (n,): the Spearman rank
    correlation of each coordinate with it (best |rho| and its coordinate, 1-based), of the
    first principal component of z, and of the best direction in z (the least-squares fit of the
    parameter's ranks on z: the prior N(0, I) does not fix z's axes, so a motion may lie along
    any direction). The sign of a correlation is arbitrary, so |rho| counts."""
    from scipy.stats import rankdata, spearmanr

    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    rho = np.array([spearmanr(z[:, j], param)[0] for j in range(z.shape[1])])
    rho = np.nan_to_num(rho)
    best = int(np.argmax(np.abs(rho)))
    centred = z - z.mean(0)
    pc1 = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    ranks = rankdata(param)
    direction = np.linalg.lstsq(centred, ranks - ranks.mean(), rcond=None)[0]  # (Z,)
    return {
        "rho_best": float(abs(rho[best])),
        "rho_best_dim": best + 1,
        "rho_pc1": float(abs(np.nan_to_num(spearmanr(pc1, param)[0]))),
        "rho_direction": float(abs(np.nan_to_num(spearmanr(centred @ direction, param)[0]))),
        "rho_dims": np.abs(rho).tolist(),
    }
