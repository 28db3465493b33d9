"""The Fourier renderer against exact references: an analytic object, the FFT path, Parseval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvae_em.ctf import CtfParams, compute_ctf
from tvae_em.fourier import apply_ctf, centred_irfft2, centred_rfft2, half_plane_frequencies
from tvae_em.geometry import pixel_grid, undo_pose
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.model.likelihood import PixelLikelihood
from tvae_em.model.spectral import Band, ctf_band, gaussian_loglik, render_image, render_spectrum

# an asymmetric object: three Gaussian blobs (amplitude, centre x, centre y in pixels, sd in px)
BLOBS = [(1.0, -3.0, 1.5, 2.0), (0.7, 2.5, -2.0, 1.6), (0.5, 1.0, 4.0, 1.8)]


def object_values(p: torch.Tensor) -> torch.Tensor:
    """The object at positions p (..., 2) in pixels from the centre."""
    out = torch.zeros(p.shape[:-1], dtype=torch.float64)
    for a, cx, cy, s in BLOBS:
        d2 = (p[..., 0] - cx) ** 2 + (p[..., 1] - cy) ** 2
        out += a * torch.exp(-d2 / (2 * s**2))
    return out


def analytic_spectrum(box: int):
    """The object's exact Fourier transform as a generator: (u (B, P, 2), z) -> (re, im), with
    u = 2k (k in cycles per pixel) and the orthonormal DFT scale 1/box of the renderer."""

    def generator(u: torch.Tensor, z: torch.Tensor):
        f = u.double() / 2
        spec = torch.zeros(f.shape[:-1], dtype=torch.complex128)
        for a, cx, cy, s in BLOBS:
            amp = a * 2 * math.pi * s**2 * torch.exp(-2 * math.pi**2 * s**2 * (f**2).sum(-1))
            spec += amp * torch.exp(-2j * math.pi * (f[..., 0] * cx + f[..., 1] * cy))
        spec = spec / box
        return spec.real.float(), spec.imag.float()

    return generator


def real_space(box: int, theta: float, t: tuple[float, float]) -> torch.Tensor:
    """(1, D, D) the object sampled at pose (theta, t): object(R(-theta)(p - t))."""
    p = pixel_grid(box, dtype=torch.float64).reshape(1, -1, 2)
    src = undo_pose(p, torch.tensor([theta], dtype=torch.float64), torch.tensor([t]).double())
    return object_values(src).reshape(1, box, box)


def band_limit(images: torch.Tensor) -> torch.Tensor:
    """Images (B, D, D) keeping only the renderer's band: |k| <= Nyquist, no Nyquist lines."""
    box = images.shape[-1]
    band = Band(box)
    spec = centred_rfft2(images.double()).reshape(len(images), -1)
    kept = torch.zeros_like(spec)
    kept[:, band.index] = spec[:, band.index]
    return centred_irfft2(kept.reshape(len(images), box, box // 2 + 1), box)


@pytest.mark.parametrize("box", [32, 33])
@pytest.mark.parametrize(
    ("theta", "t"), [(0.0, (0.0, 0.0)), (0.7, (1.0, -2.0)), (-2.4, (0.5, 0.0)), (1.9, (-0.5, 0.5))]
)
def test_fourier_rendering_equals_the_band_limited_object_at_any_pose(box, theta, t):
    """Rotation turns the frequency grid and a shift, half-pixel ones included, is a phase ramp:
    exact, not interpolated."""
    z = torch.zeros(1, 2)
    got = render_image(
        analytic_spectrum(box), z, torch.tensor([theta]), torch.tensor([t]), box, box
    )
    want = band_limit(real_space(box, theta, t)).float()
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_half_pixel_shift_moves_the_object_by_half_a_pixel():
    box, z, theta = 32, torch.zeros(1, 2), torch.zeros(1)
    shifted = render_image(analytic_spectrum(box), z, theta, torch.tensor([[0.5, 0.0]]), box, box)
    p = pixel_grid(box, dtype=torch.float64) - torch.tensor([0.5, 0.0], dtype=torch.float64)
    want = band_limit(object_values(p)[None]).float()
    torch.testing.assert_close(shifted, want, atol=2e-5, rtol=0)
    unshifted = render_image(analytic_spectrum(box), z, theta, torch.zeros(1, 2), box, box)
    assert (shifted - unshifted).abs().max() > 0.05  # the test can tell a shift from none


def test_rendering_at_twice_the_size_shows_the_same_field_of_view():
    box, z = 32, torch.zeros(1, 2)
    big = render_image(
        analytic_spectrum(box), z, torch.tensor([0.3]), torch.tensor([[2.0, 1.0]]), box, 64
    )
    small = render_image(
        analytic_spectrum(box), z, torch.tensor([0.3]), torch.tensor([[1.0, 0.5]]), box, box
    )
    down = torch.nn.functional.avg_pool2d(big[None], 2)[0]
    assert np.corrcoef(down.ravel().numpy(), small.ravel().numpy())[0, 1] > 0.99


def test_ctf_product_equals_the_fft_path():
    box, theta, t = 32, 0.9, (1.5, -0.5)
    params = CtfParams(
        *(np.array([v]) for v in (12000.0, 11000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0))
    )
    ctf = compute_ctf(box, 2.0, params)  # (1, D, D) on the fft2 grid
    band = Band(box)
    values = render_spectrum(
        analytic_spectrum(box),
        band.freqs,
        torch.zeros(1, 2),
        torch.tensor([theta]),
        torch.tensor([t]),
        box,
    ) * ctf_band(ctf, band, len(band.index))
    spec = torch.zeros(1, box * (box // 2 + 1), dtype=values.dtype)
    spec[:, band.index] = values
    fourier_path = centred_irfft2(spec.reshape(1, box, box // 2 + 1), box)
    fft_path = band_limit(apply_ctf(real_space(box, theta, t), ctf.double())).float()
    assert (ctf < 0).any()  # contrast reversals are in the test
    torch.testing.assert_close(fourier_path, fft_path, atol=2e-5, rtol=0)


@pytest.mark.parametrize("box", [16, 17])
def test_parseval_fourier_and_real_gaussian_log_likelihoods_agree_on_a_full_band(box):
    gen = torch.Generator().manual_seed(box)
    y, m = torch.randn(3, box, box, generator=gen), torch.randn(3, box, box, generator=gen)
    _, weights = half_plane_frequencies(box)  # the whole half plane: every coefficient
    four = gaussian_loglik(
        centred_rfft2(y).reshape(3, -1), centred_rfft2(m).reshape(3, -1), weights
    )
    real = PixelLikelihood("gaussian")(y.reshape(3, -1), m.reshape(3, -1))
    torch.testing.assert_close(four, real, rtol=1e-5, atol=1e-3)
    log_sigma = torch.tensor(0.3)
    four_s = gaussian_loglik(
        centred_rfft2(y).reshape(3, -1), centred_rfft2(m).reshape(3, -1), weights, log_sigma
    )
    real_s = -0.5 * ((y - m) ** 2).sum((1, 2)) * math.exp(-0.6) - box * box * (
        0.3 + 0.5 * math.log(2 * math.pi)
    )
    torch.testing.assert_close(four_s, real_s, rtol=1e-5, atol=1e-3)


def test_model_log_likelihood_equals_the_real_space_one_of_its_rendering():
    """The same weights, two ways: the Fourier-space likelihood of the band and the real-space
    likelihood of the rendered (band-limited) image against the band-limited particle."""
    box = 24
    model = TargetVAE(ModelConfig(box=box, rotations=4, renderer="fourier")).eval()
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(3, box, box, generator=gen)
    z, theta, t = (
        torch.randn(3, 2, generator=gen),
        torch.tensor([0.2, -1.0, 2.5]),
        torch.randn(3, 2),
    )
    with torch.no_grad():
        four = model.log_likelihood(y, theta, t, z)
        rendered = model.render(z, theta, t, box)
    dof = float(model.band.weights.sum())
    resid = band_limit(y).float() - rendered
    real = -0.5 * (resid**2).sum((1, 2)) - 0.5 * dof * math.log(2 * math.pi)
    torch.testing.assert_close(four, real, rtol=1e-5, atol=1e-2)


def test_band_is_a_radius_prefix_and_forty_percent_of_the_pixels():
    band = Band(64)
    assert 0.37 < len(band.index) / 64**2 < 0.41
    assert (band.radius[1:] >= band.radius[:-1]).all()
    assert band.count(0.25) < band.count(0.4) < band.count(None) == len(band.index)
    assert band.radius[: band.count(0.25)].max() <= 0.25 + 1e-6


def test_hermitian_symmetry_of_the_spectral_generator():
    model = TargetVAE(ModelConfig(box=16, rotations=4, renderer="fourier"))
    u = torch.randn(2, 50, 2)
    u[:, 0] = 0.0  # the DC coefficient is real
    z = torch.randn(2, 2)
    re, im = model.generator(u, z)
    re2, im2 = model.generator(-u, z)
    torch.testing.assert_close(re, re2)
    torch.testing.assert_close(im, -im2)
    assert (im[:, 0] == 0).all() and im[:, 1:].abs().max() > 0


def test_embed_and_generate_run_on_a_fourier_model(tmp_path):
    """The whole pipeline after training with the Fourier renderer, CTF included."""
    from conftest import make_run_folder, write_particle_set

    from tvae_em.embed import EmbedOptions, embed_particles
    from tvae_em.generate import GenerateOptions, generate_figures
    from tvae_em.synthetic import glyphs, random_ctf_params

    images, _ = glyphs(12, box=16, seed=1, n_classes=2)
    params = random_ctf_params(12, np.random.default_rng(0))
    defocus = {"rlnDefocusU": params.dfu_A, "rlnDefocusV": params.dfv_A,
               "rlnDefocusAngle": params.dfang_deg}  # fmt: skip
    star = write_particle_set(tmp_path / "d", images * 2 - 1, 2.0, extra=defocus)
    run = make_run_folder(tmp_path / "run", 16, ctf=True, renderer="fourier")
    embed_particles(EmbedOptions(run, star, tmp_path / "e.star", classes=2))
    npz = np.load(tmp_path / "e.npz")
    assert np.isfinite(npz["elbo"]).all() and np.isfinite(npz["z_mu"]).all()
    s = generate_figures(
        GenerateOptions(
            run, tmp_path / "f", embedding=tmp_path / "e.npz", particles=star, n_steps=3, n_recon=2
        )  # fmt: skip
    )
    assert {"reconstructions.png", "class_averages.mrcs"} <= {p.name for p in s.outputs}


def test_one_angle_for_the_batch_renders_as_one_angle_per_particle():
    """render_spectrum with one angle (1,) for the batch (the refinement's templates at pose 0)
    runs the generator's first layer once; the spectra must equal those of each particle alone."""
    torch.manual_seed(3)
    gen = TargetVAE(ModelConfig(box=16, renderer="fourier", z_dim=2)).generator
    freqs, _ = half_plane_frequencies(16)
    z, t = torch.randn(4, 2), torch.randn(4, 2)
    theta = torch.full((4,), 0.7)
    shared = render_spectrum(gen, freqs, z, theta[:1], t, 16)
    each = torch.cat([render_spectrum(gen, freqs, z[i : i + 1], theta[i : i + 1], t[i : i + 1], 16)
                      for i in range(4)])  # fmt: skip
    assert torch.allclose(shared, each, atol=1e-5)
    u = torch.rand(1, 9, 2)
    assert torch.allclose(gen.network(u, z), gen.network(u.expand(4, -1, -1), z), atol=1e-6)


def test_real_space_render_of_one_pose_for_the_batch_equals_particle_by_particle():
    torch.manual_seed(4)
    model = TargetVAE(ModelConfig(box=16, renderer="real", z_dim=2))
    z = torch.randn(3, 2)
    theta, t = torch.full((3,), 0.4), torch.tensor([[1.0, -0.5]]).repeat(3, 1)
    shared = model.render(z, theta[:1], t[:1], 32)  # one pose for the batch
    each = torch.cat([model.render(z[i : i + 1], theta[:1], t[:1], 32) for i in range(3)])
    torch.testing.assert_close(model.render(z, theta, t, 32), shared)  # the same pose, per row
    assert shared.shape == (3, 32, 32)
    assert torch.allclose(shared, each, atol=1e-5)
