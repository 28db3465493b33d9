"""Pose refinement at read-out (tvae_em.model.refine): from the encoder's binned angle (or a half
turn off) to the continuous angle and sub-pixel shift, by the likelihood against the template."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvae_em.ctf import CtfParams, batch_ctf
from tvae_em.fourier import shift_images
from tvae_em.geometry import transform_images, wrap_angle
from tvae_em.model.refine import RefineConfig, refine_poses, rotated_templates
from tvae_em.synthetic import render_glyph

BOX, N = 32, 32


def glyph_render(z, theta, t, size):
    """The 'model': the glyph F (same field of view at any size) at pose (theta, t)."""
    img = torch.from_numpy(render_glyph("F", size, height=0.5))
    img = img[None].expand(len(z), -1, -1).contiguous()
    return transform_images(img, theta.float(), t.float() * size / BOX)


def glyph_template(z):
    """The 'model's' templates at pose 0 on the refinement grid (twice the box)."""
    return glyph_render(z, torch.zeros(len(z)), torch.zeros(len(z), 2), 2 * BOX)


@pytest.fixture(scope="module")
def posed():
    rng = np.random.default_rng(11)
    theta = torch.from_numpy(rng.uniform(-math.pi, math.pi, N)).float()
    t = torch.from_numpy(rng.uniform(-3.0, 3.0, (N, 2))).float()
    # particles rendered finely and sampled, like the refinement's own template
    z = torch.zeros(N, 1)
    fine = glyph_render(z, torch.zeros(N), torch.zeros(N, 2), 2 * BOX)
    images = rotated_templates(fine, theta[:, None], BOX)[:, 0]
    images = shift_images(images, t)  # exact sub-pixel shift
    return {"theta": theta, "t": t, "images": images.float(), "z": z}


def _binned(theta: torch.Tensor, n: int) -> torch.Tensor:
    """The nearest of n bin centres: what the encoder reports when its offset sticks."""
    step = 2 * math.pi / n
    return torch.round(theta / step) * step


