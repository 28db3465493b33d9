"""The run folder: the one module that knows its layout and the schema of what it holds.

A run folder (``tvae-em train -o RUN``) holds
    config.json             version, command line, options, model config, normalisation, input
                            fingerprint, whether the CTF was used, device, world size
    checkpoints/last.pt     state dicts (never pickled modules) + optimizer, scheduler, RNG states
    checkpoints/best.pt     the same at the lowest epoch loss
    metrics.csv             one row per epoch (METRIC_FIELDS)
    train.log               the log lines of every session
train, embed, generate, the tests and the benchmarks all read and write it through `RunFolder`.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import Normalisation
from .errors import UserError
from .io import atomic_path
from .runtime import command_line

CONFIG = "config.json"
METRICS = "metrics.csv"
LOG = "train.log"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS = {"last": "last.pt", "best": "best.pt"}
METRIC_FIELDS = [
    "epoch",
    "loss",
    "log_lik",
    "kl_tr",
    "kl_theta",
    "kl_z",
    "lr",
    "particles_per_s",
    "seconds",
    "k_max",
]
# Options that may change on resume (they do not change the result, or only extend it).
RESUMABLE_CHANGES = {"epochs", "num_workers", "device", "checkpoint_every", "resume", "progress"}
# Option names of earlier versions, as saved in their config.json -> today's names.
RENAMED_OPTIONS = {"apix": "input_apix"}


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

    def checkpoint_path(self, which: str = "last") -> Path:
        """checkpoints/last.pt or checkpoints/best.pt."""
        return self.path / CHECKPOINT_DIR / CHECKPOINTS[which]

    def __repr__(self) -> str:
        return f"RunFolder({self.path})"

    # ---- create / check -------------------------------------------------------------------
    def create(self) -> None:
        """Make the folder for a new run; UserError if it cannot be written or holds a run."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / CHECKPOINT_DIR).mkdir(exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"-o {self.path}: cannot write there ({e.strerror})") from None
        if self.checkpoint_path("last").exists():
            raise UserError(
                f"-o {self.path}: already holds a trained run; use --resume {self.path} or "
                "another folder"
            )

    # ---- config ---------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """config.json, or a UserError when this is not a run folder."""
        if not self.config_path.exists():
            raise UserError(
                f"--resume {self.path}: no config.json there (not a tvae-em run folder)"
            )
        return json.loads(self.config_path.read_text())

    def write_config(self, config: dict[str, Any]) -> None:
        """config.json, written atomically."""
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")

    def saved_options(self) -> dict[str, Any]:
        """The training options of the run (config.json), with renamed options under new names."""
        saved = dict(self.read_config()["options"])
        for old, new in RENAMED_OPTIONS.items():
            if old in saved and new not in saved:
                saved[new] = saved.pop(old)
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
        """torch.save under a temporary name in checkpoints/, then an atomic rename."""
        path = self.checkpoint_path(which)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    def find_checkpoint(self, which: str = "last") -> Path:
        """The checkpoint file (`last` or `best`), or a UserError naming the folder."""
        if self.checkpoint_file is not None:
            return self.checkpoint_file
        if not self.path.is_dir():
            raise UserError(f"{self.path}: run folder not found")
        path = self.checkpoint_path("best" if which == "best" else "last")
        if not path.exists():
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
    """Load a checkpoint payload or raise a UserError naming the file."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file is the user's to fix
        raise UserError(f"{path}: not a readable tvae-em checkpoint ({type(e).__name__})") from e


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
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_until_epoch]
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
