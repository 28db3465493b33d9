"""The contrast transfer function (CTF) of each particle, from its star/cs metadata, in torch.

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
import pandas as pd
import torch

from .errors import UserError

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


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Real images (B, D, D) multiplied by their CTFs (B, D, D) in Fourier space (real result)."""
    return torch.fft.ifft2(torch.fft.fft2(images) * ctf).real


# ---------------------------------------------------------------------------------------------
# Reading the parameters from particle metadata

_RELION_PARTICLE = {
    "dfu_A": "rlnDefocusU",
    "dfv_A": "rlnDefocusV",
    "dfang_deg": "rlnDefocusAngle",
    "phase_shift_deg": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor",
}
_RELION_OPTICS = {
    "volt_kv": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amp_contrast": "rlnAmplitudeContrast",
}
_CS_FIELDS = {
    "dfu_A": "ctf/df1_A",
    "dfv_A": "ctf/df2_A",
    "dfang_deg": "ctf/df_angle_rad",
    "volt_kv": "ctf/accel_kv",
    "cs_mm": "ctf/cs_mm",
    "amp_contrast": "ctf/amp_contrast",
    "phase_shift_deg": "ctf/phase_shift_rad",
    "bfactor": "ctf/bfactor",
}
PHASE_FLIPPED = "tvaePhaseFlipped"  # particle column written by preprocess --phase-flip
_OPTIONAL = {"dfv_A", "dfang_deg", "phase_shift_deg", "bfactor"}


def ctf_params(stack) -> CtfParams | None:
    """Per-particle CtfParams from a ParticleStack's metadata; None when it carries no defocus.

    RELION: rlnDefocusU/V/Angle, rlnPhaseShift, rlnCtfBfactor per particle; voltage, Cs and
    amplitude contrast per particle (3.0) or from the optics group (3.1+). cryoSPARC: ctf/* fields.
    """
    kind = getattr(stack, "kind", None)
    if kind == "cryosparc":
        return _from_cryosparc(stack.particles, _source(stack))
    if kind in ("relion30", "relion31"):
        return _from_relion(stack.particles, getattr(stack, "optics", None), _source(stack))
    return None


def _source(stack) -> str:
    """The name of the stack's input file, for error messages."""
    return str(getattr(stack, "path", None) or getattr(stack, "source", "the particle file"))


def _from_relion(
    particles: pd.DataFrame, optics: pd.DataFrame | None, src: str
) -> CtfParams | None:
    """CtfParams from RELION columns (optics values joined on rlnOpticsGroup where needed)."""
    if "rlnDefocusU" not in particles.columns:
        return None
    n = len(particles)
    out = {}
    for key, column in _RELION_PARTICLE.items():
        if column in particles.columns:
            out[key] = _numeric(particles[column], column, src)
    out.setdefault("dfv_A", out["dfu_A"])
    for key, column in _RELION_OPTICS.items():
        out[key] = _optics_value(particles, optics, column, src)
    params = _complete(out, n)
    if PHASE_FLIPPED in particles.columns:
        params.phase_flipped = _numeric(particles[PHASE_FLIPPED], PHASE_FLIPPED, src)
    return params


def _optics_value(
    particles: pd.DataFrame, optics: pd.DataFrame | None, column: str, src: str
) -> np.ndarray:
    """(n,) values of an optics column: per particle if present, else via rlnOpticsGroup."""
    if column in particles.columns:
        return _numeric(particles[column], column, src)
    if optics is None or column not in optics.columns:
        raise UserError(f"{src}: particles have rlnDefocusU but no {column} (needed for the CTF)")
    if len(optics) == 1 and "rlnOpticsGroup" not in particles.columns:
        return np.full(len(particles), _numeric(optics[column], column, src)[0])
    if "rlnOpticsGroup" not in particles.columns or "rlnOpticsGroup" not in optics.columns:
        raise UserError(f"{src}: cannot match particles to optics groups (no rlnOpticsGroup)")
    table = dict(
        zip(
            optics["rlnOpticsGroup"].astype(int), _numeric(optics[column], column, src), strict=True
        )
    )
    groups = particles["rlnOpticsGroup"].astype(int).to_numpy()
    missing = sorted(set(groups) - set(table))
    if missing:
        raise UserError(f"{src}: rlnOpticsGroup {missing[0]} is not in the optics block")
    return np.array([table[g] for g in groups], dtype=np.float64)


def _from_cryosparc(particles: pd.DataFrame, src: str) -> CtfParams | None:
    """CtfParams from cryoSPARC ctf/* fields (radians converted to degrees)."""
    if _CS_FIELDS["dfu_A"] not in particles.columns:
        return None
    out = {}
    for key, column in _CS_FIELDS.items():
        if column in particles.columns:
            out[key] = _numeric(particles[column], column, src)
        elif key not in _OPTIONAL:
            raise UserError(f"{src}: has ctf/df1_A but no {column} (needed for the CTF)")
    for key in ("dfang_deg", "phase_shift_deg"):
        if key in out:
            out[key] = np.rad2deg(out[key])
    out.setdefault("dfv_A", out["dfu_A"])
    return _complete(out, len(particles))


def _numeric(series: pd.Series, column: str, src: str) -> np.ndarray:
    """A column as float64, or a UserError naming it."""
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        raise UserError(f"{src}: column {column} has missing or non-numeric values")
    return values


def _complete(values: dict[str, np.ndarray], n: int) -> CtfParams:
    """CtfParams with absent optional fields set to zero."""
    for key in FIELDS:
        values.setdefault(key, np.zeros(n))
    return CtfParams(**{k: np.asarray(values[k], dtype=np.float64) for k in FIELDS})
