"""cryoSPARC .cs particle tables (numpy structured arrays): read, convert, write back.

In the DataFrame form every field is a column; a multi-element field such as
``alignments2D/shift`` (2,) becomes columns ``alignments2D/shift[0]``, ``alignments2D/shift[1]``;
byte strings become str. :func:`dataframe_to_cs` reverses this.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..geometry import relion_from_cryosparc
from .atomic import atomic_path
from .relion import build_optics

REQUIRED = ("blob/path", "blob/idx")
NUMPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy (and so .cs) file
# The one mapping of cryoSPARC ctf/* fields to RELION labels (with the factor to RELION's units).
CTF_PARTICLE_FIELDS = {
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180 / np.pi),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0),
    "ctf/scale": ("rlnCtfScalefactor", 1.0),
}
CTF_OPTICS_FIELDS = {
    "ctf/accel_kv": "rlnVoltage",
    "ctf/cs_mm": "rlnSphericalAberration",
    "ctf/amp_contrast": "rlnAmplitudeContrast",
}
# RELION's value when a per-particle CTF column is absent (rlnDefocusV: rlnDefocusU).
RELION_CTF_DEFAULTS = {
    "rlnDefocusAngle": 0.0,
    "rlnPhaseShift": 0.0,
    "rlnCtfBfactor": 0.0,
    "rlnCtfScalefactor": 1.0,
}
# The layout (base dtype, shape) cryoSPARC gives each field tvae-em writes, in cryoSPARC's order,
# as in its own particle files (tests/test_cryosparc_tools.py compares them with real ones).
# "S" fields are byte strings as wide as their longest value.
BLOB_LAYOUT = {
    "blob/path": ("S", ()),
    "blob/idx": ("<u4", ()),
    "blob/shape": ("<u4", (2,)),
    "blob/psize_A": ("<f4", ()),
    "blob/sign": ("<f4", ()),
    "blob/import_sig": ("<u8", ()),
}
CTF_LAYOUT = {
    "ctf/type": ("S", ()),
    "ctf/exp_group_id": ("<u4", ()),
    "ctf/accel_kv": ("<f4", ()),
    "ctf/cs_mm": ("<f4", ()),
    "ctf/amp_contrast": ("<f4", ()),
    "ctf/df1_A": ("<f4", ()),
    "ctf/df2_A": ("<f4", ()),
    "ctf/df_angle_rad": ("<f4", ()),
    "ctf/phase_shift_rad": ("<f4", ()),
    "ctf/scale": ("<f4", ()),
    "ctf/scale_const": ("<f4", ()),
    "ctf/shift_A": ("<f4", (2,)),
    "ctf/tilt_A": ("<f4", (2,)),
    "ctf/trefoil_A": ("<f4", (2,)),
    "ctf/tetra_A": ("<f4", (4,)),
    "ctf/anisomag": ("<f4", (4,)),
    "ctf/bfactor": ("<f4", ()),
}
ALIGNMENTS2D_LAYOUT = {
    f"alignments2D/{name}": (base, shape)
    for name, base, shape in [
        ("split", "<u4", ()),
        ("shift", "<f4", (2,)),
        ("pose", "<f4", ()),
        ("psize_A", "<f4", ()),
        ("error", "<f4", ()),
        ("error_min", "<f4", ()),
        ("resid_pow", "<f4", ()),
        ("slice_pow", "<f4", ()),
        ("image_pow", "<f4", ()),
        ("cross_cor", "<f4", ()),
        ("alpha", "<f4", ()),
        ("alpha_min", "<f4", ()),
        ("weight", "<f4", ()),
        ("pose_ess", "<f4", ()),
        ("shift_ess", "<f4", ()),
        ("class_posterior", "<f4", ()),
        ("class", "<u4", ()),
        ("class_ess", "<f4", ()),
    ]
}
CS_LAYOUT = {"uid": ("<u8", ()), **BLOB_LAYOUT, **CTF_LAYOUT, **ALIGNMENTS2D_LAYOUT}
# Particles imported into cryoSPARC are dark on a light background (blob/sign -1), and the CTF
# fields no RELION column gives are zero, as in cryoSPARC's own imports of RELION stars.
IMPORTED_SIGN = -1.0
CTF_TYPE = "imported"
CTF_UNCONVERTED = {  # beam tilt, higher-order aberrations, anisotropic magnification
    f"ctf/{name}": 0.0
    for name in ("scale_const", "shift_A", "tilt_A", "trefoil_A", "tetra_A", "anisomag")
}
_SUB = re.compile(r"^(.*)\[(\d+)\]$")


def read_cs(path: str | os.PathLike) -> np.ndarray:
    """Load a .cs file as a structured array; UserError if it is not a cryoSPARC particle table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cryoSPARC file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(len(NUMPY_MAGIC))
    if magic != NUMPY_MAGIC:
        raise UserError(
            f"cannot read cryoSPARC file {path}: it is not a numpy array file (what a .cs is)"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"cannot read cryoSPARC file {path}: {e}") from None
    if arr.dtype.names is None or arr.ndim != 1:
        raise UserError(f"{path} is not a cryoSPARC table (not a 1-D numpy structured array)")
    missing = [f for f in REQUIRED if f not in arr.dtype.names]
    if missing:
        raise UserError(f"cryoSPARC file {path} has no {', '.join(missing)} field: no images")
    if len(arr) == 0:
        raise UserError(f"cryoSPARC file {path} has no particles")
    return arr


