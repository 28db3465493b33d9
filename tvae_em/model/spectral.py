"""The Fourier renderer: the generator on frequency coordinates, the band, the likelihood.

The image of object g_z at pose (theta, t) is y(x) = g_z(R(-theta)(x - t)); its spectrum is
Y(k) = G_z(R(-theta) k) exp(-2 pi i k.t), and the microscope multiplies it by CTF(k). So a
coordinate network for G_z on frequencies renders any pose exactly -- rotation turns the frequency
grid, a shift (sub-pixel too) is a phase ramp -- and the CTF is a product: no FFT of the rendering.

Conventions (`tvae_em.fourier`): spectra are orthonormal half-plane spectra with the phase origin at
the centre pixel (`centred_rfft2`); k is in cycles per pixel of the model's box D; the generator
takes u = 2k (box units: Nyquist is |u| = 1). Only frequencies inside the band |k| <= k_max (at
most Nyquist, 0.5; the Nyquist lines of even boxes are left out, they have no conjugate partner)
are scored. With white Gaussian noise of unit variance the Fourier-space log-likelihood of the
band is the real-space one of the band-limited image (Parseval), counted in full-plane degrees of
freedom, so a full band gives exactly the real-space likelihood.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..fourier import centred_irfft2, centred_rfft2, half_plane_frequencies
from ..geometry import rotation_matrix
from .generator import CoordinateNetwork

NYQUIST = 0.5  # cycles per pixel


class SpectralGenerator(CoordinateNetwork):
    """G(u, z): the object's spectrum at frequency coordinates u (B, P, 2) -> (re, im) (B, P) each.

    The real-space generator's network (`CoordinateNetwork`: random Fourier features, z injected
    linearly, LeakyReLU MLP) with two outputs. The features of a frequency are cos(W u + b) with
    W = pi * (positions in pixels): plane waves in u, i.e. point sources in the object. Hermitian
    symmetry, G(-u) = conj G(u) (a real object), holds exactly: the network is evaluated on the
    canonical half plane (u_y > 0, or u_y = 0 and u_x >= 0) and conjugated on the other half; the
    imaginary part of G(0) is zero.
    """

    def __init__(
        self,
        z_dim: int,
        box: int,
        hidden: int = 512,
        layers: int = 2,
        features: int = 256,
        extent_px: float | None = None,
    ):
        extent = 0.25 * box if extent_px is None else extent_px  # sd of the feature positions
        super().__init__(z_dim, hidden, layers, features, 2, math.pi * extent)

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            flip = (u[..., 1] < 0) | ((u[..., 1] == 0) & (u[..., 0] < 0))  # (B, P)
            uc = torch.where(flip[..., None], -u, u)
        out = self.network(uc, z).float()  # (B, P, 2)
        re, im = out[..., 0], out[..., 1]
        dc = (u == 0).all(-1)
        im = torch.where(flip, -im, torch.where(dc, torch.zeros_like(im), im))
        return re, im


class Band(nn.Module):
    """The scored frequencies of a D x D box, sorted by radius so that any band |k| <= k_max is a
    prefix: frequencies (M, 2) cycles/px, Parseval weights (M,), flat rfft indices (M,). Buffers
    (not saved in checkpoints: rebuilt from the box), so they follow the model's device."""

    def __init__(self, box: int):
        super().__init__()
        freqs, weights = half_plane_frequencies(box)
        radius = freqs.norm(dim=1)
        keep = radius <= NYQUIST + 1e-6
        if box % 2 == 0:  # Nyquist lines: no conjugate partner on the grid
            keep &= (freqs[:, 0].abs() < NYQUIST) & (freqs[:, 1].abs() < NYQUIST)
        index = torch.nonzero(keep)[:, 0]
        order = torch.argsort(radius[index], stable=True)
        index = index[order]
        self.register_buffer("index", index, persistent=False)  # (M,) into the (D, D//2+1) grid
        self.register_buffer("freqs", freqs[index], persistent=False)  # (M, 2)
        self.register_buffer("weights", weights[index], persistent=False)  # (M,)
        self.register_buffer("radius", radius[index], persistent=False)  # (M,) ascending

    def count(self, k_max: float | None) -> int:
        """How many frequencies lie in |k| <= k_max (None: the whole band, up to Nyquist)."""
        if k_max is None or k_max >= NYQUIST:
            return len(self.index)
        edge = torch.tensor([float(k_max) + 1e-6], device=self.radius.device)
        return int(torch.searchsorted(self.radius, edge).item())


