"""Template 2D classification at read-out: EM over class templates, with split-and-merge moves.

`embed --classes K` classifies as a 2D classification program does. The E-step aligns every
particle to every class template with its CTF (`inference.classify_with_templates`); the M-step
makes each class's aligned, phase-flipped average its new template (`class2d.class_averages`).
EM from a poor start can settle with two views in one class and one view in two (or an empty
class): a local optimum that more rounds do not leave. A split-and-merge move (Ueda et al., SMEM,
Neural Computation 2000) leaves it at a fixed K: the class that costs least to remove is
re-seeded with half of the class whose split explains most (a 2-means cut of its aligned images'
leading principal components), and the move is kept only when the E-step's summed
log-likelihood rises. docs/model.md ("Read-out") has the evidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .class2d import aligned_batches, class_averages
from .clustering import kmeans
from .data import Normalisation
from .fourier import fourier_pad
from .inference import TemplateClasses, classify_with_templates
from .model.refine import RefineConfig
from .progress import ProgressFactory, no_progress

# A class is split only when it has this many particles (each half gets a usable average).
MIN_SPLIT = 20
# Particles per class whose aligned images give the principal components of a candidate split.
PCA_SAMPLE = 1000
# Classes (the largest) considered for a split at each move.
SPLIT_CANDIDATES = 3


@dataclass
class SplitMove:
    """One tried move: class `split` (0-based) cut in two, its second half re-seeding `removed`;
    `gain` is the change of the summed log-likelihood (nats); kept when `accepted`."""

    split: int
    removed: int
    gain: float
    accepted: bool


@dataclass
class Classification:
    """The final E-step, the templates it aligned to ((K, D, D) averages; None when the model's
    own templates were the last), and the split-and-merge moves tried."""

    found: TemplateClasses
    averages: np.ndarray | None
    moves: list[SplitMove] = field(default_factory=list)


def removal_costs(log_post: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) nats lost if each class were removed and its particles went to their next-best class:
    sum over its members i of log p(c | y_i) - max_{c' != c} log p(c' | y_i). An empty class, or a
    duplicate of another, costs almost nothing."""
    cost = np.zeros(k)
    for c in range(k):
        members = labels == c
        if members.any():
            rest = np.delete(log_post[members], c, axis=1)
            cost[c] = float((log_post[members, c] - rest.max(1)).sum()) if rest.size else np.inf
    return cost


@dataclass
class _Cut:
    """A 2-means cut of aligned images in their leading principal components."""

    mean: np.ndarray  # (P,) pixels
    basis: np.ndarray  # (P, C) components
    centres: np.ndarray  # (2, C) the two halves' centres in component scores
    gain: float  # between-halves sum of squares per image: the split's strength


def _cut(aligned: np.ndarray, seed: int, components: int = 2) -> _Cut:
    """The cut of aligned images (m, D, D) in their first `components` principal components."""
    x = aligned.reshape(len(aligned), -1).astype(np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:components].T  # (P, C)
    scores = (x - mean) @ basis
    labels = kmeans(scores, 2, seed=seed)
    centres = np.stack([scores[labels == h].mean(0) for h in (0, 1)])
    frac = np.bincount(labels, minlength=2) / len(labels)
    gain = float(frac[0] * frac[1] * ((centres[0] - centres[1]) ** 2).sum())
    return _Cut(mean, basis, centres, gain)


def split_labels(aligned: np.ndarray, seed: int = 0) -> np.ndarray:
    """(m,) 0/1: the halves of the 2-means cut of aligned images (m, D, D) in their first two
    principal components; the cut a split-and-merge move re-seeds a class with."""
    cut = _cut(aligned, seed)
    return _side(cut, aligned)


def _side(cut: _Cut, aligned: np.ndarray) -> np.ndarray:
    """(m,) the half of `cut` nearest to each aligned image (m, D, D)."""
    scores = (aligned.reshape(len(aligned), -1).astype(np.float64) - cut.mean) @ cut.basis
    d = ((scores[:, None, :] - cut.centres[None]) ** 2).sum(-1)  # (m, 2)
    return d.argmin(1)