def _errors(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.degrees(wrap_angle(a - b).abs().numpy())


def test_refinement_recovers_continuous_angles_and_subpixel_shifts(posed):
    start = _binned(posed["theta"], 8)
    assert np.median(_errors(start, posed["theta"])) > 5  # the binned start is far off
    theta, t, _ = refine_poses(glyph_template, posed["images"], posed["z"], start, None, 3.0)
    err = _errors(theta, posed["theta"])
    assert np.median(err) < 0.5 and np.quantile(err, 0.9) < 1.0 and err.max() < 2.5, err
    shift_err = (t - posed["t"]).norm(dim=1).numpy()
    assert np.median(shift_err) < 0.15 and shift_err.max() < 0.4, shift_err


def test_a_half_turn_is_undone_by_the_global_pass(posed):
    start = wrap_angle(_binned(posed["theta"], 8) + math.pi)
    theta, _, _ = refine_poses(glyph_template, posed["images"], posed["z"], start, None, 3.0)
    assert _errors(theta, posed["theta"]).max() < 1.5
    local = RefineConfig(global_step_deg=0.0)  # without it, the flip stays
    theta, _, _ = refine_poses(
        glyph_template, posed["images"], posed["z"], start, None, 3.0, 1.0, local
    )
    assert np.median(_errors(theta, posed["theta"])) > 150


def test_refinement_uses_each_particles_ctf(posed):
    params = CtfParams(
        dfu_A=np.linspace(8000, 25000, N),
        dfv_A=np.linspace(7000, 24000, N),
        dfang_deg=np.linspace(0, 170, N),
        volt_kv=np.full(N, 300.0),
        cs_mm=np.full(N, 2.7),
        amp_contrast=np.full(N, 0.1),
        phase_shift_deg=np.zeros(N),
        bfactor=np.zeros(N),
    )
    ctf = batch_ctf(params, np.full(N, 3.0), np.arange(N), BOX).float()
    observed = torch.fft.ifft2(torch.fft.fft2(posed["images"]) * ctf).real
    start = _binned(posed["theta"], 8)
    theta, _, _ = refine_poses(glyph_template, observed, posed["z"], start, ctf, 3.0)
    with_ctf = _errors(theta, posed["theta"])
    theta, _, _ = refine_poses(glyph_template, observed, posed["z"], start, None, 3.0)
    assert np.median(with_ctf) < 1.0, with_ctf
    assert np.median(with_ctf) < np.median(_errors(theta, posed["theta"]))


@pytest.mark.parametrize("box", [24, 25])
def test_search_scores_from_spectra_equal_those_of_the_ctf_images(box):
    # the search multiplies the turned templates' real FFTs by the CTF (no FFT round trip) and
    # takes their energies by Parseval: the same scores as the CTF images scored directly
    from tvae_em.fourier import apply_ctf
    from tvae_em.model.refine import _energy, _model_spectra, score_spectra

    n = 3
    gen = torch.Generator().manual_seed(0)
    fine = torch.randn(n, 2 * box, 2 * box, generator=gen)
    y = torch.randn(n, box, box, generator=gen)
    params = CtfParams(
        dfu_A=np.array([8e3, 12e3, 20e3]), dfv_A=np.array([7e3, 11e3, 18e3]),
        dfang_deg=np.array([10.0, 45.0, 80.0]), volt_kv=np.full(n, 300.0),
        cs_mm=np.full(n, 2.7), amp_contrast=np.full(n, 0.1), phase_shift_deg=np.zeros(n),
        bfactor=np.zeros(n),
    )  # fmt: skip
    ctf = batch_ctf(params, np.full(n, 3.0), np.arange(n), box).float()
    angles = torch.rand(n, 4, generator=gen) * 6.3
    prior = torch.zeros(box, box)
    images = rotated_templates(fine, angles, box)
    models = apply_ctf(images.reshape(-1, box, box), ctf.repeat_interleave(4, 0))
    models = models.reshape(n, 4, box, box)
    # by hand: sum_x y(x) m(x - s) - ||m||^2 / 2 at every circular shift s
    direct = torch.zeros(n, 4, box, box)
    for sy in range(box):
        for sx in range(box):
            moved = torch.roll(models, (sy - box // 2, sx - box // 2), dims=(-2, -1))
            direct[..., sy, sx] = (y[:, None] * moved).sum((-2, -1))
    direct -= 0.5 * (models**2).sum((-2, -1), keepdim=True)
    fm = _model_spectra(fine, ctf, angles, box)
    spectral = score_spectra(torch.fft.rfft2(y), fm, _energy(fm, box), prior, 1.0)
    scale = direct.abs().max()
    assert (spectral - direct).abs().max() < 1e-4 * scale


def test_a_template_shared_by_the_batch_gives_the_per_particle_result(posed):
    # one (1, 2D, 2D) template is turned once per angle of the global pass; the poses and
    # scores must be those of the same template given to every particle
    params = CtfParams(
        dfu_A=np.linspace(8000, 25000, N), dfv_A=np.linspace(7000, 24000, N),
        dfang_deg=np.linspace(0, 170, N), volt_kv=np.full(N, 300.0), cs_mm=np.full(N, 2.7),
        amp_contrast=np.full(N, 0.1), phase_shift_deg=np.zeros(N), bfactor=np.zeros(N),
    )  # fmt: skip
    ctf = batch_ctf(params, np.full(N, 3.0), np.arange(N), BOX).float()
    start = torch.zeros(N)

    def shared(z):
        return glyph_template(z[:1])  # (1, 2D, 2D)

    for c in (None, ctf):
        a = refine_poses(glyph_template, posed["images"], posed["z"], start, c, 3.0)
        b = refine_poses(shared, posed["images"], posed["z"], start, c, 3.0)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def _ctf(n: int, box: int, apix: float) -> torch.Tensor:
    params = CtfParams(
        dfu_A=np.linspace(8000, 25000, n), dfv_A=np.linspace(7000, 24000, n),
        dfang_deg=np.linspace(0, 170, n), volt_kv=np.full(n, 300.0), cs_mm=np.full(n, 2.7),
        amp_contrast=np.full(n, 0.1), phase_shift_deg=np.zeros(n), bfactor=np.zeros(n),
    )  # fmt: skip
    return batch_ctf(params, np.full(n, apix), np.arange(n), box).float()


def test_the_coarse_global_pass_finds_the_poses_of_large_boxes():
    # at 64 px the global pass scores copies cropped to 32 px; from half-turned starts, with
    # each particle's CTF and noise, it must still find every angle the full-size pass finds
    box, n = 64, 24
    rng = np.random.default_rng(5)
    theta = torch.from_numpy(rng.uniform(-math.pi, math.pi, n)).float()
    t = torch.from_numpy(rng.uniform(-4.0, 4.0, (n, 2))).float()
    fine = torch.from_numpy(render_glyph("F", 2 * box, height=0.5))[None]  # (1, 2D, 2D)
    clean = shift_images(rotated_templates(fine, theta[:, None], box)[:, 0], t)
    ctf = _ctf(n, box, 1.5)
    observed = torch.fft.ifft2(torch.fft.fft2(clean) * ctf).real
    observed = observed + 0.3 * clean.std() * torch.randn(
        n, box, box, generator=torch.Generator().manual_seed(0)
    )

    def template(z):
        return fine

    start = wrap_angle(_binned(theta, 8) + math.pi)
    z = torch.zeros(n, 1)
    for coarse in (32, None):
        cfg = RefineConfig(coarse_box=coarse)
        got, tt, _ = refine_poses(
            template, observed, z, start, ctf, 4.0, 0.3 * float(clean.std()), cfg
        )
        assert _errors(got, theta).max() < 1.5, (coarse, _errors(got, theta))
        assert (tt - t).norm(dim=1).max() < 0.5


def test_classification_polishes_only_the_winner_and_matches_per_class_refinement(posed):
    # classify_with_templates searches every class, then polishes the winner's pose: the labels,
    # poses and scores must be those of refining against each class and keeping the best
    from tvae_em.inference import classify_with_templates

    class Model:  # what classify_with_templates reads of a model
        cfg = type("cfg", (), {"t_sd_px": 3.0})()
        likelihood = None  # sigma 1

    fine = torch.stack(
        [torch.from_numpy(render_glyph(g, 2 * BOX, height=0.5)) for g in ("F", "P", "T")]
    )  # (K, 2D, 2D)
    ctf = _ctf(N, BOX, 3.0)
    observed = torch.fft.ifft2(torch.fft.fft2(posed["images"]) * ctf).real
    loader = [(torch.arange(N), observed)]
    found = classify_with_templates(
        Model(), loader, N, None, torch.device("cpu"), lambda i: ctf, images=fine.numpy()
    )
    per_class = [
        refine_poses(lambda z, c=c: fine[c][None], observed, posed["z"], torch.zeros(N), ctf, 3.0)
        for c in range(3)
    ]
    values = torch.stack([v for _, _, v in per_class], 1)
    labels = values.argmax(1)
    assert (found.labels == labels.numpy()).all() and (found.labels == 0).all()
    rows = torch.arange(N)
    theta = torch.stack([th for th, _, _ in per_class], 1)[rows, labels]
    t = torch.stack([tt for _, tt, _ in per_class], 1)[rows, labels]
    np.testing.assert_allclose(found.theta, theta.numpy(), atol=1e-4)
    np.testing.assert_allclose(found.t, t.numpy(), atol=1e-4)
    np.testing.assert_allclose(found.score, values.max(1).values.numpy(), rtol=1e-5)


@pytest.mark.parametrize("box", [16, 17])
def test_refine_templates_of_the_real_space_renderer_interpolate_its_box_rendering(box):
    # the real-space renderer renders the refinement's template at the box and pads its spectrum
    # to twice the size: every other pixel (from the centre) is then the box rendering itself;
    # the Fourier renderer renders at twice the size directly
    from tvae_em.model import ModelConfig, TargetVAE

    torch.manual_seed(0)
    z = torch.randn(3, 2)
    zero, t0 = torch.zeros(3), torch.zeros(3, 2)
    real = TargetVAE(ModelConfig(box=box, renderer="real", z_dim=2))
    fine = real.refine_templates(z)
    assert fine.shape == (3, 2 * box, 2 * box)
    o = box % 2  # box pixel D//2 (the centre) is fine pixel D
    coarse = fine[:, o::2, o::2]
    torch.testing.assert_close(coarse, real.render(z, zero, t0, box), atol=1e-5, rtol=0)
    spectral = TargetVAE(ModelConfig(box=box, renderer="fourier", z_dim=2))
    torch.testing.assert_close(spectral.refine_templates(z), spectral.render(z, zero, t0, 2 * box))
