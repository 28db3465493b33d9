"""Embedding results to files: RELION 3.1 stars (input rows and their text kept, image paths
valid from the working directory, RELION's project folder), the full-size star of `--original`
(rows matched), cryoSPARC .cs tables, the npz; all written under temporary names and renamed
together.

Pose export follows `tvae_em.geometry`: rlnAnglePsi = -degrees(theta) wrapped to (-180, 180],
rlnOriginX/YAngst = -t * pixel size; alignments2D carry the same alignment (pose rad, shift px).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .clustering import class_probabilities, soft_classes
from .errors import UserError
from .geometry import cryosparc_pose
from .inference import Embedding
from .io import (
    PHASE_FLIPPED,
    SOURCE_ROW,
    ParticleStack,
    StarText,
    atomic_paths,
    check_writable_dir,
    dataframe_to_cs,
    ensure_writable_dir,
    stack_reference,
    write_cs,
    write_star,
)
from .io.cs import cs_array, merge_fields, particle_uids, relion31_to_cs

Z_PREFIX = "tvaeZ"
Z_SD_PREFIX = "tvaeZsd"
CONFIDENCE = "tvaePoseConfidence"
ELBO = "tvaeElbo"
# RELION's per-particle probability of its best class (and pose) in a 2D classification; written
# as the posterior probability of the particle's class where embed has one (class_log_post)
CLASS_PROBABILITY = "rlnMaxValueProbDistribution"
POSE_COLUMNS = ["rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst"]
CS_ALIGN = "alignments2D/"
KEPT_TVAE = {SOURCE_ROW, PHASE_FLIPPED}  # tvae columns of the input that embed leaves as they are


def embedding_columns(emb: Embedding) -> pd.DataFrame:
    """The columns embed adds to a particle table (one row per particle)."""
    psi, origin = emb.relion_pose()
    labels = emb.labels
    cols: dict[str, np.ndarray] = {
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
    }
    if labels is not None:
        cols["rlnClassNumber"] = labels.astype(np.int64)
    own = emb.class_probability()
    if own is not None:
        cols[CLASS_PROBABILITY] = own
    for j in range(emb.z_mu.shape[1]):
        cols[f"{Z_PREFIX}{j + 1}"] = emb.z_mu[:, j].astype(np.float64)
    for j in range(emb.z_sd.shape[1]):
        cols[f"{Z_SD_PREFIX}{j + 1}"] = emb.z_sd[:, j].astype(np.float64)
    cols[CONFIDENCE] = emb.confidence.astype(np.float64)
    if not np.isnan(emb.elbo).all():  # not computed (--no-elbo): no column
        cols[ELBO] = emb.elbo.astype(np.float64)
    return pd.DataFrame(cols)


def replace_columns(particles: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Input particles with pose (and class, when new has one) and old tvae columns replaced."""
    drop = [c for c in particles.columns if c in POSE_COLUMNS or c in new.columns]
    drop += [c for c in particles.columns if c.startswith("tvae") and c not in KEPT_TVAE]
    kept = particles.drop(columns=sorted(set(drop))).reset_index(drop=True)
    return pd.concat([kept, new.reset_index(drop=True)], axis=1)


@dataclass
class OutputPlan:
    """Final paths of every file embed writes (None: not written)."""

    star: Path
    npz: Path
    original_star: Path | None
    cs: Path | None

    def paths(self) -> list[Path]:
        return [p for p in (self.star, self.npz, self.original_star, self.cs) if p is not None]


def plan_outputs(
    out_star: str | os.PathLike,
    npz_out: str | os.PathLike | None,
    cs_out: str | os.PathLike | None,
    original_out: str | os.PathLike | None,
    with_original: bool,
    inputs: list[str | os.PathLike],
) -> OutputPlan:
    """Output paths checked before any work: suffixes, distinct, not an input, folders writable."""
    star = Path(out_star)
    plan = OutputPlan(
        star=star,
        npz=Path(npz_out) if npz_out else star.with_suffix(".npz"),
        original_star=(
            (Path(original_out) if original_out else star.with_name(f"{star.stem}_original.star"))
            if with_original
            else None
        ),
        cs=Path(cs_out) if cs_out else None,
    )
    named = [("-o", plan.star, ".star"), ("--npz", plan.npz, ".npz"), ("--cs", plan.cs, ".cs")]
    named.append(("--original-out", plan.original_star, ".star"))
    seen = {os.path.abspath(p) for p in inputs if p is not None}
    for option, path, suffix in named:
        if path is not None:
            check_output_path(option, path, suffix, seen)
    return plan


