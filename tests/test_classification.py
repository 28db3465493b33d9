"""Template classification at read-out: removal costs, the split cut, and split-and-merge EM
recovering a class that EM alone leaves lost (two views in one class, one view in two)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_particle_set

from tvae_em.classification import TemplateEM, removal_costs, split_labels
from tvae_em.data import BatchDataset, Normalisation, epoch_batches, make_loader
from tvae_em.inference import TemplateClasses
from tvae_em.io import ParticleStack
from tvae_em.metrics import clustering_accuracy
from tvae_em.synthetic import glyphs

N, BOX, K = 180, 24, 3


def test_removal_cost_is_the_loss_of_moving_a_class_to_its_next_best():
    log_post = np.log(
        np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    )
    labels = np.array([0, 0, 1, 2])
    cost = removal_costs(log_post, labels, 3)
    hand = [
        np.log(0.7 / 0.2) + np.log(0.6 / 0.3),
        np.log(0.8 / 0.1),
        np.log(0.6 / 0.2),
    ]
    np.testing.assert_allclose(cost, hand)
    # an empty class costs nothing to remove
    np.testing.assert_allclose(removal_costs(log_post, np.zeros(4, int), 3)[1:], 0.0)


def test_split_cut_separates_two_views_in_one_class():
    rng = np.random.default_rng(0)
    _, truth = glyphs(2, box=BOX, n_classes=2)
    side = rng.integers(0, 2, 300)
    aligned = truth["templates"][side] + rng.normal(0, 1.0, (300, BOX, BOX))  # SNR about 0.1
    got = split_labels(aligned, seed=0)
    assert clustering_accuracy(side, got) == 1.0


@pytest.fixture(scope="module")
def stuck(tmp_path_factory):
    """Glyphs F, L, P with known poses, and a start with F and L in one class and P in two."""
    images, truth = glyphs(N, box=BOX, seed=4, n_classes=K, t_sd_px=1.0)
    rng = np.random.default_rng(1)
    images = images + rng.normal(0, 1.5 * images.std(), images.shape).astype(np.float32)
    star = write_particle_set(tmp_path_factory.mktemp("em"), images, 2.0)
    stack = ParticleStack.open(str(star))
    norm = Normalisation(float(images.mean()), float(images.std()))
    loader = make_loader(BatchDataset(stack, norm), epoch_batches(N, 32, 0, 0, False), 0)
    label = truth["label"]
    start = np.where(label == 1, 0, label)  # F and L merged
    p = np.flatnonzero(label == 2)
    start[p[: len(p) // 2]] = 1  # P split in two classes
    log_post = np.log(np.full((N, K), 1.0 / K))
    found = TemplateClasses(start, truth["theta"], truth["t"], log_post, np.zeros(N))
    model = SimpleNamespace(cfg=SimpleNamespace(t_sd_px=1.0), likelihood=SimpleNamespace(sd=1.0))
    em = TemplateEM(model, loader, stack, norm, K, torch.device("cpu"))
    return em, found, label


def test_em_alone_stays_in_the_lost_class_optimum(stuck):
    em, found, label = stuck
    result = em.run(found, rounds=2, moves=0)
    assert result.moves == []
    assert clustering_accuracy(label, result.found.labels) < 0.85  # 79% here


def test_split_and_merge_recovers_the_lost_class(stuck):
    em, found, label = stuck
    result = em.run(found, rounds=2, moves=3)
    assert result.moves and result.moves[0].accepted and result.moves[0].gain > 0
    assert clustering_accuracy(label, result.found.labels) >= 0.97  # 99.4% here
    if len(result.moves) > 1:  # nothing left to gain: the next move is refused, and EM stops
        assert not result.moves[-1].accepted
    # the kept E-step is the last one: its templates are the returned averages
    assert result.averages.shape == (K, BOX, BOX)