class TemplateEM:
    """EM rounds and split-and-merge moves over class templates for one particle stack.

    `e_step(averages, label)` aligns every particle to the templates (K, D, D); the M-step is
    `class_averages` of the particles aligned with their poses."""

    def __init__(
        self,
        model: torch.nn.Module,
        loader,
        stack,
        norm: Normalisation,
        k: int,
        device: torch.device,
        ctf_for: Callable[[np.ndarray], torch.Tensor] | None = None,
        seed: int = 0,
        progress: ProgressFactory = no_progress,
    ):
        self.model, self.loader, self.stack, self.norm = model, loader, stack, norm
        self.k, self.device, self.ctf_for, self.seed = k, device, ctf_for, seed
        self.progress = progress
        self.seconds = 0.0  # spent in E-steps (the particle-rate figure of embed)

    def e_step(self, averages: np.ndarray, label: str) -> TemplateClasses:
        """Every particle aligned to every template (K, D, D) and assigned to its best class."""
        n = len(self.stack)
        with self.progress(n, label) as advance:
            t0 = time.perf_counter()
            fine = fourier_pad(averages, 2 * self.stack.box)  # (K, 2D, 2D)
            found = classify_with_templates(
                self.model, self.loader, n, None, self.device, self.ctf_for, RefineConfig(),
                advance, images=fine,
            )  # fmt: skip
            self.seconds += time.perf_counter() - t0
        return found

    def m_step(self, found: TemplateClasses) -> np.ndarray:
        """(K, D, D) the aligned, phase-flipped class averages of an E-step's assignment."""
        averages, _ = class_averages(
            self.stack, self.norm, found.theta, found.t, found.labels, self.k,
            flip_for=self.ctf_for,
        )  # fmt: skip
        return averages

    def run(self, found: TemplateClasses, rounds: int, moves: int) -> Classification:
        """`rounds` M/E rounds from the E-step `found`, then up to `moves` split-and-merge moves
        (stopping at the first that does not raise the summed log-likelihood)."""
        averages = None
        for r in range(rounds):
            averages = self.m_step(found)
            found = self.e_step(averages, f"classify, round {r + 2}")
        result = Classification(found, averages)
        if self.k < 2:
            return result
        for m in range(moves):
            if result.averages is None:
                result.averages = self.m_step(result.found)
                result.found = self.e_step(result.averages, "classify, templates")
            tried = self._try_move(result, m + 1)
            if tried is None:
                break
            move, found = tried
            result.moves.append(move)
            if not move.accepted:
                break
            result.averages = self.m_step(found)
            result.found = self.e_step(result.averages, f"classify, after split {m + 1}")
        return result

    def _try_move(self, current: Classification, number: int):
        """The best split-and-merge move from `current` and its E-step, or None when no class
        is large enough to split."""
        found, averages = current.found, current.averages
        counts = np.bincount(found.labels, minlength=self.k)
        removed = int(np.argmin(removal_costs(found.log_post, found.labels, self.k)))
        candidates = [
            c for c in np.argsort(-counts, kind="stable")
            if c != removed and counts[c] >= MIN_SPLIT
        ][:SPLIT_CANDIDATES]  # fmt: skip
        if not candidates:
            return None
        rng = np.random.default_rng(self.seed + number)
        cuts = {}
        for c in candidates:
            members = np.flatnonzero(found.labels == c)
            sample = np.sort(rng.choice(members, min(PCA_SAMPLE, len(members)), replace=False))
            cuts[c] = _cut(self._aligned(found, sample), self.seed)
        split = max(candidates, key=lambda c: cuts[c].gain * counts[c])
        halves = np.zeros((2, *averages.shape[1:]), np.float64)
        sizes = np.zeros(2)
        members = np.flatnonzero(found.labels == split)
        for _, aligned in aligned_batches(
            self.stack, self.norm, found.theta, found.t, members, flip_for=self.ctf_for
        ):
            a = aligned.double().numpy()
            side = _side(cuts[split], a)
            for h in (0, 1):
                halves[h] += a[side == h].sum(0)
                sizes[h] += (side == h).sum()
        if sizes.min() == 0:
            return None
        trial = averages.copy()
        trial[split], trial[removed] = halves / sizes[:, None, None]
        tried = self.e_step(trial, f"classify, split {number}")
        gain = tried.total() - found.total()
        return SplitMove(int(split), removed, gain, gain > 0), tried

    def _aligned(self, found: TemplateClasses, indices: np.ndarray) -> np.ndarray:
        """(m, D, D) the particles `indices` aligned with their poses and phase-flipped."""
        parts = [
            a.numpy()
            for _, a in aligned_batches(
                self.stack, self.norm, found.theta, found.t, indices, flip_for=self.ctf_for
            )
        ]
        return np.concatenate(parts)