def check_output_path(option: str, path: Path, suffix: str, taken: set[str]) -> None:
    """UserError unless `path` ends in `suffix`, is none of the absolute paths `taken` (inputs,
    other outputs; it is added) and its folder can be written: the check of every output file."""
    if path.suffix.lower() != suffix:
        raise UserError(f"{option} {path}: the file name must end in {suffix}")
    if os.path.abspath(path) in taken:
        raise UserError(f"{option} {path}: would overwrite an input or another output")
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder, expected a file name")
    taken.add(os.path.abspath(path))
    try:
        check_writable_dir(path.parent if str(path.parent) else Path("."))
    except UserError as e:
        raise UserError(f"{option} {path}: {e}") from None


def open_original(path: str, datadir, stack, optics=None) -> tuple[object, np.ndarray]:
    """The full-size ParticleStack and, for each particle of `stack`, its row there (n,)."""
    orig = ParticleStack.open(path, datadir=datadir, optics=optics)
    return orig, match_rows(orig.particles, stack.particles, path, str(stack.source))


MATCH_KEYS = (("uid",), ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"))


def match_rows(
    orig: pd.DataFrame, prep: pd.DataFrame, orig_name: str, prep_name: str
) -> np.ndarray:
    """Row of `orig` for each row of `prep` (n,): by the SOURCE_ROW column preprocess writes when
    `prep` has it, else the same order when the counts agree, else matched on uid or on
    micrograph + coordinates (particles dropped by preprocess --skip-bad). The keys that both
    have (uid, micrograph + coordinates) must agree on every matched row."""
    keys = next((k for k in MATCH_KEYS if set(k) <= set(orig) and set(k) <= set(prep)), None)
    a = _key_strings(orig, keys) if keys else None
    b = _key_strings(prep, keys) if keys else None
    if SOURCE_ROW in prep:
        rows = _source_rows(prep[SOURCE_ROW], len(orig), orig_name, prep_name)
        if keys is not None:
            wrong = a.to_numpy()[rows] != b.to_numpy()
            if wrong.any():
                i = int(np.argmax(wrong))
                raise UserError(
                    f"--original {orig_name}: particle {i + 1} of {prep_name} came from row "
                    f"{rows[i] + 1} but that row has another {', '.join(keys)} (give the star "
                    f"{prep_name} was preprocessed from)"
                )
        return rows
    if len(orig) == len(prep) and (keys is None or (a == b).all()):
        return np.arange(len(prep))
    if keys is None or a.duplicated().any():
        raise UserError(
            f"--original {orig_name}: cannot match its {len(orig)} particles to the {len(prep)} of "
            f"{prep_name} (give the star {prep_name} was preprocessed from)"
        )
    lookup = pd.Series(np.arange(len(orig)), index=a.to_numpy())
    rows = lookup.reindex(b.to_numpy())
    if rows.isna().any():
        i = int(np.argmax(rows.isna().to_numpy()))
        raise UserError(
            f"--original {orig_name}: particle {i + 1} of {prep_name} is not in it "
            f"(no row with the same {', '.join(keys)})"
        )
    return rows.to_numpy(np.int64)


def _source_rows(column: pd.Series, n: int, orig_name: str, prep_name: str) -> np.ndarray:
    """0-based rows of the original from a SOURCE_ROW column; UserError naming the first
    particle whose row is not a whole number from 1 to ``n``."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(values) & (values == np.round(values)) & (values >= 1) & (values <= n))
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"--original {orig_name}: particle {i + 1} of {prep_name} came from row "
            f"{column.iloc[i]} of its input ({SOURCE_ROW}) but {orig_name} has {n} rows "
            f"(give the star {prep_name} was preprocessed from)"
        )
    return values.astype(np.int64) - 1


def _key_strings(df: pd.DataFrame, keys: tuple[str, ...]) -> pd.Series:
    """One string per row identifying the particle, the same whether a number was read as an
    integer or a float (3277 and 3277.000000; coordinates rounded to 0.01 px)."""
    parts = []
    for k in keys:
        col = df[k].reset_index(drop=True)
        numbers = pd.to_numeric(col, errors="coerce")
        if k.startswith("rlnCoordinate"):
            col = numbers.round(2).map("{:.2f}".format)
        elif pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_integer_dtype(col):
            col = numbers.map("{:.10g}".format)
        parts.append(col.astype(str))
    out = parts[0]
    for p in parts[1:]:
        out = out + "|" + p
    return out


def particle_star_tables(
    stack, new: pd.DataFrame, rows: np.ndarray | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, StarText | None]:
    """RELION 3.1 (particles, optics) of `stack` (its `rows`, in that order) with the embed
    columns in place and image names valid from the working directory, and the input's text
    of those rows (to write carried values back as read)."""
    rows = np.arange(len(stack)) if rows is None else rows
    particles, optics = stack.relion31_tables()
    particles = particles.iloc[rows].reset_index(drop=True)
    particles["rlnImageName"] = rebase_image_names(particles["rlnImageName"], stack, rows)
    return replace_columns(particles, new), optics, stack.star_text(rows)


def rebase_image_names(names: pd.Series, stack, rows: np.ndarray) -> pd.Series:
    """rlnImageName whose stack part finds the stack file from the working directory (RELION's
    project folder): kept verbatim when it already does, else `io.project_path` of the file
    (relative to the working directory when under it, else absolute)."""
    names = names.astype(str)
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna()
    old = parts[1].where(has_at, parts[0])
    files = np.asarray(stack.files, dtype=object)
    target = files[stack.file_index[rows]]  # (n,) resolved stack of each particle
    fixed = {}
    for name, path in set(zip(old, target, strict=True)):
        fixed[name, path] = stack_reference(name, path)
    new = pd.Series([fixed[k] for k in zip(old, target, strict=True)], index=names.index)
    return (parts[0] + "@" + new).where(has_at, new)


# alignments2D fields tvae-em does not measure, with the values that mean "not measured" (those
# of cryoSPARC's own 2D classification where it leaves a field unused: split, error_min, resid_pow,
# weight, pose_ess, shift_ess 0 and alpha 1).
ALIGNMENTS2D_UNMEASURED = {
    f"{CS_ALIGN}{name}": value
    for name, value in [
        ("split", 0),
        ("error", 0.0),
        ("error_min", 0.0),
        ("resid_pow", 0.0),
        ("slice_pow", 0.0),
        ("image_pow", 0.0),
        ("cross_cor", 0.0),
        ("alpha", 1.0),
        ("alpha_min", 1.0),
        ("weight", 0.0),
        ("pose_ess", 0.0),
        ("shift_ess", 0.0),
    ]
}


def check_cs_source(stack: ParticleStack, option: str = "--cs") -> None:
    """UserError, before any work, when a .cs of ``stack`` would be of no use to cryoSPARC: a star
    or stack without defocus (no ctf/* to write) or with phase-flipped images."""
    if stack.writes_cs:
        return
    params = stack.ctf_params()
    if params is None:
        raise UserError(
            f"{option}: {stack.source} has no defocus (rlnDefocusU), so the .cs would have no "
            "ctf/* fields and cryoSPARC could not use it (give --original with the star that has "
            "the CTF)"
        )
    if params.phase_flipped is not None and (params.phase_flipped > 0.5).any():
        raise UserError(
            f"{option}: the images of {stack.source} are phase-flipped (preprocess --phase-flip) "
            "and cryoSPARC would correct their CTF again; give --original with the raw star"
        )


def cs_table(stack: ParticleStack, emb: Embedding, rows: np.ndarray) -> np.ndarray:
    """cryoSPARC structured array of `stack`'s `rows` (docs/outputs.md): every field of a .cs
    input kept verbatim, else uid, blob/* and ctf/* from the star (`star_cs_fields`, stack paths
    as in a star: from the working directory); then the alignments2D/* of a 2D classification,
    shifts in pixels of that stack (input alignments2D/* replaced)."""
    if stack.writes_cs:
        base = dataframe_to_cs(*stack.cs_fields(rows))
    else:
        base = star_cs_fields(stack, rows)
    kept = [n for n in base.dtype.names if not n.startswith(CS_ALIGN)]
    return merge_fields(base[kept], alignments2d_fields(emb, stack.apix[rows]))


def star_cs_fields(stack: ParticleStack, rows: np.ndarray) -> np.ndarray:
    """uid, blob/* and ctf/* of a star's (or bare stack's) particles ``rows``: the uid from each
    particle's rlnImageName as read (`particle_uids`), blob/path the stack part of the image name
    a written star gets (`rebase_image_names`)."""
    particles, optics = stack.relion31_tables()
    uid = particle_uids(particles["rlnImageName"])[rows]
    particles = particles.iloc[rows].reset_index(drop=True)
    particles["rlnImageName"] = rebase_image_names(particles["rlnImageName"], stack, rows)
    files = stack.stack_paths[rows]
    return relion31_to_cs(particles, optics, uid, files, str(stack.source))


def alignments2d_fields(emb: Embedding, psize: np.ndarray) -> np.ndarray:
    """The alignments2D/* fields of a cryoSPARC 2D classification for the embedding: pose
    (radians) and shift (pixels of size ``psize`` (n,)) by `geometry.cryosparc_pose`, class
    (0-based; 0 for all without classes) with its posterior probability and the effective number
    of classes (class_posterior, class_ess: `clustering.class_probabilities` of the class posterior
    `Embedding.class_log_post` where there is one, else of `clustering.soft_classes`' soft reading
    of the classes in z) and `ALIGNMENTS2D_UNMEASURED` for the rest."""
    psi, origin = emb.relion_pose()
    pose, shift = cryosparc_pose(psi, origin, psize)
    labels = emb.labels if emb.labels is not None else np.ones(len(emb), np.int64)
    if emb.labels is not None and emb.class_log_post is not None:
        posterior, ess = class_probabilities(emb.class_log_post, labels)
    else:
        posterior, ess = soft_classes(emb.z_mu, emb.z_sd, labels)
    columns = {
        **ALIGNMENTS2D_UNMEASURED,
        f"{CS_ALIGN}shift": shift,
        f"{CS_ALIGN}pose": pose,
        f"{CS_ALIGN}psize_A": np.asarray(psize, dtype=np.float64),
        f"{CS_ALIGN}class": np.asarray(labels, dtype=np.int64) - 1,
        f"{CS_ALIGN}class_posterior": posterior,
        f"{CS_ALIGN}class_ess": ess,
    }
    return cs_array(columns, len(emb))


def write_outputs(plan: OutputPlan, tables: dict[str, object]) -> None:
    """Write every planned file under temporary names, then rename them all (none on failure)."""
    paths = plan.paths()
    for path in paths:
        ensure_writable_dir(path.parent)
    with atomic_paths(paths) as tmps:
        tmp = dict(zip(map(str, paths), tmps, strict=True))
        _write_particle_star(tmp[str(plan.star)], tables["star"])
        with open(tmp[str(plan.npz)], "wb") as f:
            tables["npz"].save_npz(f)
        if plan.original_star is not None:
            _write_particle_star(tmp[str(plan.original_star)], tables["original_star"])
        if plan.cs is not None:
            write_cs(tmp[str(plan.cs)], tables["cs"])


def _write_particle_star(path: str, tables: tuple) -> None:
    """Write the (particles, optics, text) of `particle_star_tables`."""
    particles, optics, text = tables
    write_star(path, {"optics": optics, "particles": particles}, text=text)