def cs_to_dataframe(arr: np.ndarray) -> pd.DataFrame:
    """Every field of a .cs array as DataFrame columns (subarrays split, bytes decoded)."""
    columns: dict[str, np.ndarray] = {}
    for name in arr.dtype.names:
        values = arr[name]
        if values.ndim > 1:
            flat = values.reshape(len(arr), -1)
            for i in range(flat.shape[1]):
                columns[f"{name}[{i}]"] = flat[:, i]
        elif values.dtype.kind == "S":
            columns[name] = np.char.decode(values, "utf-8", errors="replace").astype(object)
        else:
            columns[name] = values
    return pd.DataFrame(columns)


def _field_groups(columns: list[str]) -> dict[str, list[str]]:
    """Column names grouped by field: "f[0]", "f[1]" -> "f"; plain names map to themselves."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for c in columns:
        m = _SUB.match(c)
        field, i = (m.group(1), int(m.group(2))) if m else (c, -1)
        groups.setdefault(field, []).append((i, c))
    return {f: [c for _, c in sorted(v)] for f, v in groups.items()}


def _column_dtype(values: pd.Series) -> np.dtype:
    """numpy dtype for one column: strings become fixed-width bytes."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.to_numpy().dtype
    width = max(1, int(values.astype(str).str.encode("utf-8").str.len().max()))
    return np.dtype(f"S{width}")


def dataframe_to_cs(df: pd.DataFrame, template: np.dtype | None = None) -> np.ndarray:
    """Rebuild a structured array from :func:`cs_to_dataframe` columns (plus any new columns).

    Fields of ``template`` keep their dtype and shape (byte strings widened if needed) and order;
    other columns are appended with dtypes inferred from the DataFrame.
    """
    groups = _field_groups(list(df.columns))
    order = [f for f in (template.names if template is not None else ()) if f in groups]
    order += [f for f in groups if f not in order]
    dtypes = []
    for field in order:
        cols = groups[field]
        if template is not None and field in template.names:
            base, shape = template[field].base, template[field].shape
            if base.kind == "S":
                base = np.dtype(f"S{max(base.itemsize, _column_dtype(df[cols[0]]).itemsize)}")
        else:
            base = _column_dtype(df[cols[0]]) if len(cols) == 1 else df[cols].to_numpy().dtype
            shape = () if _SUB.match(cols[0]) is None else (len(cols),)
        dtypes.append((field, base, shape))
    out = np.zeros(len(df), dtype=dtypes)
    for field, base, shape in dtypes:
        cols = groups[field]
        if base.kind == "S":
            out[field] = df[cols[0]].astype(str).str.encode("utf-8").to_numpy()
        elif shape:
            out[field] = df[cols].to_numpy().astype(base).reshape(len(df), *shape)
        else:
            out[field] = df[cols[0]].to_numpy().astype(base)
    return out


