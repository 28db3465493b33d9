"""The run folder: the one module that knows its layout and the schema of what it holds.

A run folder (``tvae-em train -o RUN``) holds
    config.json             version, command line, options, model config, normalisation, input
                            fingerprint, the input and datadir as absolute paths, whether the CTF
                            was used, device, world size
    checkpoints/last.pt     state dicts (never pickled modules) + optimizer, scheduler, RNG states
    checkpoints/best.pt     the same at the lowest epoch loss
    checkpoints/*.pt.sha256 size and sha256 of each checkpoint, verified on every load
    metrics.csv             one row per epoch (METRIC_FIELDS)
    train.log               the log lines of every session
    .lock                   while a train session writes there: its pid and host (`RunLock`)
train, embed, generate, the tests and the benchmarks all read and write it through `RunFolder`.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import Normalisation
from .errors import UserError
from .io import atomic_path, remove_paths, stale_temps
from .runtime import command_line

CONFIG = "config.json"
METRICS = "metrics.csv"
LOG = "train.log"
LOCK = ".lock"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS = {"last": "last.pt", "best": "best.pt"}
DIGEST_SUFFIX = ".sha256"  # checkpoints/last.pt.sha256: the size and sha256 of last.pt
METRIC_FIELDS = [
    "epoch",
    "loss",
    "log_lik",
    "kl_tr",
    "kl_theta",
    "kl_z",
    "consistency",
    "pose_nll",
    "lr",
    "particles_per_s",
    "seconds",
    "k_max",
]
# Options that may change on resume (they do not change the result, or only extend it).
RESUMABLE_CHANGES = {"epochs", "num_workers", "device", "checkpoint_every", "resume", "progress"}
# Option names of earlier versions, as saved in their config.json -> today's names.
RENAMED_OPTIONS = {"apix": "input_apix"}
# Options added since: the value a run saved before they existed behaved as (resume keeps it).
ADDED_OPTIONS = {"z_source": "cells", "pose_search_from": 0, "z_turn_penalty": 0.0}
# Options naming files: config.json also keeps them as absolute paths ("resolved_paths"), so a
# run resumes from any working directory.
PATH_OPTIONS = ("input", "datadir")


@dataclass
class TrainedModel:
    """A model loaded from a run folder, with what inference needs to feed it like in training."""

    model: torch.nn.Module
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    normalisation: Normalisation
    epoch: int
    path: Path
    run: RunFolder

    def uses_ctf(self, stack) -> bool:
        """Whether the run was trained with the CTF (config.json "ctf"; else its --ctf option)."""
        return self.run.used_ctf(self.train_config, stack)


class RunFolder:
    """A training run folder (layout in the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.checkpoint_file: Path | None = (
            None  # a checkpoint named directly (RUN/checkpoints/x.pt)
        )
        if path.suffix == ".pt" and path.is_file():
            self.checkpoint_file, path = path, path.parent.parent
        self.path = path

    # ---- layout ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def checkpoint_path(self, which: str = "last") -> Path:
        """checkpoints/last.pt or checkpoints/best.pt."""
        return self.path / CHECKPOINT_DIR / CHECKPOINTS[which]

    def __repr__(self) -> str:
        return f"RunFolder({self.path})"

    # ---- create / check -------------------------------------------------------------------
    def create(self) -> None:
        """Make the folder for a new run; UserError if it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"-o {self.path}: cannot write there ({e.strerror})") from None

    def discard(self) -> None:
        """Delete a folder this session created when it failed before it held a checkpoint."""
        if not self.checkpoint_path("last").exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def check_new(self) -> None:
        """UserError when the folder already holds a trained run (checked under the lock)."""
        if self.checkpoint_path("last").exists():
            raise UserError(
                f"-o {self.path}: already holds a trained run; use --resume {self.path} or "
                "another folder"
            )

    def hold(self) -> RunLock:
        """Lock the folder for this process's writes (UserError naming the process that holds
        it) and remove the temporary files an interrupted writer left behind."""
        lock = RunLock(self.lock_path)
        lock.acquire()
        names = [CONFIG, METRICS]
        checkpoint_names = [n + x for n in CHECKPOINTS.values() for x in ("", DIGEST_SUFFIX)]
        remove_paths(
            stale_temps(self.path, names)
            + stale_temps(self.path / CHECKPOINT_DIR, checkpoint_names)
        )
        return lock

    # ---- config ---------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """config.json, or a UserError when this is not a run folder or the file is damaged."""
        if not self.config_path.exists():
            raise UserError(
                f"--resume {self.path}: no config.json there (not a tvae-em run folder)"
            )
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(
                f"{self.config_path}: not a readable config.json ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'damaged'}); see docs/errors.md"
            ) from None
        if not isinstance(config, dict) or not isinstance(config.get("options"), dict):
            raise UserError(f'{self.config_path}: has no "options" (not written by tvae-em train)')
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        """config.json, written atomically."""
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")

    def saved_options(self) -> dict[str, Any]:
        """The training options of the run (config.json), with renamed options under new names
        and file options as the absolute paths they had when the run started (when those
        exist), so they mean the same from any working directory."""
        config = self.read_config()
        saved = dict(config["options"])
        for old, new in RENAMED_OPTIONS.items():
            if old in saved and new not in saved:
                saved[new] = saved.pop(old)
        for key, value in ADDED_OPTIONS.items():
            saved.setdefault(key, value)
        for key, path in (config.get("resolved_paths") or {}).items():
            if key in saved and path is not None and Path(path).exists():
                saved[key] = path
        return saved

    def resume_options(self, given: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
        """The options of a resumed run: the saved ones, updated with those given explicitly."""
        merged = {**self.saved_options(), **{k: given[k] for k in explicit if k in given}}
        merged["out_dir"] = str(self.path)
        return merged

    @staticmethod
    def check_resume(saved: dict[str, Any], current: dict[str, Any], explicit: set[str]) -> None:
        """Refuse to resume when an explicitly given option differs from the saved run's."""
        for key in sorted(explicit - RESUMABLE_CHANGES):
            if key in PATH_OPTIONS and key in saved and key in current:
                if _same_path(saved[key], current[key]):
                    continue
            if key in saved and key in current and saved[key] != current[key]:
                raise UserError(
                    f"--resume {current['out_dir']}: option {key}={current[key]!r} differs from "
                    f"the run's {saved[key]!r}; start a new run folder instead"
                )

    def used_ctf(self, train_config: dict[str, Any], stack=None) -> bool:
        """Whether the run was trained with the CTF: config.json's "ctf", else its --ctf option
        (``auto``: whether ``stack`` has defocus)."""
        if self.config_path.is_file():
            try:
                return bool(json.loads(self.config_path.read_text()).get("ctf", False))
            except (OSError, ValueError):
                pass
        mode = train_config.get("ctf", "off")
        if mode == "auto":
            return stack is not None and stack.ctf_params() is not None
        return mode == "on"

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, which: str, payload: dict[str, Any]) -> None:
        """torch.save under a temporary name in checkpoints/, then an atomic rename, with its
        size and sha256 in ``<name>.sha256``.

        The digest file accepts the old and the new checkpoint while the rename happens, so a
        kill at any moment leaves a checkpoint that verifies.
        """
        path = self.checkpoint_path(which)
        path.parent.mkdir(parents=True, exist_ok=True)
        digests = digest_path(path)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
            new = file_digest(tmp.read_bytes())
            old = _current_digests(path, digests)
            _write_digests(digests, [new, *[d for d in old if d != new]])
        _write_digests(digests, [new])

    def find_checkpoint(self, which: str = "last") -> Path:
        """The checkpoint file (`last` or `best`), or a UserError naming the folder."""
        if self.checkpoint_file is not None:
            return self.checkpoint_file
        if not self.path.is_dir():
            raise UserError(f"{self.path}: run folder not found")
        path = self.checkpoint_path("best" if which == "best" else "last")
        if not path.exists():
            last = self.checkpoint_path("last")
            if which == "best" and last.exists():
                raise UserError(
                    f"--checkpoint best: {self.path} has no {path.relative_to(self.path)} "
                    f"(only {last.relative_to(self.path)}: use --checkpoint last)"
                )
            raise UserError(
                f"{self.path}: no checkpoint in {self.path / CHECKPOINT_DIR} (train first)"
            )
        return path

    def load_checkpoint(self, which: str = "last", device="cpu") -> dict[str, Any]:
        """The payload of a checkpoint (tensors on ``device``), or a UserError naming the file."""
        return read_checkpoint(self.find_checkpoint(which), device)

    def load_model(self, device="cpu", which: str = "last") -> TrainedModel:
        """Rebuild the TargetVAE of this run from its checkpoint (state dict + config), in eval
        mode, without e2cnn's deprecation chatter on the terminal."""
        from .model import ModelConfig, TargetVAE

        path = self.find_checkpoint(which)
        ck = read_checkpoint(path, device)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")
                model = TargetVAE(ModelConfig.from_dict(ck["model_config"])).to(device)
            model.load_state_dict(ck["model"])
        except (KeyError, RuntimeError) as e:
            raise UserError(
                f"{path}: checkpoint does not match this version of tvae-em ({type(e).__name__}); "
                "retrain or use the version that wrote it"
            ) from None
        model.eval()
        norm = ck.get("normalisation", {"mean": 0.0, "sd": 1.0})
        return TrainedModel(
            model=model,
            model_config=ck["model_config"],
            train_config=ck.get("train_config", {}),
            normalisation=Normalisation(float(norm["mean"]), float(norm["sd"])),
            epoch=int(ck["epoch"]),
            path=path,
            run=self,
        )

    def save_model(
        self,
        model: torch.nn.Module,
        options: dict[str, Any],
        normalisation: Normalisation | None = None,
        ctf: bool = False,
        epoch: int = 0,
    ) -> None:
        """A run folder holding ``model`` as it stands (config.json + checkpoints/last.pt), for
        models made outside `train` (tests, benchmarks)."""
        normalisation = normalisation or Normalisation()
        model_config = model.cfg.to_dict()
        optim = torch.optim.Adam(model.parameters())
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optim)
        self.save_checkpoint(
            "last",
            checkpoint_payload(
                model, optim, sched, epoch, 0.0, model_config, options, normalisation, "test", {}
            ),
        )
        self.write_config(
            run_config(options, model_config, normalisation, "test", 0, ctf, "cpu", 1)
        )


