"""Classes from latent vectors: k-means (k-means++ seeding, restarts) and class numbering.

Production code (embed, generate) and the validation metrics use the same k-means.
"""

from __future__ import annotations

import numpy as np


def kmeans(
    x: np.ndarray, k: int, n_init: int = 20, seed: int = 0, max_iter: int = 300
) -> np.ndarray:
    """Cluster labels (n,) of the best of n_init k-means runs (k-means++ seeding, Lloyd updates).

    "Best" is the lowest within-cluster sum of squares, as the paper's protocol (many restarts).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}], got {k}")
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        labels, inertia = _lloyd(x, _kmeans_pp(x, k, rng), max_iter)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances between rows of x (n, d) and c (k, d)."""
    d = (x**2).sum(1)[:, None] - 2.0 * x @ c.T + (c**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    centres = [x[rng.integers(len(x))]]
    d2 = _sq_dist(x, centres[0][None])[:, 0]  # (n,)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, _sq_dist(x, x[i][None])[:, 0])
    return np.stack(centres)


def _lloyd(x: np.ndarray, centres: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    """Lloyd iterations from the given centres (k, d); returns labels (n,) and the inertia."""
    labels = None
    for _ in range(max_iter):
        d = _sq_dist(x, centres)
        new = d.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(centres)):
            members = x[labels == j]
            if len(members):  # an emptied cluster keeps its old centre
                centres[j] = members.mean(0)
    d = _sq_dist(x, centres)
    labels = d.argmin(1)
    return labels, float(d[np.arange(len(x)), labels].sum())


def assign_classes(z: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """1-based k-means classes (n,) in z space, numbered by decreasing size (class 1 largest)."""
    return number_by_size(kmeans(z, k, n_init=10, seed=seed), k)


def size_order(labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) the 0-based label that becomes class 1, 2, ..., k in `number_by_size`: per-class
    columns (n, k) indexed by it, ``values[:, size_order(labels, k)]``, follow that numbering."""
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    return np.argsort(-sizes, kind="stable")


def number_by_size(labels: np.ndarray, k: int) -> np.ndarray:
    """0-based classes (n,) renumbered 1..k by decreasing size (class 1 largest; ties by label)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = size_order(labels, k)  # old label of new class 1, 2, ...
    new_of_old = np.empty(k, np.int64)
    new_of_old[order] = np.arange(1, k + 1)
    return new_of_old[labels]


def soft_classes(
    z_mu: np.ndarray, z_sd: np.ndarray, labels: np.ndarray, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Soft reading of 1-based classes `labels` (n,) of latent means z_mu (n, d): for each particle
    the probability of its own class and the effective number of classes 1 / sum_k p_k^2.

    p_k is the responsibility of class k in an equal-weight mixture of isotropic Gaussians at the
    class means, with the pooled within-class variance s^2, each particle's z uncertain by its
    posterior sd: p_k ~ exp(-|z - c_k|^2 / (2 (s^2 + mean(z_sd^2)))). The most probable class is
    the nearest mean, i.e. the k-means class.
    """
    z = np.asarray(z_mu, dtype=np.float64).reshape(len(labels), -1)
    labels = np.asarray(labels, dtype=np.int64) - 1
    k, d = int(labels.max()) + 1, z.shape[1]
    centres = np.stack(
        [z[labels == j].mean(0) if (labels == j).any() else z.mean(0) for j in range(k)]
    )
    s2 = float(((z - centres[labels]) ** 2).sum()) / (len(z) * d)
    var = s2 + (np.asarray(z_sd, dtype=np.float64).reshape(len(z), -1) ** 2).mean(1)
    var = np.maximum(var, 1e-12)
    own, ess = np.empty(len(z)), np.empty(len(z))
    for start in range(0, len(z), chunk):
        part = slice(start, start + chunk)
        logits = -_sq_dist(z[part], centres) / (2 * var[part, None])  # (B, k)
        own[part], ess[part] = class_probabilities(logits, labels[part] + 1)
    return own, ess


def class_probabilities(log_post: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From log class probabilities (n, k) (up to a constant per row; -inf: impossible) and the
    1-based classes `labels` (n,): each particle's probability of its own class and the effective
    number of classes 1 / sum_k p_k^2 (1: certain; 2: split evenly between two), cryoSPARC's
    class_posterior and class_ess."""
    logits = np.asarray(log_post, dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    own = p[np.arange(len(p)), np.asarray(labels, dtype=np.int64) - 1]
    return own, 1.0 / (p**2).sum(1)
