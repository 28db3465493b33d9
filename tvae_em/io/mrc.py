"""MRC stacks: header-only inspection, lazy memory-mapped reading, bounded-memory atomic writing."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header

from ..errors import UserError
from .atomic import atomic_path

HEADER_BYTES = 1024
# MRC modes holding real-valued pixels (0 int8/uint8, 1 int16, 2 float32, 6 uint16, 12 float16).
REAL_MODES = {0, 1, 2, 6, 12}


@dataclass(frozen=True)
class StackHeader:
    """What the header of an image stack says (images are ``ny`` rows x ``nx`` columns)."""

    path: str
    n: int
    ny: int
    nx: int
    mode: int
    apix: float  # header pixel size in Angstrom; 0.0 when the header does not give one


def read_header(path: str | os.PathLike) -> StackHeader:
    """Read and check an MRC header without touching pixel data (UserError if unusable)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image stack not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
                h = m.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                mode, nsymbt = int(h.mode), int(h.nsymbt)
                apix = float(m.voxel_size.x)
                dtype = data_dtype_from_header(h) if mode in REAL_MODES else None
        except Exception as e:
            raise UserError(f"cannot read MRC header of {path}: {e}") from None
    if dtype is None:
        raise UserError(f"unsupported MRC mode {mode} in {path} (need real-valued pixels)")
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise UserError(f"MRC header of {path} gives an empty or invalid size {nx}x{ny}x{nz}")
    need = HEADER_BYTES + max(nsymbt, 0) + nx * ny * nz * dtype.itemsize
    if path.stat().st_size < need:
        raise UserError(
            f"image stack {path} is truncated: header says {nz} images of {nx}x{ny} "
            f"({need} bytes) but the file has {path.stat().st_size} bytes"
        )
    if not np.isfinite(apix) or apix < 0:
        apix = 0.0
    return StackHeader(str(path), nz, ny, nx, mode, apix)


def open_stack(path: str | os.PathLike) -> tuple[object, np.ndarray]:
    """Memory-map a stack: (the open mrcfile object, its data as an (n, ny, nx) array view)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            m = mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as e:
            raise UserError(f"cannot memory-map image stack {path}: {e}") from None
    if m.data is None:
        m.close()
        raise UserError(f"cannot read the pixel data of {path} (broken MRC header)")
    data = m.data
    if data.ndim == 2:
        data = data[None]
    return m, data


def write_stack(
    path: str | os.PathLike,
    chunks: Iterable[np.ndarray],
    n: int,
    box: int,
    apix: float,
) -> int:
    """Write up to ``n`` float32 images from ``chunks`` ((B, box, box) each), atomically.

    ``mrcfile.new_mmap`` (mode 2) creates the file and its header under a temporary name; chunks
    are then written at their offsets with plain file writes, so neither a full-size array nor
    mapped pages of the output ever accumulate in memory. If fewer than ``n`` images arrive (bad
    particles skipped) the file is truncated to them. Renamed when complete; returns the count.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(max(n, 1), box, box), mrc_mode=2, overwrite=True) as m:
            m.set_image_stack()
            m.voxel_size = apix
            dtype, offset = m.data.dtype, HEADER_BYTES + int(m.header.nsymbt)
        k, stats = 0, _RunningStats()
        with open(tmp, "r+b") as f:
            f.seek(offset)
            for chunk in chunks:
                if k + len(chunk) > n:
                    raise ValueError(f"write_stack got more than the declared {n} images")
                if chunk.shape[1:] != (box, box):
                    raise ValueError(f"write_stack expected {box}x{box} images, got {chunk.shape}")
                np.ascontiguousarray(chunk, dtype=dtype).tofile(f)
                stats.add(chunk)
                k += len(chunk)
        _finish_header(tmp, k, box, apix, stats)
    return k


class _RunningStats:
    """Min, max, mean and rms of all pixels seen, accumulated chunk by chunk (float64)."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, x: np.ndarray) -> None:
        if x.size:
            self.n += x.size
            self.s += float(x.sum(dtype=np.float64))
            self.s2 += float(np.square(x, dtype=np.float64).sum())
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def to_header(self, h) -> None:
        if self.n:
            mean = self.s / self.n
            h.dmin, h.dmax, h.dmean = self.lo, self.hi, mean
            h.rms = np.sqrt(max(self.s2 / self.n - mean * mean, 0.0))


def _finish_header(path: Path, k: int, box: int, apix: float, stats: _RunningStats) -> None:
    """Set the pixel statistics and the image count ``k`` in the header; cut the file to size."""
    with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
        h = m.header.copy()
    h.nz = h.mz = k
    h.cella.z = k * apix
    stats.to_header(h)
    with open(path, "r+b") as f:
        f.write(h.tobytes())
        f.truncate(HEADER_BYTES + int(h.nsymbt) + k * box * box * 4)
