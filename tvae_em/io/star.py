"""RELION STAR files: read 3.0 and 3.1/4/5 particle stars (numbers and the text as read), write
named blocks atomically, writing back verbatim every value tvae-em did not change."""

from __future__ import annotations

import bisect
import csv
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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
_VERSION = re.compile(r"#\s*version\s+\d+\s*$")


@dataclass
class StarText:
    """A star file as text: every loop value as read, key-value blocks, and '#' comment lines.

    Kept next to the parsed numbers so writers can put back, unchanged, what tvae-em does not
    compute (`write_star(..., text=...)`). Block names have no ``data_``; comments under ``""``
    came before the first block. "# version" lines are not kept (the writer writes its own).
    """

    loops: dict[str, pd.DataFrame] = field(default_factory=dict)
    pairs: dict[str, dict[str, str]] = field(default_factory=dict)
    comments: dict[str, list[str]] = field(default_factory=dict)

    def renamed(self, names: dict[str, str]) -> StarText:
        """The same text with blocks renamed (``names``: old -> new; others kept)."""

        def rename(d: dict) -> dict:
            return {names.get(k, k): v for k, v in d.items()}

        return StarText(rename(self.loops), rename(self.pairs), rename(self.comments))

    def select(self, block: str, rows: np.ndarray) -> StarText:
        """The same text with only ``rows`` (0-based, in that order) of loop ``block``."""
        loops = dict(self.loops)
        if block in loops:
            picked = loops[block].iloc[np.asarray(rows, dtype=np.int64)]
            loops[block] = picked.reset_index(drop=True)
        return StarText(loops, dict(self.pairs), dict(self.comments))


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file: block name (no ``data_``) -> DataFrame (UserError if bad)."""
    return read_star_text(path)[0]


def read_star_text(path: str | os.PathLike) -> tuple[dict[str, pd.DataFrame], StarText]:
    """The loop blocks of a STAR file parsed (numbers as numbers, NAME_COLUMNS as text) and the
    whole file as `StarText`: one pass, the numbers derived from the text as starfile does."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"star file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8", errors="surrogateescape")
        text = StarText(comments=_comments(raw))
        for name, segment in _blocks(raw):
            kind, block = _parse_block(segment)
            if kind == "loop":
                text.loops[name] = block
            elif kind == "pairs":
                text.pairs[name] = block
    except UserError:
        raise
    except Exception as e:  # pandas raises assorted parser errors on malformed files
        raise UserError(f"cannot parse star file {path}: {e}") from None
    tables: dict[str, pd.DataFrame] = {}
    for name, block in text.loops.items():
        repeated = block.columns[block.columns.duplicated()]
        if len(repeated):
            raise UserError(
                f"star file {path}: column {repeated[0]} appears more than once in data_{name}"
            )
        tables[name] = _numeric_table(block)
    return tables, text


def _line_starts(raw: str, token: str) -> list[tuple[int, int]]:
    """(start of line, position of ``token``) for each line whose first non-blank text is
    ``token`` (found with str.find: fast on files of millions of lines)."""
    out, pos = [], raw.find(token)
    while pos >= 0:
        start = raw.rfind("\n", 0, pos) + 1
        if not raw[start:pos].strip(" \t"):
            out.append((start, pos))
        pos = raw.find(token, pos + 1)
    return out


def _blocks(raw: str) -> list[tuple[str, str]]:
    """(name, text after its ``data_`` line) of each block of a STAR file's text."""
    found = _line_starts(raw, "data_")
    out = []
    for i, (_, at) in enumerate(found):
        eol = raw.find("\n", at)
        eol = len(raw) if eol < 0 else eol
        name = raw[at + 5 : eol].split()[0] if raw[at + 5 : eol].split() else ""
        end = found[i + 1][0] if i + 1 < len(found) else len(raw)
        out.append((name, raw[eol + 1 : end] if eol < end else ""))
    return out