def render_spectrum(
    generator: SpectralGenerator,
    freqs: torch.Tensor,
    z: torch.Tensor,
    theta: torch.Tensor,
    t: torch.Tensor,
    box: int,
) -> torch.Tensor:
    """Spectrum values (B, P) complex of objects z at pose (theta, t) at frequencies freqs (P, 2)
    (cycles per pixel of the model's box), t in pixels: G(R(-theta) k) exp(-2 pi i k.t).
    theta (B,), or (1,) for one angle shared by the batch: the generator's features and first
    layer then run once for all of it."""
    with torch.autocast(freqs.device.type, enabled=False):
        rinv = rotation_matrix(-theta.float())  # (B|1, 2, 2)
        u = 2 * torch.einsum("bij,pj->bpi", rinv, freqs.float())  # (B|1, P, 2) box units
    re, im = generator(u, z)
    with torch.autocast(freqs.device.type, enabled=False):
        ramp = -2 * math.pi * (t.float() @ freqs.float().T)  # (B, P)
        return torch.complex(re, im) * torch.polar(torch.ones_like(ramp), ramp)


def gaussian_loglik(
    observed: torch.Tensor, model: torch.Tensor, weights: torch.Tensor, log_sigma=None
) -> torch.Tensor:
    """(B,) Gaussian log-likelihood of the band, from half-plane values (B, P) complex: the
    real-space log-likelihood of the band-limited image (Parseval), unit or exp(log_sigma) sd."""
    resid2 = (observed - model).abs().square()  # (B, P)
    dof = weights.sum()
    if log_sigma is None:
        return -0.5 * (resid2 * weights).sum(1) - 0.5 * dof * math.log(2 * math.pi)
    quad = (resid2 * weights).sum(1) * torch.exp(-2 * log_sigma)
    return -0.5 * quad - dof * log_sigma - 0.5 * dof * math.log(2 * math.pi)


def render_image(
    generator: SpectralGenerator,
    z: torch.Tensor,
    theta: torch.Tensor,
    t: torch.Tensor,
    box: int,
    size: int,
) -> torch.Tensor:
    """Real images (B, size, size) of objects z at pose (theta, t) (t in pixels of ``size``): the
    spectrum on the trained band, inverse transformed. A model of box D rendered at size S shows
    the same field of view; frequencies beyond the model's Nyquist are zero."""
    freqs, _ = half_plane_frequencies(size, z.device)  # (M, 2) cycles per pixel of `size`
    model_freqs = freqs * (size / box)  # the same frequency in cycles per pixel of the model's box
    inside = model_freqs.norm(dim=1) <= NYQUIST
    if size % 2 == 0:
        inside &= (freqs[:, 0].abs() < NYQUIST) & (freqs[:, 1].abs() < NYQUIST)
    idx = torch.nonzero(inside)[:, 0]
    # the shift in pixels of the model's box, at the model's frequencies
    values = render_spectrum(generator, model_freqs[idx], z, theta, t * (box / size), box)
    spec = torch.zeros(len(z), size * (size // 2 + 1), dtype=values.dtype, device=z.device)
    spec[:, idx] = values * (size / box)  # orthonormal spectra scale with the pixel count
    return centred_irfft2(spec.reshape(len(z), size, size // 2 + 1), size)


def observed_band(y: torch.Tensor, band: Band, n: int) -> torch.Tensor:
    """(B, n) half-plane spectrum values of images y (B, D, D) at the band's first n frequencies."""
    spec = centred_rfft2(y).reshape(len(y), -1)  # (B, D * (D//2+1))
    return spec[:, band.index[:n]]


def ctf_band(ctf: torch.Tensor, band: Band, n: int) -> torch.Tensor:
    """(B, n) values of CTF images (B, D, D) on the unshifted fft2 grid at the band's frequencies.

    The half-plane grid is the first D//2+1 columns of the fft2 grid, so the values are gathered
    from there (the CTF is real, so the phase origin does not matter)."""
    d = ctf.shape[-1]
    half = ctf[..., : d // 2 + 1].reshape(len(ctf), -1)
    return half[:, band.index[:n]].float()