def read_checkpoint(path: Path, device="cpu") -> dict[str, Any]:
    """Load a checkpoint payload, verified against its ``.sha256`` digest file when it has one
    (checkpoints of earlier versions have none), or raise a UserError naming the file."""
    path = Path(path)
    for attempt in range(3):  # a checkpoint replaced while it was read is read again
        try:
            before = os.stat(path)
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
        problem = _digest_problem(path, data)
        if problem is None:
            break
        now = os.stat(path)
        if (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns) or attempt == 2:
            raise UserError(f"{path}: damaged checkpoint ({problem}); see docs/errors.md")
    try:
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file is the user's to fix
        raise UserError(f"{path}: not a readable tvae-em checkpoint ({type(e).__name__})") from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"{path}: not a tvae-em checkpoint (no model state)")
    return payload


def _digest_problem(path: Path, data: bytes) -> str | None:
    """Why ``data`` (the bytes of checkpoint ``path``) fails its digest file; None when it
    passes or there is no digest file (checkpoints of earlier versions)."""
    digests = digest_path(path)
    if not digests.exists():
        return None
    accepted = _read_digests(digests)
    found = file_digest(data)
    if found in accepted:
        return None
    sizes = sorted({d["size"] for d in accepted})
    if found["size"] not in sizes:
        expected = " or ".join(map(str, sizes))
        return f"{found['size']} bytes instead of {expected}, per {digests.name}"
    return f"its sha256 differs from {digests.name}"


