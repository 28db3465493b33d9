"""Fourier-space image operations: the one home of every FFT convention in tvae-em.

Conventions:
- Filters (CTFs, phase flips) are (B, D, D) arrays on the *unshifted* ``fft2`` grid
  (``torch.fft.fftfreq`` order, frequency 0 at index 0), as `tvae_em.ctf.compute_ctf` returns them.
- Resampling (crop/pad) works on the *centred* transform: the centre pixel D//2 of the input lands
  on pixel n//2 of the output, so RELION origins stay valid. Real-space values are kept (a
  constant image stays the same constant; a band-limited image is reproduced exactly).
- Low-pass resolutions are in Angstrom, pixel sizes in Angstrom per pixel.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft
import torch


# ---- filters on the fft2 grid ------------------------------------------------------------------
def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Real images (B, D, D) multiplied by filters (B, D, D) in Fourier space (real result).

    Computed in float32 (float64 inputs stay float64) whatever autocast says: FFTs in bf16 lose
    the precision the likelihood needs.
    """
    with torch.autocast(images.device.type, enabled=False):
        x = images if images.dtype == torch.float64 else images.float()
        f = ctf if ctf.dtype == torch.float64 else ctf.float()
        return torch.fft.ifft2(torch.fft.fft2(x) * f).real


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Images (B, D, D) with each Fourier coefficient multiplied by the sign of its CTF (B, D, D).

    Undoes the CTF's contrast reversals (not its amplitude), as RELION's "ctf phase flip"; the
    encoder then sees particles of one contrast at every frequency.
    """
    return apply_ctf(images, torch.sign(ctf))


def shift_images(images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Images (B, D, D) shifted by t (B, 2) px (x, y), sub-pixel exactly (a Fourier phase ramp)."""
    d = images.shape[-1]
    ky = torch.fft.fftfreq(d, device=images.device)[:, None]
    kx = torch.fft.rfftfreq(d, device=images.device)[None, :]
    ramp = torch.exp(-2j * math.pi * (kx * t[:, 0, None, None] + ky * t[:, 1, None, None]))
    return torch.fft.irfft2(torch.fft.rfft2(images) * ramp, s=(d, d))


