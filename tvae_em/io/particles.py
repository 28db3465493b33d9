"""ParticleStack: a lazy, picklable view of particles from a RELION star, a .cs or a stack.

One subclass per input format (as cryoDRGN's ImageSource): `StarStack` (RELION 3.0 / 3.1+),
`CsStack` (cryoSPARC) and `MrcsStack` (a bare stack). Everything that depends on the format --
the RELION 3.1 view of the metadata, the CTF parameters, the cryoSPARC fields to write back --
is a method here, so no caller ever branches on the input kind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from ..ctf import CtfParams
from ..errors import UserError
from . import cs as csio
from .ctf_columns import (
    CTF_COLUMNS,
    check_numeric_columns,
    cryosparc_ctf_params,
    relion_ctf_params,
)
from .mrc import StackHeader, open_stack, read_header
from .relion import (
    OpticsDefaults,
    complete_optics,
    origins_to_angstrom,
    pixel_size_columns,
    pixel_size_from_relion30,
    relion30_to_31,
    stack_file,
)
from .star import StarText, read_particles_star_text, write_star

STAR_SUFFIXES = {".star"}
CS_SUFFIXES = {".cs"}
STACK_SUFFIXES = {".mrcs", ".mrc"}
MAX_OPEN_STACKS = 64  # memory maps kept open per process (least recently used are closed)
PIXEL_HINT = "drop such particles with tvae-em preprocess --skip-bad"


class ParticleStack:
    """Particles with their metadata, reading pixel data lazily from memory-mapped stacks.

    Opening reads only metadata and stack headers. ``read(indices)`` memory-maps each stack file
    on first use (per process; the maps are dropped on pickling so DataLoader workers reopen).
    """

    def __init__(
        self,
        *,
        source: Path,
        kind: str,
        particles: pd.DataFrame,
        optics: pd.DataFrame | None,
        files: list[str],
        file_index: np.ndarray,
        image_index: np.ndarray,
        box: int,
        apix: np.ndarray,
        apix_source: str,
        headers: list[StackHeader],
    ) -> None:
        self.source = source
        self.kind = kind
        self.particles = particles
        self.optics = optics
        self.files = files  # distinct stack files, resolved
        self.file_index = file_index  # (n,) index into files
        self.image_index = image_index  # (n,) 0-based image inside its file
        self.box = box
        self._apix = apix  # (n,) NaN where unknown
        self.apix_source = apix_source
        self.headers = headers
        self.cs_dtype: np.dtype | None = None  # original .cs field layout, for writing back
        self._maps: OrderedDict[int, tuple[object, np.ndarray]] = OrderedDict()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        datadir: str | os.PathLike | None = None,
        apix: float | None = None,
        optics: OpticsDefaults | None = None,
    ) -> ParticleStack:
        """Open a .star (RELION 3.0/3.1+), .cs (cryoSPARC) or .mrcs/.mrc stack, without pixel data.

        ``datadir`` is an extra folder to look for stacks in; ``apix`` (Angstrom) overrides every
        pixel size found in the files; ``optics`` gives the voltage, Cs and amplitude contrast
        written for inputs that lack them (default: RELION's defaults).
        """
        path = Path(path)
        if apix is not None and not (np.isfinite(apix) and apix > 0):
            raise UserError(f"--input-apix must be a positive pixel size in Angstrom, got {apix}")
        suffix = path.suffix.lower()
        if suffix not in STAR_SUFFIXES | CS_SUFFIXES | STACK_SUFFIXES:
            raise UserError(
                f"unknown input file type '{path.suffix}' for {path}: "
                "expected .star, .cs, .mrcs or .mrc"
            )
        if not path.is_file():
            raise UserError(f"input file not found: {path}")
        datadir = Path(datadir) if datadir is not None else None
        if datadir is not None and not datadir.is_dir():
            raise UserError(f"--datadir {datadir} is not a folder")
        if suffix in STAR_SUFFIXES:
            stack = StarStack.load(path, datadir, apix)
        elif suffix in CS_SUFFIXES:
            stack = CsStack.load(path, datadir, apix)
        else:
            stack = MrcsStack.load(path, datadir, apix)
        stack.optics_defaults = optics or OpticsDefaults()
        return stack

    # ---- what each format provides -------------------------------------------------------
    writes_cs = False  # whether outputs of this input include a cryoSPARC .cs with its fields
    optics_defaults = OpticsDefaults()  # voltage, Cs, amplitude contrast the input lacks
    text: StarText | None = None  # a star input as read (values as text, comments, other blocks)

    @classmethod
    def load(cls, path: Path, datadir: Path | None, apix: float | None) -> ParticleStack:
        """Read the metadata of ``path`` (checked by `open`) into this format's stack."""
        raise NotImplementedError

    def relion31_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The RELION 3.1 (particles, optics) view of the metadata, at this stack's pixel sizes."""
        raise NotImplementedError

    def ctf_params(self) -> CtfParams | None:
        """Per-particle CTF parameters, or None when the metadata has no defocus."""
        return None

    def star_text(self, rows: np.ndarray) -> StarText | None:
        """The input star as text for particles ``rows`` (in that order), to pass to
        `write_star` with tables of those rows; None for inputs that are not stars."""
        return None if self.text is None else self.text.select("particles", rows)

    def cs_fields(self, rows: np.ndarray) -> tuple[pd.DataFrame, np.dtype | None]:
        """cryoSPARC fields of particles ``rows`` (in that order) and the .cs field layout to write
        them with: every field of a .cs input, else just uid (the row number) and no layout."""
        return pd.DataFrame({"uid": np.asarray(rows, dtype=np.uint64)}), None

    @classmethod
    def _build(
        cls, path, kind, particles, optics, index, stack_names, bases, datadir, meta_apix, apix
    ) -> ParticleStack:
        """Resolve stack files, check their headers against the particles, settle pixel sizes."""
        codes, uniques = pd.factorize(pd.Series(stack_names).astype(str))
        firsts = np.unique(codes, return_index=True)[1]  # first particle of each stack
        files, headers = [], []
        for code, name in enumerate(uniques):
            first = int(firsts[code])
            resolved = _resolve(name, bases, datadir)
            if resolved is None:
                where = ", ".join(str(b) for b in [*bases, datadir, Path.cwd()] if b is not None)
                raise UserError(
                    f"image stack {name} (particle {first + 1} of {path}) not found; "
                    f"looked in {where} (use --datadir)"
                )
            files.append(str(resolved))
            headers.append(read_header(resolved))
        box = _check_sizes(headers, path)
        _check_indices(index, codes, headers, path)
        apix_arr, source = _settle_apix(meta_apix, apix, codes, headers, len(index))
        return cls(
            source=path,
            kind=kind,
            particles=particles,
            optics=optics,
            files=files,
            file_index=codes.astype(np.int64),
            image_index=index.astype(np.int64),
            box=box,
            apix=apix_arr,
            apix_source=source,
            headers=headers,
        )

    # ---- the public view --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def apix(self) -> np.ndarray:
        """(n,) pixel size in Angstrom of each particle; UserError if some are unknown."""
        missing = np.isnan(self._apix)
        if missing.any():
            i = int(np.argmax(missing))
            raise UserError(
                f"no pixel size known for particle {i + 1} ({self.files[self.file_index[i]]}) "
                f"of {self.source}: give it with --input-apix"
            )
        return self._apix

    @property
    def stack_paths(self) -> np.ndarray:
        """(n,) resolved stack file of each particle."""
        return np.asarray(self.files, dtype=object)[self.file_index]

    def describe(self, i: int) -> str:
        """How messages name particle ``i`` (0-based): its number, image and stack file."""
        file = self.files[self.file_index[i]]
        return f"particle {i + 1} (image {self.image_index[i] + 1} of {file})"

    def check_pixels(self, indices, images, hint: str = PIXEL_HINT) -> None:
        """UserError naming the first of particles ``indices`` whose image (in ``images``,
        (B, D, D) numpy or CPU torch) has NaN or Inf pixels."""
        images = np.asarray(images)
        bad = nonfinite_images(images)
        if bad.any():
            j = int(np.argmax(bad))
            i = int(np.asarray(indices)[j])
            raise UserError(f"{self.describe(i)} has {nonfinite_kind(images[j])} pixels; {hint}")

    def read(self, indices) -> np.ndarray:
        """Images of the given particles as float32 (B, D, D), in the order asked.

        Reads only those images: grouped by stack file, sorted within a file.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"particle index out of range 0..{len(self) - 1}")
        out = np.empty((idx.size, self.box, self.box), dtype=np.float32)
        codes, images = self.file_index[idx], self.image_index[idx]
        order = np.lexsort((images, codes))
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for part in np.split(order, bounds) if idx.size else []:
            data = self._data(int(codes[part[0]]))
            wanted = images[part]  # sorted
            if (np.diff(wanted) == 1).all():
                out[part] = data[wanted[0] : wanted[-1] + 1]  # contiguous: no temporary copy
            else:
                out[part] = data[wanted]
        return out

    def fingerprint(self) -> str:
        """Short id of the input: kind, source, particle count, box and stack files with sizes."""
        stacks = [(f, os.path.getsize(f) if os.path.exists(f) else -1) for f in self.files]
        blob = json.dumps([self.kind, str(self.source.resolve()), len(self), self.box, stacks])
        return f"{self.kind}:{len(self)}x{self.box}:{hashlib.sha1(blob.encode()).hexdigest()[:12]}"

    def close(self) -> None:
        """Close every open memory map of this process."""
        while self._maps:
            _, (mrc, _) = self._maps.popitem()
            mrc.close()

    def _data(self, code: int) -> np.ndarray:
        """The (n, D, D) memory-mapped data of stack file ``code``, opened on first use."""
        if code in self._maps:
            self._maps.move_to_end(code)
            return self._maps[code][1]
        if len(self._maps) >= MAX_OPEN_STACKS:
            _, (mrc, _) = self._maps.popitem(last=False)
            mrc.close()
        self._maps[code] = open_stack(self.files[code])
        return self._maps[code][1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ParticleStack({self.kind}, {self.source}, n={len(self)}, box={self.box})"


class StarStack(ParticleStack):
    """Particles of a RELION star: 3.0 (kind "relion30", one block) or 3.1+ ("relion31", optics)."""

    @classmethod
    def load(cls, path: Path, datadir: Path | None, apix: float | None) -> StarStack:
        particles, optics, kind, text = read_particles_star_text(path)
        names = particles["rlnImageName"].astype(str)
        index, stack_names = _split_image_names(names, path)
        if optics is not None:
            _check_optics_groups(particles, optics, path)
            check_numeric_columns(optics, CTF_COLUMNS, str(path), "optics group")
        check_numeric_columns(particles, CTF_COLUMNS, str(path))
        if optics is not None:
            meta = _optics_pixel_size(particles, optics, path, apix is None)
        else:
            meta = pixel_size_from_relion30(particles)
            if apix is None:
                _check_pixel_sizes(meta, particles, np.arange(len(particles)), path)
        stack = cls._build(
            path, kind, particles, optics, index, stack_names, [path.parent], datadir, meta, apix
        )
        stack.text = text
        return stack

    def relion31_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """As read for 3.1 (optics pixel size overridden by --input-apix); 3.0: optics groups
        built from the per-particle values."""
        apix = self.apix
        if self.kind == "relion30":
            return relion30_to_31(self.particles, apix, self.box, self.optics_defaults)
        particles = self.particles.copy()
        if "rlnOpticsGroup" not in particles:
            particles["rlnOpticsGroup"] = int(self.optics["rlnOpticsGroup"].iloc[0])
        optics = self.optics.copy()
        groups = particles["rlnOpticsGroup"].to_numpy()
        per_group = pd.Series(apix).groupby(groups).first()
        optics["rlnImagePixelSize"] = optics["rlnOpticsGroup"].map(per_group).to_numpy(np.float64)
        optics = complete_optics(optics, self.box, self.optics_defaults)
        return origins_to_angstrom(particles, apix), optics

    def ctf_params(self) -> CtfParams | None:
        return relion_ctf_params(self.particles, self.optics, str(self.source))


class CsStack(ParticleStack):
    """Particles of a cryoSPARC .cs table (kind "cryosparc"); its RELION view follows pyem."""

    writes_cs = True

    @classmethod
    def load(cls, path: Path, datadir: Path | None, apix: float | None) -> CsStack:
        arr = csio.read_cs(path)
        df = csio.cs_to_dataframe(arr)
        index = df["blob/idx"].to_numpy(np.int64)
        check_numeric_columns(df, [*csio.CTF_PARTICLE_FIELDS, *csio.CTF_OPTICS_FIELDS], str(path))
        meta = None
        if "blob/psize_A" in df:
            meta = df["blob/psize_A"].to_numpy(np.float64)
            bad = ~(np.isfinite(meta) & (meta > 0))
            if bad.any() and apix is None:
                i = int(np.argmax(bad))
                raise UserError(
                    f"particle {i + 1} of {path}: blob/psize_A is {meta[i]:g}, not a positive "
                    "pixel size (fix the file or give --input-apix)"
                )
        # cryoSPARC paths are relative to the project folder, usually the .cs file's grandparent.
        bases = [path.parent, path.parent.parent]
        stack = cls._build(
            path, "cryosparc", df, None, index, csio.blob_paths(df), bases, datadir, meta, apix
        )
        stack.cs_dtype = arr.dtype
        if not np.isnan(stack._apix).any():
            rln, stack.optics = csio.cs_to_relion31(df, stack._apix, stack.box)
            stack.particles = pd.concat([df, rln], axis=1)
        return stack

    def relion31_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """pyem's csparc2star conversion; non-RELION cryoSPARC fields are left out."""
        _ = self.apix  # a UserError when pixel sizes are unknown
        particles = self.particles[[c for c in self.particles.columns if _is_star_label(c)]]
        optics = complete_optics(self.optics, self.box, self.optics_defaults)
        return particles.drop(columns=["uid"], errors="ignore").copy(), optics

    def ctf_params(self) -> CtfParams | None:
        return cryosparc_ctf_params(self.particles, str(self.source))

    def cs_fields(self, rows: np.ndarray) -> tuple[pd.DataFrame, np.dtype | None]:
        columns = [c for c in self.particles.columns if "/" in c or c == "uid"]
        return self.particles[columns].iloc[rows].reset_index(drop=True).copy(), self.cs_dtype


class MrcsStack(ParticleStack):
    """The images of a bare .mrcs/.mrc stack (kind "mrcs"): no metadata beyond the pixel size."""

    @classmethod
    def load(cls, path: Path, datadir: Path | None, apix: float | None) -> MrcsStack:
        header = read_header(path)
        names = pd.Series([str(path)] * header.n)
        particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{path}" for i in range(header.n)]})
        index = np.arange(header.n, dtype=np.int64)
        return cls._build(
            path, "mrcs", particles, None, index, names, [Path.cwd()], None, None, apix
        )

    def relion31_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return relion30_to_31(self.particles, self.apix, self.box, self.optics_defaults)


# ---- helpers ---------------------------------------------------------------------------------
def nonfinite_images(images: np.ndarray) -> np.ndarray:
    """(B,) bool: which images (B, D, D) have a NaN or Inf pixel (no image-sized temporaries:
    NaN and Inf propagate to the per-image min and max)."""
    flat = images.reshape(len(images), -1)
    return ~(np.isfinite(flat.min(axis=1)) & np.isfinite(flat.max(axis=1)))


def nonfinite_kind(image: np.ndarray) -> str:
    """'NaN', 'Inf' or 'NaN/Inf': the kinds of non-finite pixels in one image."""
    return "/".join(k for k, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(image).any())


def _split_image_names(names: pd.Series, path: Path) -> tuple[np.ndarray, pd.Series]:
    """rlnImageName "N@stack" -> (0-based image index, stack name); a bare name means image 1."""
    parts = [name.partition("@") for name in names.tolist()]  # fast on millions of rows
    stacks = [stack if at else number for number, at, stack in parts]
    numbers = [number if at else "1" for number, at, _ in parts]
    try:
        index = np.array(numbers).astype(np.int64)
    except ValueError:
        index = None
    if index is None or (index < 1).any():
        i = next((k for k, v in enumerate(numbers) if not (v.strip().isdigit() and int(v) >= 1)), 0)
        raise UserError(
            f"particle {i + 1} of {path} has a bad rlnImageName '{names.iloc[i]}' "
            "(expected N@stack with N >= 1)"
        )
    if not all(stacks):
        i = stacks.index("")
        raise UserError(
            f"particle {i + 1} of {path} has no stack file in rlnImageName '{names.iloc[i]}'"
        )
    return index - 1, pd.Series(stacks, dtype=object)


def _resolve(name: str, bases: list[Path], datadir: Path | None) -> Path | None:
    """First existing file among: absolute name; each base / name; datadir / name (or its file
    name); cwd / name. Returned as an absolute path. A RELION format suffix (``:mrcs``) is
    dropped."""
    p = Path(stack_file(name))
    if p.is_absolute():
        candidates = [p] + ([datadir / p.name] if datadir is not None else [])
    else:
        candidates = [b / p for b in bases]
        if datadir is not None:
            candidates += [datadir / p, datadir / p.name]
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if c.is_file():
            return Path(os.path.abspath(c))
    return None


def _check_sizes(headers: list[StackHeader], path: Path) -> int:
    """The common square image size of all stacks; UserError naming the stack that differs."""
    for h in headers:
        if h.nx != h.ny:
            raise UserError(f"images in {h.path} are not square ({h.nx}x{h.ny}) (from {path})")
    first = headers[0]
    for h in headers[1:]:
        if h.nx != first.nx:
            raise UserError(
                f"images of different sizes in {path}: {first.nx}x{first.nx} in {first.path} "
                f"but {h.nx}x{h.nx} in {h.path}"
            )
    return first.nx


def _check_indices(index: np.ndarray, codes: np.ndarray, headers: list[StackHeader], path: Path):
    """UserError naming the first particle whose image number is beyond its stack's length."""
    sizes = np.array([h.n for h in headers], dtype=np.int64)
    bad = (index < 0) | (index >= sizes[codes])
    if bad.any():
        i = int(np.argmax(bad))
        h = headers[codes[i]]
        raise UserError(
            f"particle {i + 1} of {path} asks for image {index[i] + 1} "
            f"but {h.path} has only {h.n} images"
        )


def _check_optics_groups(particles: pd.DataFrame, optics: pd.DataFrame, path: Path) -> None:
    """UserError naming the first particle (or optics row) whose rlnOpticsGroup is not a
    number, or whose group is not in data_optics."""
    if "rlnOpticsGroup" not in optics:
        if "rlnOpticsGroup" in particles or len(optics) > 1:
            raise UserError(f"the optics block of {path} has no rlnOpticsGroup column")
        return
    known = _group_numbers(optics["rlnOpticsGroup"], f"optics group {{}} of {path}")
    if len(np.unique(known)) < len(known):
        raise UserError(f"the optics block of {path} lists an rlnOpticsGroup more than once")
    if "rlnOpticsGroup" not in particles:
        if len(optics) > 1:
            raise UserError(
                f"{path} has several optics groups but no rlnOpticsGroup column in particles"
            )
        return
    groups = _group_numbers(particles["rlnOpticsGroup"], f"particle {{}} of {path}")
    unknown = ~np.isin(groups, known)
    if unknown.any():
        i = int(np.argmax(unknown))
        raise UserError(
            f"particle {i + 1} of {path} is in optics group {groups[i]:g}, not in data_optics"
        )


def _group_numbers(column: pd.Series, where: str) -> np.ndarray:
    """rlnOpticsGroup values as numbers; UserError naming the first row that is not one."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{where.format(i + 1)}: rlnOpticsGroup is {column.iloc[i]}, not a number")
    return values


def _optics_pixel_size(
    particles: pd.DataFrame, optics: pd.DataFrame, path: Path, check: bool
) -> np.ndarray | None:
    """Per-particle pixel size from the RELION 3.1 optics group of each particle (groups checked
    by `_check_optics_groups`); with ``check``, UserError for a value that is not positive."""
    per_group = pixel_size_from_relion30(optics)
    if per_group is None:
        return None
    if "rlnOpticsGroup" not in particles:
        rows = np.zeros(len(particles), np.int64)
    else:
        numbers = pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy(np.float64)
        lookup = pd.Series(np.arange(len(optics)), index=numbers)
        rows = lookup.reindex(pd.to_numeric(particles["rlnOpticsGroup"]).to_numpy()).to_numpy()
    meta = per_group[rows]
    if check:
        _check_pixel_sizes(meta, optics, rows, path, "its optics group")
    return meta


def _check_pixel_sizes(
    meta: np.ndarray | None, table: pd.DataFrame, rows: np.ndarray, path: Path, owner: str = ""
) -> None:
    """UserError naming the first particle whose metadata pixel size (from ``table`` row
    ``rows[i]``) is not a positive number."""
    if meta is None:
        return
    bad = np.isnan(meta)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    values = ", ".join(f"{c} {table[c].iloc[int(rows[i])]}" for c in pixel_size_columns(table))
    whose = f"{owner} has " if owner else "has "
    raise UserError(
        f"particle {i + 1} of {path}: {whose}{values}, not a positive pixel size "
        "(fix the file or give --input-apix)"
    )


def _settle_apix(meta, override, codes, headers, n) -> tuple[np.ndarray, str]:
    """Pixel size per particle: --input-apix, else the file's metadata, else the stack header."""
    if override is not None:
        return np.full(n, float(override)), "--input-apix"
    apix = np.full(n, np.nan) if meta is None else np.asarray(meta, dtype=np.float64).copy()
    source = "metadata"
    missing = np.isnan(apix)
    if missing.any():
        header = np.array([h.apix if h.apix > 0 else np.nan for h in headers])
        apix[missing] = header[codes[missing]]
        source = "MRC header" if missing.all() else "metadata + MRC header"
    return apix, source


# ---- RELION 3.1 output -----------------------------------------------------------------------
def _is_star_label(name: str) -> bool:
    return "/" not in name and "[" not in name


def write_particles_star(
    path: str | os.PathLike,
    particles: pd.DataFrame,
    optics: pd.DataFrame | None,
    apix: np.ndarray | float | None = None,
    box: int | None = None,
) -> None:
    """Write a RELION 3.1 particle star (data_optics + data_particles), atomically.

    Without ``optics`` (a RELION 3.0 table) the optics groups are built from the per-particle
    columns, with pixel size ``apix`` (or rlnDetectorPixelSize/rlnMagnification) and ``box``.
    """
    if optics is None:
        if box is None:
            raise ValueError(
                "write_particles_star needs box to build optics for a RELION 3.0 table"
            )
        if apix is None:
            apix = pixel_size_from_relion30(particles)
            if apix is None or np.isnan(apix).any():
                raise UserError(f"no pixel size for the particles of {path}: give --input-apix")
        apix = np.broadcast_to(np.asarray(apix, dtype=np.float64), (len(particles),))
        particles, optics = relion30_to_31(particles, apix, box)
    write_star(path, {"optics": optics, "particles": particles})