def digest_path(checkpoint: Path) -> Path:
    """The digest file of a checkpoint: last.pt -> last.pt.sha256."""
    return checkpoint.with_name(checkpoint.name + DIGEST_SUFFIX)


def file_digest(data: bytes) -> dict[str, Any]:
    """Size and sha256 of a file's bytes."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_digests(path: Path) -> list[dict[str, Any]]:
    """The digests a checkpoint may have (one, or two while a new one is renamed in)."""
    try:
        accepted = json.loads(path.read_text())["accepted"]
        return [{"size": int(d["size"]), "sha256": str(d["sha256"])} for d in accepted]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable checkpoint digest ({type(e).__name__})") from None


def _current_digests(path: Path, digests: Path) -> list[dict[str, Any]]:
    """The digests the checkpoint now at ``path`` verifies with (none when there is none)."""
    if not path.exists():
        return []
    try:
        return _read_digests(digests)
    except UserError:  # no digest file (an earlier version's run) or a damaged one
        return [file_digest(path.read_bytes())]


def _write_digests(path: Path, accepted: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"accepted": accepted}) + "\n")


def _same_path(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two path options name the same file (from the working directory)."""
    if a is None or b is None:
        return a is b
    return os.path.abspath(a) == os.path.abspath(b)


# ---- the schema -------------------------------------------------------------------------------
def run_config(
    options: dict[str, Any],
    model_config: dict[str, Any],
    normalisation: Normalisation,
    fingerprint: str,
    n_particles: int,
    ctf: bool,
    device: str,
    world_size: int,
) -> dict[str, Any]:
    """The content of config.json."""
    return {
        "version": __version__,
        "command": command_line(),
        "options": options,
        "model_config": model_config,
        "normalisation": asdict(normalisation),
        "fingerprint": fingerprint,
        "resolved_paths": {
            key: os.path.abspath(options[key]) if options.get(key) else None for key in PATH_OPTIONS
        },
        "n_particles": n_particles,
        "ctf": ctf,
        "device": device,
        "world_size": world_size,
    }


