"""Atomic file output: write under a temporary name in the same folder, rename on success.

One file: `atomic_path`; several files renamed together: `atomic_paths`; a whole output folder
(complete or absent): `atomic_folder`. Temporary names come from `temp_name` only, so
`stale_temps` can find the leftovers of a writer that was killed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def temp_name(path: Path) -> Path:
    """A hidden, unique temporary name next to ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def stale_temps(folder: Path, names: list[str]) -> list[Path]:
    """Temporary files (or folders) that `temp_name` made for ``names`` in ``folder``: the
    leftovers of an interrupted write, once no writer is active there."""
    if not folder.is_dir():
        return []
    return sorted(p for name in names for p in folder.glob(f".{name}.*tmp*"))


def remove_paths(paths: list[Path]) -> None:
    """Delete files and folders (missing ones are fine)."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """UserError unless ``folder`` is a writable folder or could be created; creates nothing."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == folder else f"is under the file {probe}"
        raise UserError(f"cannot create output folder {folder}: it {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable")
    return folder


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) if needed; UserError if it cannot be created or written."""
    folder = check_writable_dir(folder)
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


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden staging folder; on success its files become those of ``folder``.

    A new ``folder`` is staged next to it and appears by one rename, complete; for an existing
    one the staging folder is inside it and its files are moved in, one rename each, at the end.
    On any exception the staging folder (and any parent folder made for it) is deleted, so a
    failed or interrupted run leaves nothing behind.
    """
    folder = check_writable_dir(folder).absolute()
    parent = folder.parent
    made = parent
    while not made.parent.exists():
        made = made.parent
    created_parent = made if not parent.exists() else None
    stage = temp_name(folder)
    if folder.exists():
        stage = folder / stage.name
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        yield stage
        if folder.exists():
            for item in sorted(stage.iterdir()):
                os.replace(item, folder / item.name)
            stage.rmdir()
        else:
            os.rename(stage, folder)
    except OSError as e:
        _discard(stage, created_parent)
        raise UserError(f"cannot write output folder {folder}: {e.strerror or e}") from None
    except BaseException:
        _discard(stage, created_parent)
        raise


def _discard(stage: Path, created_parent: Path | None) -> None:
    """Delete a staging folder and the parent folders made for it."""
    shutil.rmtree(stage, ignore_errors=True)
    if created_parent is not None:
        for p in [stage.parent, *stage.parent.parents]:
            try:
                p.rmdir()  # only empty folders go
            except OSError:
                break
            if p == created_parent:
                break
