"""Where and how a computation runs: the device, torchrun's environment, random seeds and states."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cpu`; `cuda` or `cuda:k` (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use cpu)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
        return dev
    raise UserError(f"--device {spec}: expected auto, cpu, cuda or cuda:K")


BF16_CPU_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu probes


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds up `device`: CUDA, or a CPU with bf16 arithmetic (AVX512-BF16
    or AMX; elsewhere bf16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in BF16_CPU_CHECKS)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def command_line() -> str:
    """The command line as typed (best effort), for the records outputs keep."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def check_seed(seed: int) -> None:
    """UserError unless --seed is a non-negative integer (what NumPy's generators take)."""
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or a positive integer")


def seed_everything(seed: int) -> None:
    """Fix Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
