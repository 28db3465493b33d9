"""RELION table conventions: optics groups, 3.0 -> 3.1 conversion, origins in Angstrom."""

from __future__ import annotations

import numpy as np
import pandas as pd

# Per-particle columns of a RELION 3.0 star that belong to the optics group in 3.1.
OPTICS_FROM_PARTICLES = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
# Columns made stale by the optics table (pixel size now in rlnImagePixelSize).
STALE_PIXEL_SIZE = ["rlnMagnification", "rlnDetectorPixelSize"]


def pixel_size_columns(table: pd.DataFrame) -> list[str] | None:
    """The columns a RELION 3.0 table's pixel size comes from, or None when it has none."""
    if "rlnImagePixelSize" in table:
        return ["rlnImagePixelSize"]
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        return ["rlnDetectorPixelSize", "rlnMagnification"]
    return None


def pixel_size_from_relion30(particles: pd.DataFrame) -> np.ndarray | None:
    """Per-particle pixel size (Angstrom) of a RELION 3.0 table, or None when it has none.

    RELION 3.0: rlnDetectorPixelSize (micrometre) * 1e4 / rlnMagnification. A non-standard
    per-particle rlnImagePixelSize is accepted too. Values that are not positive numbers become
    NaN (`ParticleStack.open` refuses them, naming the particle).
    """
    columns = pixel_size_columns(particles)
    if columns is None:
        return None
    values = [pd.to_numeric(particles[c], errors="coerce").to_numpy(np.float64) for c in columns]
    apix = values[0]
    if len(values) == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            apix = values[0] * 1e4 / values[1]
    return np.where(np.isfinite(apix) & (apix > 0), apix, np.nan)


def build_optics(
    particles: pd.DataFrame, apix: np.ndarray, box: int, key: np.ndarray | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Optics groups (1-based group per particle, optics table) from per-particle values.

    One group per distinct (key, pixel size, voltage, Cs, amplitude contrast) among the columns
    present; ``key`` is an extra grouping array (e.g. cryoSPARC's exposure group).
    """
    table = pd.DataFrame({"rlnImagePixelSize": np.asarray(apix, dtype=np.float64)})
    for column in OPTICS_FROM_PARTICLES:
        if column in particles:
            table[column] = particles[column].to_numpy(np.float64)
    cols = list(table.columns)
    if key is not None:
        table["_key"] = np.asarray(key)
        cols = ["_key", *cols]
    group = table.groupby(cols, sort=True, dropna=False).ngroup().to_numpy() + 1
    first = table.assign(_g=group).drop_duplicates("_g").sort_values("_g")
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": first["_g"].to_numpy(np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in first["_g"]],
        }
    )
    for column in [c for c in table.columns if c != "_key"]:
        optics[column] = first[column].to_numpy()
    optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    return group.astype(np.int64), optics


def origins_to_angstrom(particles: pd.DataFrame, apix: np.ndarray) -> pd.DataFrame:
    """Replace pixel-unit rlnOriginX/Y by rlnOriginXAngst/YAngst (RELION 3.1 ignores the former).

    ``apix`` is the per-particle pixel size of the stack the pixel origins refer to. Existing
    Angstrom columns win; the pixel columns are dropped either way because they go stale
    when the stack is rescaled.
    """
    out = particles.copy()
    for axis in "XY":
        px, angst = f"rlnOrigin{axis}", f"rlnOrigin{axis}Angst"
        if px in out and angst not in out:
            out[angst] = out[px].to_numpy(np.float64) * np.asarray(apix, dtype=np.float64)
        out = out.drop(columns=[px], errors="ignore")
    return out


def relion30_to_31(
    particles: pd.DataFrame, apix: np.ndarray, box: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Convert a RELION 3.0 particle table to a 3.1 (particles, optics) pair.

    Optics groups are built from the per-particle pixel size, voltage, Cs and amplitude contrast;
    pixel origins become Angstrom origins; rlnMagnification/rlnDetectorPixelSize are dropped
    (the pixel size now lives in the optics table). Every other column is kept.
    """
    group, optics = build_optics(particles, apix, box)
    out = origins_to_angstrom(particles, apix)
    out = out.drop(columns=STALE_PIXEL_SIZE, errors="ignore")
    out["rlnOpticsGroup"] = group
    return out, optics