def _parse_block(segment: str) -> tuple[str, pd.DataFrame | dict[str, str] | None]:
    """("loop", table of text) or ("pairs", key -> text) or ("empty", None) of one block body."""
    pos, labels, loop, pairs = 0, [], False, {}
    while pos < len(segment):
        end = segment.find("\n", pos)
        end = len(segment) if end < 0 else end
        line = segment[pos:end].strip()
        if not line or line.startswith("#"):
            pos = end + 1
            continue
        if line.startswith("loop_") and not loop and not pairs:
            loop = True
        elif line.startswith("_") and loop:
            labels.append(line.split()[0][1:])
        elif line.startswith("_"):
            key, *value = shlex.split(line, comments=False)
            pairs[key[1:]] = value[0] if value else ""
        else:
            break  # the first data line of a loop
        pos = end + 1
    if not loop:
        return ("pairs", pairs) if pairs else ("empty", None)
    data = segment[pos:]
    if not data.strip():
        return "loop", pd.DataFrame({label: pd.Series(dtype=object) for label in labels})
    table = pd.read_csv(
        io.StringIO(data.replace("'", '"')),
        sep=r"\s+",
        header=None,
        comment="#",
        dtype=object,
        keep_default_na=False,
        na_values=["nan", "NaN", "<NA>"],
        engine="c",
    )
    table.columns = labels
    return "loop", table.astype(object).where(table.notna(), "nan")


def _numeric_table(block: pd.DataFrame) -> pd.DataFrame:
    """Columns as numbers where every value is one (starfile's rule), names kept as text."""
    out = block.copy()
    for column in out.columns:
        if column in NAME_COLUMNS or not len(out):
            continue
        try:
            values = pd.to_numeric(out[column])
        except (ValueError, TypeError):
            continue
        if not values.isna().all() or (out[column] == "nan").all():
            out[column] = values  # (a column of empty strings stays text, as starfile keeps it)
    return out


def _comments(raw: str) -> dict[str, list[str]]:
    """'#' lines of a STAR file's text by the block they are in ("" before the first)."""
    starts = [start for start, _ in _line_starts(raw, "data_")]
    names = [name for name, _ in _blocks(raw)] if starts else []
    out: dict[str, list[str]] = {}
    for start, at in _line_starts(raw, "#"):
        eol = raw.find("\n", at)
        line = raw[at : len(raw) if eol < 0 else eol].rstrip()
        if _VERSION.match(line):
            continue
        k = bisect.bisect_right(starts, start) - 1
        out.setdefault(names[k] if k >= 0 else "", []).append(line)
    return out


