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

    Memory stays bounded by one chunk: the file is a memory map (``mrcfile.new_mmap``, mode 2)
    under a temporary name, renamed when complete. If fewer than ``n`` images arrive (bad particles
    skipped), the file is truncated to the images written. Returns the number of images written.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(max(n, 1), box, box), mrc_mode=2, overwrite=True) as m:
            m.set_image_stack()
            m.voxel_size = apix
            k, stats = 0, _RunningStats()
            for chunk in chunks:
                b = chunk.shape[0]
                if k + b > n:
                    raise ValueError(f"write_stack got more than the declared {n} images")
                if chunk.shape[1:] != (box, box):
                    raise ValueError(
                        f"write_stack expected images of {box}x{box}, got {chunk.shape}"
                    )
                m.data[k : k + b] = chunk
                stats.add(chunk)
                k += b
            stats.to_header(m.header)
        if k < n:
            _truncate(tmp, k, box, apix)
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


def _truncate(path: Path, k: int, box: int, apix: float) -> None:
    """Shrink a stack file written for more images to its first ``k`` images (header patched)."""
    with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
        h = m.header.copy()
        nsymbt = int(h.nsymbt)
    h.nz = h.mz = k
    h.cella.z = h.mz * apix
    with open(path, "r+b") as f:
        f.write(h.tobytes())
        f.truncate(HEADER_BYTES + nsymbt + k * box * box * 4)
