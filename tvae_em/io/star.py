"""RELION STAR files: read 3.0 and 3.1/4/5 particle stars, write named blocks atomically."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import UserError
from .atomic import atomic_path

# Columns holding names: read verbatim ("000001@x.mrcs", "01") instead of as numbers.
NAME_COLUMNS = [
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnMicrographName",
    "rlnMicrographMovieName",
    "rlnMicrographOriginalName",
    "rlnOpticsGroupName",
    "rlnGroupName",
    "rlnCtfImage",
    "rlnReferenceImage",
    "rlnOriginalParticleName",
    "rlnTomoName",
    "rlnTomoParticleName",
]
VERSION_LINE = "# version 30001"
FLOAT_FORMAT = "%.10g"


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file: block name (no ``data_``) -> DataFrame (UserError if bad)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"star file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True, parse_as_string=NAME_COLUMNS)
    except Exception as e:  # starfile raises assorted parser errors on malformed files
        raise UserError(f"cannot parse star file {path}: {e}") from None
    tables = {name: b for name, b in blocks.items() if isinstance(b, pd.DataFrame)}
    for name, table in tables.items():
        repeated = table.columns[table.columns.duplicated()]
        if len(repeated):
            raise UserError(
                f"star file {path}: column {repeated[0]} appears more than once in data_{name}"
            )
    return tables


def read_particles_star(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """The particle table, the optics table (or None) and the kind ("relion30" / "relion31").

    RELION 3.1+ has ``data_optics`` and ``data_particles`` in either order; RELION 3.0 has a single
    particle block (often ``data_`` or ``data_images``). The particle block must have rlnImageName.
    """
    blocks = read_star(path)
    optics = blocks.get("optics")
    if "particles" in blocks:
        particles = blocks["particles"]
    else:
        candidates = [b for name, b in blocks.items() if name != "optics" and "rlnImageName" in b]
        others = [b for name, b in blocks.items() if name != "optics"]
        if candidates:
            particles = candidates[0]
        elif others:
            particles = others[0]
        else:
            raise UserError(f"star file {path} has no particle block")
    if len(particles) == 0:
        raise UserError(f"star file {path} has no particles (empty particle block)")
    if "rlnImageName" not in particles.columns:
        raise UserError(f"star file {path} has no rlnImageName column: it does not point at images")
    if optics is not None and len(optics) == 0:
        optics = None
    kind = "relion31" if optics is not None else "relion30"
    return particles.reset_index(drop=True), optics, kind


def _quote(col: pd.Series) -> pd.Series:
    """STAR-quote strings that are empty or contain whitespace."""
    s = col.astype(str)
    needs = (s == "") | s.str.contains(r"\s", regex=True)
    return s.where(~needs, '"' + s + '"')


def _write_loop(f, name: str, df: pd.DataFrame, float_format: str) -> None:
    """Write one named loop block to the open text file ``f``."""
    f.write(f"\ndata_{name}\n\nloop_\n")
    for i, column in enumerate(df.columns, 1):
        f.write(f"_{column} #{i}\n")
    out = df.copy()
    for column in out.columns:
        if not (
            pd.api.types.is_numeric_dtype(out[column]) or pd.api.types.is_bool_dtype(out[column])
        ):
            out[column] = _quote(out[column])
        elif pd.api.types.is_bool_dtype(out[column]):
            out[column] = out[column].astype(np.int64)
    out.to_csv(
        f,
        sep="\t",
        header=False,
        index=False,
        float_format=float_format,
        na_rep="nan",
        quoting=csv.QUOTE_NONE,
        quotechar="\x1f",  # never in the data: our quoting is done by _quote
        escapechar="\\",
        lineterminator="\n",
    )
    f.write("\n")


def write_star(
    path: str | os.PathLike, blocks: dict[str, pd.DataFrame], float_format: str = FLOAT_FORMAT
) -> None:
    """Write named loop blocks as a RELION 3.1 STAR file (``# version 30001``), atomically.

    Block names are written as ``data_<name>``; an empty name is refused because RELION finds
    no particles in a bare ``data_`` block next to an optics block.
    """
    for name in blocks:
        if not name:
            raise ValueError("write_star needs named blocks (e.g. 'optics', 'particles')")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(VERSION_LINE + "\n")
        for name, df in blocks.items():
            _write_loop(f, name, df, float_format)
