"""Pose search in training and z from the aligned particle (`train --pose-search-from`,
`--z-source aligned`): the encoder's NLL of a pose by hand, z that ignores the pose it is given,
searched poses recovered from an offset start, and the training wiring."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_particle_set

from tvae_em.fourier import phase_flip, shift_images
from tvae_em.geometry import transform_images
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.model.aligned import AlignedLatent
from tvae_em.model.posterior import CellPosterior, pose_nll
from tvae_em.model.refine import rotated_templates
from tvae_em.synthetic import glyphs, render_glyph
from tvae_em.training import TrainOptions, train


def test_pose_nll_by_hand():
    n, side = 4, 3  # 4 bins, 3 x 3 window: cell m = r * 9 + i * 3 + j, t = (j - 1, i - 1)
    m = n * side * side
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, m, generator=g)
    theta_mu = 0.1 * torch.randn(2, m, generator=g)
    theta_logsd = -1.0 + 0.2 * torch.randn(2, m, generator=g)
    post = CellPosterior(logits, torch.log_softmax(logits, 1), theta_mu, theta_logsd,
                         torch.zeros(2, 1, m), torch.zeros(2, 1, m))  # fmt: skip
    # particle 0: bin 1 (pi/2) + 0.2 rad, shift (x, y) = (1.2, -0.7) -> cell i = 0, j = 2
    # particle 1: angle -0.1 rad -> bin 0, offset -0.1; shift (5, 0) is clamped to j = 2, i = 1
    theta = torch.tensor([math.pi / 2 + 0.2, -0.1])
    t = torch.tensor([[1.2, -0.7], [5.0, 0.0]])
    cells, offsets = [1 * 9 + 0 * 3 + 2, 0 * 9 + 1 * 3 + 2], [0.2, -0.1]
    got = pose_nll(post, theta, t, n, side)
    for b, (c, o) in enumerate(zip(cells, offsets, strict=True)):
        sd = math.exp(theta_logsd[b, c])
        hand = -post.log_q[b, c] + 0.5 * ((o - theta_mu[b, c]) / sd) ** 2 + math.log(sd)
        hand += 0.5 * math.log(2 * math.pi)
        assert got[b].item() == pytest.approx(hand.item(), abs=1e-5)


def test_aligned_latent_undoes_the_pose_and_flips_the_phases():
    box, z_dim = 32, 3
    enc = AlignedLatent(box, z_dim)
    glyph = torch.from_numpy(render_glyph("F", box, height=0.5))[None]  # (1, D, D)
    k2 = torch.fft.fftfreq(box)[:, None] ** 2 + torch.fft.fftfreq(box)[None, :] ** 2
    blur = torch.exp(-2 * math.pi**2 * k2)  # a 1 px Gaussian: what bilinear turns resolve
    template = torch.fft.ifft2(torch.fft.fft2(glyph) * blur).real
    theta = torch.tensor([0.7])
    t = torch.tensor([[2.0, -1.5]])
    posed = shift_images(transform_images(template, theta, torch.zeros(1, 2)), t)
    with torch.no_grad():  # z_1 = <template, aligned>, z_2 = <template turned 90 deg, aligned>
        enc.linear.weight.zero_()
        enc.linear.bias.zero_()
        enc.linear.weight[0] = template.flatten() / template.norm() ** 2
        enc.linear.weight[1] = template[0].rot90(1).flatten() / template.norm() ** 2
    mu0, _ = enc(template, torch.zeros(1), torch.zeros(1, 2), None)
    mu, _ = enc(posed, theta, t, None)
    wrong = enc(posed, torch.zeros(1), torch.zeros(1, 2), None)[0]  # the pose not undone
    assert mu0[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    # the same z for the particle at its pose as for the template at pose 0 (interpolation aside)
    torch.testing.assert_close(mu, mu0, atol=0.05, rtol=0)
    assert wrong[0, 0] < mu[0, 0] - 0.2  # a pose not undone reads another z
    # with a CTF, z reads the phase-flipped particle
    ctf = torch.cos(torch.linspace(0, 9, box * box)).reshape(1, box, box)
    ctf = 0.5 * (ctf + ctf.flip(-1).flip(-2).roll((1, 1), (-2, -1)))  # Hermitian
    flipped = enc(phase_flip(template, ctf), torch.zeros(1), torch.zeros(1, 2), None)[0]
    torch.testing.assert_close(enc(template, torch.zeros(1), torch.zeros(1, 2), ctf)[0], flipped)


def _glyph_search(monkeypatch, seed: int, dtheta: float, dt: float):
    """A model whose template is the glyph F, 16 particles of it at random poses, and an encoder
    read-out dtheta rad and dt px off: (model, particles, true angles, true shifts, start)."""
    from tvae_em.model import vae

    box, n = 32, 16
    model = TargetVAE(ModelConfig(box=box, renderer="fourier", z_dim=2))
    rng = np.random.default_rng(seed)
    theta = torch.from_numpy(rng.uniform(-math.pi, math.pi, n)).float()
    t = torch.from_numpy(rng.uniform(-2.0, 2.0, (n, 2))).float()
    fine = torch.from_numpy(render_glyph("F", 2 * box, height=0.5))[None]
    y = shift_images(rotated_templates(fine, theta[:, None], box)[:, 0], t)
    start = {"theta": theta + dtheta, "t": t + dt, "z_mu": torch.zeros(n, 2)}
    monkeypatch.setattr(vae, "read_out", lambda post, n_, side: start)
    monkeypatch.setattr(model, "render", lambda z, th, tt, size: fine.expand(len(z), -1, -1))
    return model, y, theta, t, start


def _angle_error_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg((a - b + math.pi) % (2 * math.pi) - math.pi).abs()


def test_searched_poses_recover_the_pose_from_an_offset_start(monkeypatch):
    # the model's template is a glyph; the encoder's read-out is 9 deg and 2 px off: the search
    # must find each particle's angle and shift
    model, y, theta, t, _ = _glyph_search(monkeypatch, 3, math.radians(9.0), 2.0)
    got_theta, got_t = model.searched_poses(y, None, None)
    assert _angle_error_deg(got_theta, theta).max() < 1.0
    assert (got_t - t).norm(dim=1).max() < 0.3
    assert not got_theta.requires_grad


def test_the_training_search_undoes_a_half_turn_of_the_encoder(monkeypatch):
    # the training search has no global pass, but it also searches around the half-turned angle:
    # an encoder that flipped a particle by 180 deg (+ 6 deg) gets the right pose back
    from tvae_em.model.refine import RefineConfig, refine_poses

    model, y, theta, t, start = _glyph_search(monkeypatch, 4, math.pi + math.radians(6.0), 0.0)
    got, _ = model.searched_poses(y, None, None)
    assert _angle_error_deg(got, theta).max() < 1.0
    fine = model.render(start["z_mu"], None, None, 64)[:1]  # the glyph template (1, 2D, 2D)
    local = RefineConfig(global_step_deg=0.0, local_span_deg=15.0, local_step_deg=1.5)
    kept, _, _ = refine_poses(lambda z: fine, y, start["z_mu"], start["theta"], None, 1.6, 1, local)
    assert _angle_error_deg(kept, theta).min() > 150  # without the half-turn window flips stay


def test_training_searches_poses_from_the_epoch_asked(tmp_path):
    images, _ = glyphs(32, box=16, seed=2, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(tmp_path / "data", images, apix=2.0)
    opts = TrainOptions(
        input=str(star), out_dir=str(tmp_path / "run"), epochs=2, batch_size=16, seed=0,
        z_source="aligned", pose_search_from=2, model_overrides=dict(TINY_MODEL),
    )  # fmt: skip
    train(opts, log=lambda m: None)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert float(rows[0]["pose_nll"]) == 0.0  # epoch 1: the encoder's poses
    assert float(rows[1]["pose_nll"]) > 0.0  # epoch 2: searched poses, the encoder learns them
    cfg = (tmp_path / "run" / "config.json").read_text()
    assert '"z_source": "aligned"' in cfg and '"pose_search_from": 2' in cfg


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_pose_search_epoch_must_be_a_whole_number(tmp_path, bad):
    from tvae_em.errors import UserError

    opts = TrainOptions(input="x.star", out_dir=str(tmp_path / "r"), pose_search_from=bad)
    with pytest.raises(UserError, match="--pose-search-from"):
        opts.check()


def test_defaults_follow_the_likelihood():
    from tvae_em.training.options import pose_search_epoch, z_source

    opts = TrainOptions(input="x.star", out_dir="r")
    assert (z_source(opts, "gaussian"), pose_search_epoch(opts, "gaussian")) == ("aligned", 2)
    assert (z_source(opts, "bernoulli"), pose_search_epoch(opts, "bernoulli")) == ("cells", 0)
    chosen = TrainOptions(input="x.star", out_dir="r", z_source="cells", pose_search_from=0)
    assert (z_source(chosen, "gaussian"), pose_search_epoch(chosen, "gaussian")) == ("cells", 0)


def test_a_run_saved_before_the_pose_search_resumes_without_it(tmp_path):
    import json

    from tvae_em.run import RunFolder

    images, _ = glyphs(16, box=16, seed=2, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(tmp_path / "data", images, apix=2.0)
    opts = TrainOptions(
        input=str(star), out_dir=str(tmp_path / "run"), epochs=1, batch_size=16, seed=0,
        model_overrides=dict(TINY_MODEL),
    )  # fmt: skip
    train(opts, log=lambda m: None)
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("z_source", "pose_search_from"):  # as a run of the previous version saved it
        config["options"].pop(key)
    config_path.write_text(json.dumps(config))
    saved = RunFolder(tmp_path / "run").saved_options()
    assert saved["z_source"] == "cells" and saved["pose_search_from"] == 0


def test_turn_change_is_zero_for_a_round_object_and_enters_the_penalty():
    box = 32
    enc = AlignedLatent(box, 2)
    r2 = (torch.arange(box) - box // 2).float() ** 2
    blob = torch.exp(-(r2[:, None] + r2[None, :]) / (2 * 3.0**2))[None]  # round: turns leave it
    glyph = torch.from_numpy(render_glyph("F", box, height=0.5))[None]
    zero, t0 = torch.zeros(1), torch.zeros(1, 2)
    torch.manual_seed(0)
    for image, round_ in ((blob, True), (glyph, False)):
        mu, _ = enc(image, zero, t0, None)
        change = enc.turn_change(image, zero, t0, None, mu, max_deg=5.0)
        scale = (mu**2).sum()
        assert (change < 1e-3 * scale) if round_ else (change > 1e-3 * scale), (round_, change)
    # the weighted change is part of the training penalty (metrics.csv `consistency`) once the
    # poses are searched (what it keeps z from correcting); not before, not in eval
    model = TargetVAE(ModelConfig(box=box, renderer="fourier", z_source="aligned"))
    y = torch.randn(3, box, box)
    assert (model.train()(y, search=True)["consistency"] > 0).all()
    assert (model.train()(y)["consistency"] == 0).all()
    assert (model.eval()(y, search=True)["consistency"] == 0).all()
    off = TargetVAE(ModelConfig(box=box, renderer="fourier", z_source="aligned", z_turn_penalty=0))
    assert (off.train()(y, search=True)["consistency"] == 0).all()