def write_cs(path: str | os.PathLike, table: pd.DataFrame | np.ndarray, template=None) -> None:
    """Write a .cs file (``np.save`` of a structured array) atomically."""
    arr = table if isinstance(table, np.ndarray) else dataframe_to_cs(table, template)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def ctf_as_relion(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ctf/* fields present in a cryoSPARC table as RELION columns in RELION's units:
    (per-particle columns such as rlnDefocusU, per-particle optics columns such as rlnVoltage)."""
    particle = pd.DataFrame(index=range(len(df)))
    for field, (label, factor) in CTF_PARTICLE_FIELDS.items():
        if field in df:
            particle[label] = _col(df, field) * factor
    optics = pd.DataFrame(index=range(len(df)))
    for field, label in CTF_OPTICS_FIELDS.items():
        if field in df:
            optics[label] = _col(df, field)
    return particle, optics


def check_ctf_fields(df: pd.DataFrame, src: str) -> bool:
    """Whether a cryoSPARC table has CTF fields; UserError when it has defocus but lacks the
    voltage, Cs or amplitude contrast needed to use it."""
    if "ctf/df1_A" not in df.columns:
        return False
    for field in CTF_OPTICS_FIELDS:
        if field not in df.columns:
            raise UserError(f"{src}: has ctf/df1_A but no {field} (needed for the CTF)")
    return True


def blob_paths(df: pd.DataFrame) -> pd.Series:
    """blob/path without cryoSPARC's leading '>' marker."""
    return df["blob/path"].astype(str).str.removeprefix(">")


def _col(df: pd.DataFrame, name: str) -> np.ndarray | None:
    return df[name].to_numpy(np.float64) if name in df else None


def cs_to_relion31(
    df: pd.DataFrame, apix: np.ndarray, box: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 (particles, optics) from a cryoSPARC table (pyem csparc2star conventions).

    df1_A/df2_A -> rlnDefocusU/V, df_angle_rad and phase_shift_rad -> degrees, accel_kv/cs_mm/
    amp_contrast -> optics; alignments2D pose -> rlnAnglePsi (degrees, no sign change), shift (px)
    -> rlnOrigin[XY]Angst = shift * psize, class (0-based) -> rlnClassNumber (1-based).
    """
    idx = df["blob/idx"].to_numpy(np.int64)
    p = pd.DataFrame(
        {"rlnImageName": [f"{i + 1:06d}@{s}" for i, s in zip(idx, blob_paths(df), strict=True)]}
    )
    if "location/micrograph_path" in df:
        p["rlnMicrographName"] = df["location/micrograph_path"].astype(str).str.removeprefix(">")
    if {"location/center_x_frac", "location/micrograph_shape[1]"} <= set(df.columns):
        p["rlnCoordinateX"] = _col(df, "location/center_x_frac") * _col(
            df, "location/micrograph_shape[1]"
        )
        p["rlnCoordinateY"] = _col(df, "location/center_y_frac") * _col(
            df, "location/micrograph_shape[0]"
        )
    ctf_particle, ctf = ctf_as_relion(df)
    for label in ctf_particle.columns:
        p[label] = ctf_particle[label].to_numpy()
    if "alignments2D/pose" in df:
        psize = _col(df, "alignments2D/psize_A")
        psize = np.where(psize > 0, psize, apix) if psize is not None else np.asarray(apix)
        shift = np.stack([_col(df, "alignments2D/shift[0]"), _col(df, "alignments2D/shift[1]")], 1)
        psi, origin = relion_from_cryosparc(_col(df, "alignments2D/pose"), shift, psize)
        p["rlnAnglePsi"] = psi
        p["rlnOriginXAngst"] = origin[:, 0]
        p["rlnOriginYAngst"] = origin[:, 1]
    if "alignments2D/class" in df:
        p["rlnClassNumber"] = df["alignments2D/class"].to_numpy(np.int64) + 1
    key = df["ctf/exp_group_id"].to_numpy() if "ctf/exp_group_id" in df else None
    group, optics = build_optics(ctf, apix, box, key=key)
    p["rlnOpticsGroup"] = group
    return p, optics


# ---- RELION -> cryoSPARC ------------------------------------------------------------------------
def sha1_uint64(text: str) -> np.uint64:
    """The first 8 bytes of SHA-1 of ``text`` (UTF-8) as a little-endian uint64: cryoSPARC's
    import signature of an absolute path, and tvae-em's uid of a particle of a star."""
    return np.uint64(_sha1_int(text))


def _sha1_int(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little")


def particle_uids(names: pd.Series) -> np.ndarray:
    """A stable uid (n,) uint64 per particle of a star: `sha1_uint64` of its rlnImageName as
    read; the k-th repeat (k >= 1) of a name hashes "name#k", so every particle has its own."""
    keys = [name.strip() for name in names.astype(str).tolist()]
    if len(set(keys)) < len(keys):
        table = pd.Series(keys, dtype=object)
        repeat = table.groupby(table).cumcount()
        keys = table.where(repeat == 0, table + "#" + repeat.astype(str)).tolist()
    return np.array([_sha1_int(k) for k in keys], dtype=np.uint64)


def cs_array(columns: dict[str, object], n: int) -> np.ndarray:
    """A structured array of ``n`` rows from whole-field values (scalars broadcast), laid out
    (dtype, shape, order) as `CS_LAYOUT` says; a name outside it is a KeyError."""
    unknown = set(columns) - set(CS_LAYOUT)
    if unknown:
        raise KeyError(f"no cryoSPARC layout for {sorted(unknown)}")
    values, dtypes = {}, []
    for name in [f for f in CS_LAYOUT if f in columns]:
        base, shape = CS_LAYOUT[name]
        values[name] = _utf8(columns[name]) if base == "S" else columns[name]
        if base == "S":
            base = f"S{max(1, values[name].dtype.itemsize)}"
        dtypes.append((name, base, shape))
    out = np.zeros(n, dtype=dtypes)
    for name, value in values.items():
        out[name] = value
    return out


def _utf8(values) -> np.ndarray:
    """Text (a string, or one per row) as UTF-8 byte strings, each distinct value encoded once."""
    if isinstance(values, str):
        return np.array(values.encode("utf-8"), dtype="S")
    codes, uniques = pd.factorize(pd.Series(values, dtype=object).astype(str))
    return np.array([u.encode("utf-8") for u in uniques], dtype="S")[codes]


def merge_fields(base: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The fields of ``base`` (those ``new`` also has left out) followed by those of ``new``."""
    keep = [d for d in base.dtype.descr if d[0] and d[0] not in new.dtype.names]
    out = np.zeros(len(base), dtype=keep + new.dtype.descr)
    for name in base.dtype.names:
        if name not in new.dtype.names:
            out[name] = base[name]
    for name in new.dtype.names:
        out[name] = new[name]
    return out


def relion31_to_cs(
    particles: pd.DataFrame,
    optics: pd.DataFrame,
    uid: np.ndarray,
    stack_files: np.ndarray,
    src: str = "the particles",
) -> np.ndarray:
    """uid, blob/* and ctf/* of RELION 3.1 (particles, optics): the inverse of `cs_to_relion31`
    (ctf/* through the same `CTF_PARTICLE_FIELDS` / `CTF_OPTICS_FIELDS` table).

    ``particles`` has rlnImageName (``N@path``: blob/idx = N - 1, blob/path = path as written) and
    rlnOpticsGroup; ``stack_files`` (n,) are the absolute stack files (blob/import_sig).
    ctf/* are written when the particles have rlnDefocusU; the optics then need voltage, Cs and
    amplitude contrast (checked by `ctf_columns.relion_ctf_params` when the stack is opened).
    ``src`` names the input in error messages.
    """
    n = len(particles)
    parts = [name.partition("@") for name in particles["rlnImageName"].astype(str).tolist()]
    number = np.array([int(k) if at else 1 for k, at, _ in parts], dtype=np.int64)  # bare: image 1
    path = [stack if at else k for k, at, stack in parts]
    group = optics.set_index(pd.to_numeric(optics["rlnOpticsGroup"]).astype(np.int64))
    per = group.reindex(pd.to_numeric(particles["rlnOpticsGroup"]).astype(np.int64).to_numpy())
    box = per["rlnImageSize"].to_numpy(np.int64)
    codes, files = pd.factorize(pd.Series(stack_files, dtype=object).astype(str))
    sigs = np.array([_sha1_int(f) for f in files], dtype=np.uint64)
    columns: dict[str, np.ndarray] = {
        "uid": np.asarray(uid, dtype=np.uint64),
        "blob/path": path,
        "blob/idx": number - 1,
        "blob/shape": np.stack([box, box], axis=1),
        "blob/psize_A": per["rlnImagePixelSize"].to_numpy(np.float64),
        "blob/sign": IMPORTED_SIGN,
        "blob/import_sig": sigs[codes],
    }
    if "rlnDefocusU" in particles:
        columns.update(_relion_ctf_fields(particles, per, src))
    return cs_array(columns, n)


def _relion_ctf_fields(particles: pd.DataFrame, per_optics: pd.DataFrame, src: str) -> dict:
    """ctf/* values from RELION columns (per-particle optics values in ``per_optics``), each
    divided by the factor of the one mapping table; RELION's defaults for absent columns."""
    values = {"rlnDefocusV": particles["rlnDefocusU"], **RELION_CTF_DEFAULTS}
    values.update({c: particles[c] for c in particles.columns})
    out: dict[str, np.ndarray | float | str] = {"ctf/type": CTF_TYPE, **CTF_UNCONVERTED}
    out["ctf/exp_group_id"] = pd.to_numeric(particles["rlnOpticsGroup"]).to_numpy(np.int64)
    for field, (label, factor) in CTF_PARTICLE_FIELDS.items():
        out[field] = _numbers(values[label], len(particles), label, src) / factor
    for field, label in CTF_OPTICS_FIELDS.items():
        column = particles[label] if label in particles else per_optics[label]
        out[field] = _numbers(column, len(particles), label, src)
    return out


def _numbers(values, n: int, label: str, src: str) -> np.ndarray:
    """A column (or a scalar default) as (n,) float64; UserError naming the first particle whose
    value is not a finite number."""
    if np.isscalar(values):
        return np.full(n, float(values))
    column = pd.Series(values).reset_index(drop=True)
    out = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"particle {i + 1} of {src}: {label} is {column[i]}, not a finite number")
    return out
