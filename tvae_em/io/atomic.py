"""Atomic file output: write under a temporary name in the same folder, rename on success."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def temp_name(path: Path) -> Path:
    """A hidden, unique temporary name next to ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) if needed; UserError if it cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable")
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is deleted and the
    exception propagates, so no partial output is ever left under the final name.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_paths(paths: list[Path]) -> Iterator[list[Path]]:
    """Like :func:`atomic_path` for several files: all are renamed only if the block succeeds."""
    tmps = [temp_name(Path(p)) for p in paths]
    try:
        yield tmps
        for tmp, final in zip(tmps, paths, strict=True):
            os.replace(tmp, final)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