def read_particles_star(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """The particle table, the optics table (or None) and the kind ("relion30" / "relion31").

    RELION 3.1+ has ``data_optics`` and ``data_particles`` in either order; RELION 3.0 has a single
    particle block (often ``data_`` or ``data_images``). The particle block must have rlnImageName.
    """
    return read_particles_star_text(path)[:3]


def read_particles_star_text(
    path: str | os.PathLike,
) -> tuple[pd.DataFrame, pd.DataFrame | None, str, StarText]:
    """As `read_particles_star`, plus the file's `StarText` with the particle block named
    ``particles`` (and the optics block ``optics``), ready to write back."""
    blocks, text = read_star_text(path)
    optics = blocks.get("optics")
    name = "particles"
    if "particles" not in blocks:
        candidates = [k for k, b in blocks.items() if k != "optics" and "rlnImageName" in b]
        others = [k for k in blocks if k != "optics"]
        if not (candidates or others):
            raise UserError(f"star file {path} has no particle block")
        name = (candidates or others)[0]
    particles = blocks[name]
    if len(particles) == 0:
        raise UserError(f"star file {path} has no particles (empty particle block)")
    if "rlnImageName" not in particles.columns:
        raise UserError(f"star file {path} has no rlnImageName column: it does not point at images")
    if optics is not None and len(optics) == 0:
        optics = None
    kind = "relion31" if optics is not None else "relion30"
    text = text.renamed({name: "particles", "particles": name} if name != "particles" else {})
    text.loops["particles"] = text.loops["particles"].reset_index(drop=True)
    return particles.reset_index(drop=True), optics, kind, text


def _quote(col: pd.Series) -> pd.Series:
    """STAR-quote strings that are empty or contain whitespace."""
    s = col.astype(str)
    needs = (s == "") | s.str.contains(r"\s", regex=True)
    return s.where(~needs, '"' + s + '"')


def verbatim(df: pd.DataFrame, text: pd.DataFrame | None, float_format: str) -> pd.DataFrame:
    """``df`` with each value that equals its text in ``text`` (same row, same column) replaced
    by that text: carried columns come back as read ("007", "3277.000000", "True")."""
    if text is None or len(text) != len(df):
        return df
    out = df.reset_index(drop=True).copy()
    text = text.reset_index(drop=True)
    for column in [c for c in out.columns if c in text.columns]:
        values, raw = out[column], text[column]
        if pd.api.types.is_bool_dtype(values):
            values = values.astype(np.int64)
        if pd.api.types.is_numeric_dtype(values):
            parsed = pd.to_numeric(raw, errors="coerce")
            same = (parsed == values) | (parsed.isna() & values.isna() & (raw.str.lower() == "nan"))
        else:
            same = raw == values.astype(str)
        if same.all():
            out[column] = raw
        elif same.any():
            out[column] = raw.where(same, _formatted(values, float_format))
    return out


def _formatted(values: pd.Series, float_format: str) -> pd.Series:
    """Values as the writer would print them."""
    if pd.api.types.is_float_dtype(values):
        return pd.Series([float_format % v for v in values], index=values.index)
    return values.astype(str)


def _write_loop(f, name: str, df: pd.DataFrame, float_format: str, comments=()) -> None:
    """Write one named loop block (and its comment lines) to the open text file ``f``."""
    f.write(f"\ndata_{name}\n\n")
    for line in comments:
        f.write(line + "\n")
    f.write("loop_\n")
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


def _write_pairs(f, name: str, pairs: dict[str, str], comments=()) -> None:
    """Write one key-value block, values as text."""
    f.write(f"\ndata_{name}\n\n")
    for line in comments:
        f.write(line + "\n")
    quoted = _quote(pd.Series(list(pairs.values()), dtype=object))
    for key, value in zip(pairs, quoted, strict=True):
        f.write(f"_{key} {value}\n")


def write_star(
    path: str | os.PathLike,
    blocks: dict[str, pd.DataFrame],
    float_format: str = FLOAT_FORMAT,
    text: StarText | None = None,
) -> None:
    """Write named loop blocks as a RELION 3.1 STAR file (``# version 30001``), atomically.

    With ``text`` (the input's `StarText`, its loops row-aligned with ``blocks``), every value
    still equal to the input's is written as its input text, the input's comments are kept in
    their blocks, and its other blocks follow unchanged. Block names are written as
    ``data_<name>``; an empty name is refused because RELION finds no particles in a bare
    ``data_`` block next to an optics block.
    """
    for name in blocks:
        if not name:
            raise ValueError("write_star needs named blocks (e.g. 'optics', 'particles')")
    text = text or StarText()
    with (
        atomic_path(path) as tmp,
        open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f,
    ):
        f.write(VERSION_LINE + "\n")
        for line in text.comments.get("", []):
            f.write(line + "\n")
        for name, df in blocks.items():
            table = verbatim(df, text.loops.get(name), float_format)
            _write_loop(f, name, table, float_format, text.comments.get(name, []))
        for name, loop in text.loops.items():
            if name and name not in blocks:
                _write_loop(f, name, loop, float_format, text.comments.get(name, []))
        for name, pairs in text.pairs.items():
            if name and name not in blocks:
                _write_pairs(f, name, pairs, text.comments.get(name, []))
