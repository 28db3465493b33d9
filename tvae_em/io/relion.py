"""RELION table conventions: optics groups (with RELION's defaults for what the input lacks),
3.0 -> 3.1 conversion, origins in Angstrom, and image paths from RELION's project folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError

# Per-particle columns of a RELION 3.0 star that belong to the optics group in 3.1.
OPTICS_FROM_PARTICLES = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
# Columns made stale by the optics table (pixel size now in rlnImagePixelSize).
STALE_PIXEL_SIZE = ["rlnMagnification", "rlnDetectorPixelSize"]
# Particle column written by preprocess: the 1-based row of the particle in its input.
SOURCE_ROW = "tvaeSourceRow"
# RELION reads "N@x.mrc" as a 3D map and refuses it; "N@x.mrc:mrcs" forces the stack format.
STACK_FORMAT_SUFFIXES = (":mrcs", ":mrc")


@dataclass(frozen=True)
class OpticsDefaults:
    """Optics values for inputs that have none (a bare stack, a star without them): RELION's
    own defaults (300 kV, Cs 2.7 mm, amplitude contrast 0.1). Never override the input's."""

    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1

    def __post_init__(self) -> None:
        if not (np.isfinite(self.voltage) and self.voltage > 0):
            raise UserError(f"--voltage must be a positive number of kV, got {self.voltage}")
        if not np.isfinite(self.spherical_aberration):
            raise UserError(
                f"--spherical-aberration must be a number of mm, got {self.spherical_aberration}"
            )
        if not (np.isfinite(self.amplitude_contrast) and 0 <= self.amplitude_contrast < 1):
            raise UserError(
                f"--amplitude-contrast must be in [0, 1), got {self.amplitude_contrast}"
            )

    def values(self) -> dict[str, float]:
        """RELION label -> value."""
        return dict(
            zip(
                OPTICS_FROM_PARTICLES,
                (self.voltage, self.spherical_aberration, self.amplitude_contrast),
                strict=True,
            )
        )


def complete_optics(
    optics: pd.DataFrame, box: int, defaults: OpticsDefaults | None = None
) -> pd.DataFrame:
    """An optics table with every column RELION 3.1 needs: voltage, Cs and amplitude contrast
    (``defaults`` where absent), rlnImageSize, rlnImageDimensionality, group number and name."""
    out = optics.copy()
    if "rlnOpticsGroup" not in out:
        out.insert(0, "rlnOpticsGroup", np.arange(1, len(out) + 1, dtype=np.int64))
    if "rlnOpticsGroupName" not in out:
        out["rlnOpticsGroupName"] = [f"opticsGroup{int(g)}" for g in out["rlnOpticsGroup"]]
    for column, value in (defaults or OpticsDefaults()).values().items():
        if column not in out:
            out[column] = float(value)
    if "rlnImageSize" not in out:
        out["rlnImageSize"] = int(box)
    if "rlnImageDimensionality" not in out:
        out["rlnImageDimensionality"] = 2
    return out


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
    particles: pd.DataFrame,
    apix: np.ndarray,
    box: int,
    key: np.ndarray | None = None,
    defaults: OpticsDefaults | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Optics groups (1-based group per particle, optics table) from per-particle values.

    One group per distinct (key, pixel size, voltage, Cs, amplitude contrast) among the columns
    present; ``key`` is an extra grouping array (e.g. cryoSPARC's exposure group). Voltage, Cs
    and amplitude contrast missing from ``particles`` come from ``defaults`` (RELION's).
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
    return group.astype(np.int64), complete_optics(optics, box, defaults)


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
    particles: pd.DataFrame, apix: np.ndarray, box: int, defaults: OpticsDefaults | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Convert a RELION 3.0 particle table to a 3.1 (particles, optics) pair.

    Optics groups are built from the per-particle pixel size, voltage, Cs and amplitude contrast;
    pixel origins become Angstrom origins; rlnMagnification/rlnDetectorPixelSize are dropped
    (the pixel size now lives in the optics table). Every other column is kept.
    """
    group, optics = build_optics(particles, apix, box, defaults=defaults)
    out = origins_to_angstrom(particles, apix)
    out = out.drop(columns=STALE_PIXEL_SIZE, errors="ignore")
    out["rlnOpticsGroup"] = group
    return out, optics


def project_path(path: str | os.PathLike) -> str:
    """How a star written now names the file ``path`` so RELION finds it from its project
    folder (the working directory): relative to it when the file is under it, else absolute."""
    cwd = os.getcwd()
    for p, base in ((os.path.abspath(path), cwd), (os.path.realpath(path), os.path.realpath(cwd))):
        if os.path.commonpath([p, base]) == base:
            return os.path.relpath(p, base)
    return os.path.abspath(path)


def stack_file(name: str) -> str:
    """The file of a RELION stack name, without its format suffix: ``x.mrc:mrcs`` -> ``x.mrc``."""
    for suffix in STACK_FORMAT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def stack_reference(name: str, path: str | os.PathLike) -> str:
    """``name`` (a stack path as read) if RELION would find the file ``path`` by it from the
    working directory, else `project_path` of ``path``; a ``.mrc`` stack gets ``:mrcs``, without
    which RELION refuses to read it as a stack."""
    candidate = Path(stack_file(name))
    if candidate.is_file() and os.path.samefile(candidate, path):
        ref = stack_file(name)
    else:
        ref = project_path(path)
    return ref + ":mrcs" if ref.lower().endswith(".mrc") else ref