# ---- resampling ------------------------------------------------------------------------------
def fourier_crop(images: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Downsample (..., D, D) images to (..., size, size) by cropping their centred Fourier
    transform: numpy in, float32 numpy out; a tensor in, a tensor out (same device and dtype).

    Real-space values are kept (the spectrum is scaled by (size/D)^2). For an even ``size`` the
    new Nyquist row/column receives both the -size/2 and the +size/2 coefficients (their sum is
    what a sampled cosine at that frequency shows), so band-limited images are reproduced exactly.
    """
    if not isinstance(images, torch.Tensor):
        x = np.asarray(images)
        x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
        return (
            fourier_crop(torch.from_numpy(np.ascontiguousarray(x)), size)
            .numpy()
            .astype(np.float32, copy=False)
        )
    d = images.shape[-1]
    if size > d:
        raise ValueError(f"fourier_crop cannot enlarge {d} to {size}")
    if size == d:
        return images.clone()
    dev = images.device
    spec = torch.fft.rfft2(images)  # (..., D, D//2+1), phase origin at pixel 0
    kr = torch.round(torch.fft.fftfreq(size, device=dev) * size).long()  # (n,) row frequencies
    kc = torch.arange(size // 2 + 1, device=dev)  # (n//2+1,) output column frequencies
    out = spec[..., (kr % d)[:, None], kc[None, :]]  # (..., n, n//2+1)
    h = size // 2
    extra = spec[..., h, : h + 1] if size % 2 == 0 else None  # row +n/2, folded into row -n/2
    # Phase origin: input centre D//2 -> output centre n//2 (a no-op when both sizes are even).
    shift = (d // 2) / d - h / size
    if shift:
        pr, pc = torch.exp(2j * math.pi * kr * shift), torch.exp(2j * math.pi * kc * shift)
        out = out * (pr[:, None] * pc[None, :]).to(out.dtype)
        if extra is not None:
            extra = extra * (torch.exp(torch.tensor(2j * math.pi * h * shift)) * pc).to(out.dtype)
    if extra is not None:
        out[..., h, :] += extra
        col = out[..., :, h]  # column -n/2 is the conjugate mirror of column +n/2
        out[..., :, h] = col + torch.conj(col[..., (-torch.arange(size, device=dev)) % size])
    return torch.fft.irfft2(out, s=(size, size)) * (size / d) ** 2


def fourier_pad(images: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Upsample (..., D, D) images to (..., size, size) by zero-padding their centred transform:
    numpy in, float32 numpy out (computed in float64); a tensor in, a tensor out (same device
    and dtype).

    The inverse of `fourier_crop` on band-limited images: pixel values are kept, the centre pixel
    D//2 lands on size//2, and the Nyquist coefficient of an even D is split equally between the
    frequencies +D/2 and -D/2 of the larger grid (so the result stays real and symmetric).
    """
    if not isinstance(images, torch.Tensor):
        x = torch.from_numpy(np.asarray(images, dtype=np.float64))
        return fourier_pad(x, size).numpy().astype(np.float32)
    d = images.shape[-1]
    if size < d:
        raise ValueError(f"fourier_pad cannot shrink {d} to {size}")
    if size == d:
        return images.clone()
    dev = images.device
    cdtype = torch.complex128 if images.dtype == torch.float64 else torch.complex64
    spec = torch.fft.fft2(images).to(cdtype)  # (..., D, D), origin at pixel 0
    k = torch.round(torch.fft.fftfreq(d, device=dev) * d).long()  # (D,) input frequencies
    ramp = torch.exp(2j * math.pi * k * (d // 2) / d).to(cdtype)  # origin -> pixel D//2
    spec = spec * (ramp[:, None] * ramp[None, :])
    place = torch.zeros(size, d, dtype=cdtype, device=dev)  # input -> output frequency, weighted
    place[k % size, torch.arange(d, device=dev)] = 1.0
    if d % 2 == 0:  # the Nyquist coefficient (k = -D/2) is split between -D/2 and +D/2
        place[(-d // 2) % size, d // 2] = 0.5
        place[d // 2, d // 2] = 0.5
    out = place @ spec @ place.T  # (..., size, size), phase origin at the centre pixel
    kout = torch.round(torch.fft.fftfreq(size, device=dev) * size)
    ramp = torch.exp(-2j * math.pi * kout * (size // 2) / size).to(cdtype)  # origin -> pixel 0
    out = out * (ramp[:, None] * ramp[None, :])
    return (torch.fft.ifft2(out).real * (size / d) ** 2).to(images.dtype)


def fourier_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Images (B, D, D) resampled to (B, size, size): `fourier_crop` or `fourier_pad`."""
    if size <= images.shape[-1]:
        return fourier_crop(images, size)
    return fourier_pad(images, size)


# ---- low-pass --------------------------------------------------------------------------------
def lowpass(
    images: np.ndarray, apix: float | np.ndarray, resolution_A: float, kind: str = "gaussian"
) -> np.ndarray:
    """Low-pass filter (B, D, D) images to ``resolution_A`` Angstrom.

    "gaussian": response exp(-ln2 (s * res)^2), one half at spatial frequency s = 1/res;
    "hard": keep frequencies up to 1/res only. ``apix`` is a scalar or one value per image.
    """
    if kind not in ("gaussian", "hard"):
        raise ValueError(f"unknown low-pass kind {kind!r}")
    d = images.shape[-1]
    radius = np.hypot(sfft.fftfreq(d)[:, None], sfft.rfftfreq(d)[None, :])  # (D, D//2+1) cycles/px
    apix = np.asarray(apix, dtype=np.float64).reshape(-1, 1, 1)  # (B or 1, 1, 1)
    s = radius[None] / apix  # (B or 1, D, D//2+1) in 1/Angstrom
    if kind == "gaussian":
        response = np.exp(-math.log(2.0) * (s * resolution_A) ** 2)
    else:
        response = (s <= 1.0 / resolution_A).astype(np.float64)
    spec = sfft.rfft2(images, workers=-1) * response.astype(np.float32)
    out = sfft.irfft2(spec, s=(d, d), workers=-1)
    return out.astype(np.float32)


# ---- centred half-plane spectra (the Fourier renderer's grid) ---------------------------------
def centred_rfft2(images: torch.Tensor) -> torch.Tensor:
    """Orthonormal half-plane spectrum (B, D, D//2+1) of real images (B, D, D), phase origin at the
    centre pixel D//2 (so a centred object has a real, smooth spectrum); float32 or float64."""
    with torch.autocast(images.device.type, enabled=False):
        x = images if images.dtype == torch.float64 else images.float()
        return torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho")


def centred_irfft2(spectrum: torch.Tensor, size: int) -> torch.Tensor:
    """Real images (B, size, size) of half-plane spectra (B, size, size//2+1): the inverse of
    `centred_rfft2`."""
    with torch.autocast(spectrum.device.type, enabled=False):
        x = torch.fft.irfft2(spectrum, s=(size, size), norm="ortho")
        return torch.fft.fftshift(x, dim=(-2, -1))


def half_plane_frequencies(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frequencies of the `centred_rfft2` grid, flattened: (M, 2) (kx, ky) in cycles per pixel
    and (M,) Parseval weights (how many full-plane coefficients each stands for: 1 on the kx = 0
    column and, for even sizes, on the kx = size/2 column; 2 elsewhere), M = size * (size//2+1)."""
    ky = torch.fft.fftfreq(size, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")  # (D, D//2+1)
    weight = torch.full_like(gx, 2.0)
    weight[:, 0] = 1.0
    if size % 2 == 0:
        weight[:, -1] = 1.0
    return torch.stack([gx, gy], -1).reshape(-1, 2).float(), weight.reshape(-1).float()
