"""A subset of embedded particles (by class, pose confidence, ELBO quantile, z range), written
back as a RELION star (the embedded stack, or with `--original` the full-size particles) and as a
cryoSPARC .cs when the particles came from one: the whole of `tvae-em select` as a library call.

The criteria are read from the columns `tvae-em embed` wrote (rlnClassNumber, tvaePoseConfidence,
tvaeElbo, tvaeZ<d>); rows, image paths and origins follow `tvae_em.export`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .export import (
    CLASS_PROBABILITY,
    CONFIDENCE,
    ELBO,
    KEPT_TVAE,
    POSE_COLUMNS,
    Z_PREFIX,
    check_cs_source,
    check_output_path,
    cs_table,
    open_original,
    particle_star_tables,
)
from .inference import Embedding
from .io import (
    ParticleStack,
    atomic_paths,
    ensure_writable_dir,
    write_cs,
    write_star,
)

CLASS = "rlnClassNumber"


@dataclass
class SelectOptions:
    """Every option of `tvae-em select`."""

    input: str | os.PathLike
    out_star: str | os.PathLike
    classes: str | None = None
    min_confidence: float | None = None
    elbo_quantile: float | None = None
    z: tuple[str, ...] = ()
    original: str | os.PathLike | None = None
    cs_out: str | os.PathLike | None = None
    npz: str | os.PathLike | None = None
    datadir: str | os.PathLike | None = None


@dataclass
class ZRange:
    """Keep particles with lo <= tvaeZ<dim> <= hi (dim 1-based; None: unbounded)."""

    dim: int
    lo: float | None
    hi: float | None
    spec: str = ""


@dataclass
class Criteria:
    """The parsed selection: every field None (or empty) keeps everything."""

    classes: list[int] | None = None
    min_confidence: float | None = None
    elbo_quantile: float | None = None
    z: list[ZRange] = field(default_factory=list)


@dataclass
class SelectSummary:
    """How many particles were kept (of how many, per class) and the files written."""

    kept: int
    total: int
    per_class: dict[int, tuple[int, int]] = field(default_factory=dict)  # class -> (kept, total)
    outputs: list[Path] = field(default_factory=list)

    def line(self) -> str:
        """One-line summary for the terminal."""
        classes = ", ".join(f"class {c}: {k} of {n}" for c, (k, n) in self.per_class.items())
        files = ", ".join(str(p) for p in self.outputs)
        return (
            f"kept {self.kept} of {self.total} particles"
            + (f" ({classes})" if classes else "")
            + f" -> {files}"
        )


# ---------------------------------------------------------------- options


def parse_criteria(opts: SelectOptions) -> Criteria:
    """The options' selection, checked for syntax and range (UserError naming the option)."""
    crit = Criteria(min_confidence=opts.min_confidence, elbo_quantile=opts.elbo_quantile)
    if opts.classes is not None:
        try:
            crit.classes = sorted({int(c) for c in str(opts.classes).split(",") if c.strip()})
        except ValueError:
            raise UserError(f"--classes {opts.classes}: expected class numbers like 1,3") from None
        if not crit.classes or min(crit.classes) < 1:
            raise UserError(f"--classes {opts.classes}: class numbers start at 1")
    c = opts.min_confidence
    if c is not None and not (math.isfinite(c) and 0 <= c <= 1):
        raise UserError(f"--min-confidence {c}: must be a probability between 0 and 1")
    q = opts.elbo_quantile
    if q is not None and not (math.isfinite(q) and 0 <= q < 1):
        raise UserError(f"--elbo-quantile {q}: must be at least 0 and below 1 (0.1 drops 10%)")
    crit.z = [parse_z_range(spec) for spec in opts.z]
    return crit


def parse_z_range(spec: str) -> ZRange:
    """'2:-0.5:0.5' -> keep -0.5 <= tvaeZ2 <= 0.5; an empty bound is open ('1::0', '1:0:')."""
    parts = str(spec).split(":")
    usage = f"--z {spec}: expected DIM:MIN:MAX such as 1:-0.5:0.5 (a bound may be left empty)"
    if len(parts) != 3:
        raise UserError(usage)
    try:
        dim = int(parts[0])
        lo, hi = (float(p) if p.strip() else None for p in parts[1:])
    except ValueError:
        raise UserError(usage) from None
    if dim < 1:
        raise UserError(f"--z {spec}: dimensions start at 1")
    if any(b is not None and not math.isfinite(b) for b in (lo, hi)):
        raise UserError(usage)
    if lo is not None and hi is not None and lo > hi:
        raise UserError(f"--z {spec}: MIN {lo:g} is above MAX {hi:g}")
    return ZRange(dim, lo, hi, str(spec))


def keep_mask(particles: pd.DataFrame, crit: Criteria, name: str) -> np.ndarray:
    """(n,) bool: the particles that pass every criterion (UserError when a column is missing)."""
    keep = np.ones(len(particles), bool)
    if crit.classes is not None:
        labels = _column(particles, CLASS, name, "--classes", "embed with --classes K")
        present = sorted(set(labels[np.isfinite(labels)].astype(int).tolist()))
        absent = [c for c in crit.classes if c not in present]
        if absent:
            raise UserError(
                f"--classes: {name} has no class {absent[0]} (its classes: "
                f"{', '.join(map(str, present))})"
            )
        keep &= np.isin(labels, crit.classes)
    if crit.min_confidence is not None:
        confidence = _column(particles, CONFIDENCE, name, "--min-confidence", "embed it")
        keep &= confidence >= crit.min_confidence
    if crit.elbo_quantile is not None:
        elbo = _column(particles, ELBO, name, "--elbo-quantile", "embed without --no-elbo")
        keep &= elbo >= np.nanquantile(elbo, crit.elbo_quantile)
    n_z = sum(1 for c in particles.columns if c.startswith(Z_PREFIX) and c[5:].isdigit())
    for r in crit.z:
        spec = f"--z {r.spec}"
        if r.dim > n_z:
            raise UserError(f"{spec}: {name} has {n_z} latent dimensions ({Z_PREFIX}1..{n_z})")
        z = _column(particles, f"{Z_PREFIX}{r.dim}", name, spec, "embed it")
        lo, hi = (-np.inf if r.lo is None else r.lo), (np.inf if r.hi is None else r.hi)
        keep &= (z >= lo) & (z <= hi)
    return keep


