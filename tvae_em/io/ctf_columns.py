"""CTF parameters from particle metadata: RELION columns (and cryoSPARC's through its RELION view).

RELION: rlnDefocusU/V/Angle, rlnPhaseShift, rlnCtfBfactor per particle; voltage, Cs and amplitude
contrast per particle (3.0) or from the optics group (3.1+). cryoSPARC ctf/* fields are mapped to
these columns by `tvae_em.io.cs.ctf_as_relion` (the one mapping); this module reads RELION labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..ctf import FIELDS, CtfParams
from ..errors import UserError
from .cs import check_ctf_fields, ctf_as_relion

RELION_PARTICLE = {
    "dfu_A": "rlnDefocusU",
    "dfv_A": "rlnDefocusV",
    "dfang_deg": "rlnDefocusAngle",
    "phase_shift_deg": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor",
}
RELION_OPTICS = {
    "volt_kv": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amp_contrast": "rlnAmplitudeContrast",
}
PHASE_FLIPPED = "tvaePhaseFlipped"  # particle column written by preprocess --phase-flip
# Every RELION column the CTF is read from: checked to be numbers when a stack is opened.
CTF_COLUMNS = [*RELION_PARTICLE.values(), *RELION_OPTICS.values(), PHASE_FLIPPED]


def relion_ctf_params(
    particles: pd.DataFrame, optics: pd.DataFrame | None, src: str
) -> CtfParams | None:
    """CtfParams from RELION columns (optics values joined on rlnOpticsGroup where needed);
    None when the particles carry no defocus. ``src`` names the file in error messages."""
    if "rlnDefocusU" not in particles.columns:
        return None
    n = len(particles)
    out = {}
    for key, column in RELION_PARTICLE.items():
        if column in particles.columns:
            out[key] = _numeric(particles[column], column, src)
    out.setdefault("dfv_A", out["dfu_A"])
    for key, column in RELION_OPTICS.items():
        out[key] = _optics_value(particles, optics, column, src)
    params = _complete(out, n)
    if PHASE_FLIPPED in particles.columns:
        params.phase_flipped = _numeric(particles[PHASE_FLIPPED], PHASE_FLIPPED, src)
    return params


def cryosparc_ctf_params(fields: pd.DataFrame, src: str) -> CtfParams | None:
    """CtfParams from cryoSPARC ctf/* fields (through their RELION columns); None without
    defocus."""
    if not check_ctf_fields(fields, src):
        return None
    particle, optics = ctf_as_relion(fields)
    return relion_ctf_params(pd.concat([particle, optics], axis=1), None, src)


def _optics_value(
    particles: pd.DataFrame, optics: pd.DataFrame | None, column: str, src: str
) -> np.ndarray:
    """(n,) values of an optics column: per particle if present, else via rlnOpticsGroup."""
    if column in particles.columns:
        return _numeric(particles[column], column, src)
    if optics is None or column not in optics.columns:
        raise UserError(f"{src}: particles have rlnDefocusU but no {column} (needed for the CTF)")
    if len(optics) == 1 and "rlnOpticsGroup" not in particles.columns:
        return np.full(len(particles), _numeric(optics[column], column, src, "optics group")[0])
    if "rlnOpticsGroup" not in particles.columns or "rlnOpticsGroup" not in optics.columns:
        raise UserError(f"{src}: cannot match particles to optics groups (no rlnOpticsGroup)")
    table = dict(
        zip(
            optics["rlnOpticsGroup"].astype(int),
            _numeric(optics[column], column, src, "optics group"),
            strict=True,
        )
    )
    groups = particles["rlnOpticsGroup"].astype(int).to_numpy()
    missing = sorted(set(groups) - set(table))
    if missing:
        raise UserError(f"{src}: rlnOpticsGroup {missing[0]} is not in the optics block")
    return np.array([table[g] for g in groups], dtype=np.float64)


def check_numeric_columns(
    table: pd.DataFrame, columns: list[str], src: str, row: str = "particle"
) -> None:
    """UserError naming the first ``row`` (particle, optics group) of ``src`` where one of
    ``columns`` (those present) is not a finite number."""
    for column in columns:
        if column in table.columns:
            _numeric(table[column], column, src, row)


def _numeric(series: pd.Series, column: str, src: str, row: str = "particle") -> np.ndarray:
    """A column as float64, or a UserError naming the row, the column and its value."""
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"{row} {i + 1} of {src}: {column} is {series.iloc[i]}, not a finite number"
        )
    return values


def _complete(values: dict[str, np.ndarray], n: int) -> CtfParams:
    """CtfParams with absent optional fields set to zero."""
    for key in FIELDS:
        values.setdefault(key, np.zeros(n))
    return CtfParams(**{k: np.asarray(values[k], dtype=np.float64) for k in FIELDS})
