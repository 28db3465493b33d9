"""The contrast transfer function (CTF): physics only (parameters in, CTF images out), in torch.

Reading the parameters from RELION/cryoSPARC metadata is `tvae_em.io` (``stack.ctf_params()``);
applying a CTF to images is `tvae_em.fourier.apply_ctf`.

Sign convention: RELION's (ctf.h, CTF::getCTF). With the phase
    gamma(s) = 2 pi (-0.5 df lambda s^2 + 0.25 Cs lambda^3 s^4) - phase_shift,
the CTF is
    ctf(s) = -(sqrt(1 - w^2) sin(gamma) - w cos(gamma)) * exp(-B s^2 / 4),
so ctf(0) = +w and, for underfocus (df > 0), the CTF is positive at low frequency: a projection
of positive density times this CTF is a "white" particle, as RELION extracts particles (with
contrast inversion). cryoDRGN's compute_ctf is exactly the negative of this (ctf(0) = -w), which
is why cryoDRGN inverts the data sign by default.

Units: defocus in Angstrom (positive = underfocus), angles in degrees, voltage in kV, Cs in mm,
pixel size in Angstrom. Defocus does not change with downsampling; only the pixel size does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

FIELDS = (
    "dfu_A",
    "dfv_A",
    "dfang_deg",
    "volt_kv",
    "cs_mm",
    "amp_contrast",
    "phase_shift_deg",
    "bfactor",
)


@dataclass
class CtfParams:
    """Per-particle CTF parameters, each an (n,) float64 numpy array (units in the field names)."""

    dfu_A: np.ndarray
    dfv_A: np.ndarray
    dfang_deg: np.ndarray
    volt_kv: np.ndarray
    cs_mm: np.ndarray
    amp_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor: np.ndarray
    # 1 where the image was phase-flipped by `tvae-em preprocess --phase-flip`: its CTF is |CTF|
    phase_flipped: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dfu_A)

    def subset(self, indices) -> CtfParams:
        """The parameters of the particles at `indices` (a batch)."""
        return CtfParams(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[indices]
                for f in fields(self)
            }
        )

    def to_torch(self, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """A dict of (n,) tensors, the form compute_ctf takes."""
        return {
            f.name: torch.as_tensor(np.array(getattr(self, f.name)), dtype=dtype, device=device)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }


def electron_wavelength_A(
    volt_kv: float | np.ndarray | torch.Tensor,
) -> float | np.ndarray | torch.Tensor:
    """Relativistic electron wavelength (Angstrom) for volt_kv (kV; floats, arrays or tensors).

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)) with V in volts (RELION's constants).
    """
    v = volt_kv * 1e3
    return 12.2643247 / (v * (1.0 + 0.978466e-6 * v)) ** 0.5


def compute_ctf(
    box: int,
    apix: torch.Tensor | float,
    params: Mapping[str, torch.Tensor] | CtfParams,
    device=None,
) -> torch.Tensor:
    """CTF images (B, box, box) on the unshifted fft2 grid (torch.fft.fftfreq), any box size.

    apix: (B,) or a float, Angstrom per pixel of the images the CTF multiplies. params: the
    CtfParams fields as (B,) tensors (phase_shift_deg and bfactor optional). The result is exactly
    Hermitian (ctf(s) == ctf(-s), Nyquist row/column of even boxes symmetrised), so
    ifft2(fft2(img) * ctf) is real for real images.
    """
    if isinstance(params, CtfParams):
        params = params.to_torch(device)
    p = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in params.items()}
    dfu = p["dfu_A"].reshape(-1, 1, 1)  # (B, 1, 1)
    apix = torch.as_tensor(apix, dtype=torch.float32, device=dfu.device)
    apix = apix.reshape(-1, 1, 1).expand(dfu.shape[0], 1, 1)
    fx, fy = _frequencies(box, apix)  # (B, box, box) in 1/Angstrom; fx along columns
    ctf = _hermitian(_ctf_formula(fx, fy, p, dfu))
    if "phase_flipped" in p:  # phase-flipped images carry |CTF|
        ctf = torch.where(p["phase_flipped"].reshape(-1, 1, 1) > 0.5, ctf.abs(), ctf)
    return ctf


def batch_ctf(
    params: CtfParams, apix: np.ndarray, idx: np.ndarray, box: int, device=None
) -> torch.Tensor:
    """(B, box, box) CTFs of the particles ``idx`` for images of ``box`` pixels of ``apix[idx]``
    Angstrom (apix: (n,) per particle of the whole set), as training, embedding and figures use."""
    idx = np.asarray(idx)
    return compute_ctf(box, torch.as_tensor(np.asarray(apix)[idx]), params.subset(idx), device)


def _frequencies(box: int, apix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fx, fy), each (B, box, box): fft2 frequencies of columns (x) and rows (y) in 1/Angstrom."""
    f = torch.fft.fftfreq(box, device=apix.device)  # cycles per pixel
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    return fx[None] / apix, fy[None] / apix


def _ctf_formula(
    fx: torch.Tensor, fy: torch.Tensor, p: Mapping[str, torch.Tensor], dfu: torch.Tensor
) -> torch.Tensor:
    """RELION's CTF at frequencies (fx, fy) (B, D, D) for (B,) parameters in p."""

    def col(name: str, default: torch.Tensor | None = None) -> torch.Tensor:
        v = p.get(name)
        if v is None and default is None:
            raise KeyError(f"compute_ctf: missing CTF parameter {name!r}")
        return default if v is None else v.reshape(-1, 1, 1)

    zero = torch.zeros_like(dfu)
    dfv, ang = col("dfv_A", dfu), torch.deg2rad(col("dfang_deg", zero))
    w = col("amp_contrast")
    lam = electron_wavelength_A(col("volt_kv"))
    cs = col("cs_mm") * 1e7  # mm -> Angstrom
    s2 = fx**2 + fy**2
    # cos(2 (phi - ang)) with phi = atan2(fy, fx), written without atan2 so it is exactly even in s
    safe = torch.where(s2 > 0, s2, torch.ones_like(s2))
    cos2 = ((fx**2 - fy**2) * torch.cos(2 * ang) + 2 * fx * fy * torch.sin(2 * ang)) / safe
    df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.where(s2 > 0, cos2, torch.zeros_like(s2)))
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs * lam**3 * s2**2)
    gamma = gamma - torch.deg2rad(col("phase_shift_deg", zero))
    ctf = -(torch.sqrt(1 - w**2) * torch.sin(gamma) - w * torch.cos(gamma))
    return ctf * torch.exp(-col("bfactor", zero) / 4 * s2)


def _hermitian(ctf: torch.Tensor) -> torch.Tensor:
    """0.5 (ctf(s) + ctf(-s)) on the fft2 grid: only changes the Nyquist lines of even boxes."""
    d = ctf.shape[-1]
    neg = (-torch.arange(d, device=ctf.device)) % d
    return 0.5 * (ctf + ctf[:, neg][:, :, neg])