def checkpoint_payload(
    model: torch.nn.Module,
    optim,
    sched,
    epoch: int,
    best_loss: float,
    model_config: dict[str, Any],
    options: dict[str, Any],
    normalisation: Normalisation,
    fingerprint: str,
    rng: dict[str, Any],
) -> dict[str, Any]:
    """The content of a checkpoint (state dicts, never modules)."""
    return {
        "model": model.state_dict(),
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "best_loss": best_loss,
        "rng": rng,
        "model_config": model_config,
        "train_config": options,
        "normalisation": asdict(normalisation),
        "fingerprint": fingerprint,
        "version": __version__,
    }


class MetricsLog:
    """metrics.csv with one row per epoch; on resume rows after the checkpoint epoch are dropped."""

    def __init__(self, path: Path, keep_until_epoch: int | None):
        self.path = Path(path)
        rows: list[dict[str, str]] = []
        if keep_until_epoch is not None and self.path.exists():
            rows = [r for r in read_metrics(self.path) if int(r["epoch"]) <= keep_until_epoch]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(
                {
                    k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                    for k in METRIC_FIELDS
                }
            )


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv; UserError naming the file and line of a row that is not one.

    A last line cut short (no newline: a kill while it was written) is dropped; it belongs to an
    epoch after the last checkpoint, which a resume runs again.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the metrics ({type(e).__name__})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            try:
                int(row["epoch"])
                [float(row[k]) for k in METRIC_FIELDS[1:] if row.get(k) not in (None, "")]
            except (KeyError, TypeError, ValueError):
                if not text.endswith("\n") and reader.line_num == text.count("\n") + 1:
                    break
                raise UserError(
                    f"{path}: line {reader.line_num} is not a row of epoch metrics; "
                    "delete that line (see docs/errors.md)"
                ) from None
            rows.append(row)
    except csv.Error as e:
        raise UserError(f"{path}: cannot read the metrics ({e})") from None
    return rows


class RunLock:
    """An exclusive hold of a run folder by one process: ``flock`` on RUN/.lock, which holds the
    holder's pid and host for the message a second writer gets.

    The operating system drops the flock when its process dies, so a lock file left by a killed
    run is recognised as stale and taken over (`took_over` says whose it was).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a UserError naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or _alive(holder):
                    os.close(fd)
                    raise UserError(
                        f"{self.path.parent}: another tvae-em train is writing there "
                        f"({_describe(holder)}); wait for it to finish, or use another folder"
                    ) from None
            try:  # a releasing holder unlinks the file: lock the one that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.took_over = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%c")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)

    def release(self) -> None:
        """Give the lock up and remove the lock file."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The pid/host/since a lock file holds (None when empty or not ours)."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict[str, Any] | None) -> bool:
    """Whether a lock holder is a live process of this host (where flock is unavailable)."""
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
