"""Run folders and checkpoints: atomic writes, RNG states, and loading a trained model back.

A run folder holds `config.json` (options, input fingerprint, version, command line),
`checkpoints/last.pt` and `checkpoints/best.pt` (state dicts only, never pickled modules),
`metrics.csv` and `train.log`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    """Every random number generator state a training run depends on."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Fix Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary name in the same folder, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def find_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """The checkpoint file of a run folder (`last` or `best`), or a UserError naming the folder."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".pt":
        return run_dir
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    path = run_dir / CHECKPOINT_DIR / (BEST if which == "best" else LAST)
    if not path.exists():
        raise UserError(f"{run_dir}: no checkpoint in {run_dir / CHECKPOINT_DIR} (train first)")
    return path


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint payload (tensors on `device`) or raise a UserError naming the file."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file is the user's to fix
        raise UserError(f"{path}: not a readable tvae-em checkpoint ({type(e).__name__})") from e


@dataclass
class TrainedModel:
    """A model loaded from a run folder, with what inference needs to feed it like in training."""

    model: torch.nn.Module
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    norm_mean: float
    norm_sd: float
    epoch: int
    path: Path


def load_trained(
    run_dir: Path, device: str | torch.device = "cpu", which: str = "last"
) -> TrainedModel:
    """Rebuild the TargetVAE of a run folder from its checkpoint (state dict + config)."""
    from .model import ModelConfig, TargetVAE

    path = find_checkpoint(run_dir, which)
    ck = load_checkpoint(path, device)
    try:
        cfg = ModelConfig.from_dict(ck["model_config"])
        model = TargetVAE(cfg).to(device)
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
        norm_mean=float(norm["mean"]),
        norm_sd=float(norm["sd"]),
        epoch=int(ck["epoch"]),
        path=path,
    )