def _column(particles: pd.DataFrame, column: str, name: str, option: str, fix: str) -> np.ndarray:
    if column not in particles:
        raise UserError(f"{option}: {name} has no {column} column ({fix})")
    return pd.to_numeric(particles[column], errors="coerce").to_numpy(np.float64)


# ---------------------------------------------------------------- the command


def select_particles(opts: SelectOptions) -> SelectSummary:
    """Write the particles of ``opts.input`` that pass every criterion; see docs/outputs.md.

    Every option is checked, and the selection made, before anything is written.
    """
    crit = parse_criteria(opts)
    input = Path(opts.input)
    if input.suffix.lower() != ".star":
        raise UserError(f"{input}: expected the .star written by tvae-em embed")
    stack = ParticleStack.open(input, datadir=opts.datadir)
    particles, _ = stack.relion31_tables()
    missing = [c for c in ("rlnAnglePsi", "rlnOriginXAngst", CONFIDENCE) if c not in particles]
    if missing:
        raise UserError(f"{input}: no {missing[0]} column (not written by tvae-em embed)")
    out = Path(opts.out_star)
    taken = {os.path.abspath(p) for p in (input, opts.original, opts.npz) if p is not None}
    check_output_path("-o", out, ".star", taken)
    orig, rows = (
        open_original(str(opts.original), opts.datadir, stack) if opts.original else (None, None)
    )
    target, target_rows = (orig, rows) if orig is not None else (stack, np.arange(len(stack)))
    cs = (
        Path(opts.cs_out) if opts.cs_out else (out.with_suffix(".cs") if target.writes_cs else None)
    )
    if cs is not None:
        check_output_path("--cs", cs, ".cs", taken)
    keep = keep_mask(particles, crit, str(input))
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise UserError(f"no particle of {input} passes the selection: nothing written")
    emb = _embedding(opts.npz, input, particles) if cs is not None else None
    if cs is not None:
        check_cs_source(target)

    new = particles[_embed_columns(particles)].iloc[kept].reset_index(drop=True)
    particles_out, optics, text = particle_star_tables(target, new, target_rows[kept])
    outputs = [out] if cs is None else [out, cs]
    cs_array = cs_table(target, _rows_of(emb, kept), target_rows[kept]) if cs else None
    ensure_writable_dir(out.parent)
    ensure_writable_dir(outputs[-1].parent)
    with atomic_paths(outputs) as tmps:
        write_star(tmps[0], {"optics": optics, "particles": particles_out}, text=text)
        if cs_array is not None:
            write_cs(tmps[1], cs_array)
    return SelectSummary(len(kept), len(stack), _per_class(particles, keep), outputs)


def _embed_columns(particles: pd.DataFrame) -> list[str]:
    """The columns embed wrote: pose, class, its posterior and tvae* (carried to the full-size
    star); not those embed leaves as they are (preprocess's, which describe EMBEDDED's stack)."""
    own = [c for c in [*POSE_COLUMNS, CLASS, CLASS_PROBABILITY] if c in particles]
    return own + [c for c in particles.columns if c.startswith("tvae") and c not in KEPT_TVAE]


def _embedding(npz, input: Path, particles: pd.DataFrame) -> Embedding:
    """The embed npz next to INPUT (or --npz), checked to belong to it (the .cs needs its poses)."""
    path = Path(npz) if npz else input.with_suffix(".npz")
    n_z = sum(1 for c in particles.columns if c.startswith(Z_PREFIX) and c[5:].isdigit())
    if not path.is_file():
        raise UserError(
            f"--npz {path}: file not found (the .cs needs the npz embed wrote with {input})"
        )
    try:
        emb = Embedding.load_npz(path, n_z)
    except UserError as e:
        raise UserError(str(e).replace("--embedding", "--npz", 1)) from None
    psi = pd.to_numeric(particles["rlnAnglePsi"], errors="coerce").to_numpy(np.float64)
    same = len(emb) == len(psi)
    if same:
        diff = (emb.relion_pose()[0] - psi + 180.0) % 360.0 - 180.0
        same = bool(np.all(np.abs(diff) < 1e-3))
    if not same:
        raise UserError(f"--npz {path}: its {len(emb)} poses are not those of {input}")
    return emb


def _rows_of(emb: Embedding, rows: np.ndarray) -> Embedding:
    """The Embedding of particles `rows` (in that order)."""
    values = {}
    for f in fields(emb):
        v = getattr(emb, f.name)
        values[f.name] = v[rows] if isinstance(v, np.ndarray) and v.ndim >= 1 else v
    return Embedding(**values)


def _per_class(particles: pd.DataFrame, keep: np.ndarray) -> dict[int, tuple[int, int]]:
    """class -> (kept, total), when the particles have classes."""
    if CLASS not in particles:
        return {}
    labels = pd.to_numeric(particles[CLASS], errors="coerce").fillna(0).astype(int).to_numpy()
    return {
        int(c): (int((keep & (labels == c)).sum()), int((labels == c).sum()))
        for c in np.unique(labels)
    }
