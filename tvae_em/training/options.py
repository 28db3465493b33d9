"""Every option of a training run (written to config.json) and the model settings they give."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UserError


@dataclass
class TrainOptions:
    """Every option of a training run (written to config.json)."""

    input: str
    out_dir: str
    z_dim: int = 2
    rotations: int = 8
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    t_sd: str | None = None
    r_prior: str = "uniform"
    r_prior_sd_deg: float = 45.0
    likelihood: str = "auto"
    ctf: str = "auto"
    tau: float = 1.0
    pixel_fraction: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    num_workers: int = 0
    checkpoint_every: int = 1
    datadir: str | None = None
    input_apix: float | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)


def parse_t_sd(spec: str | None, box: int, apix: float) -> float:
    """The shift prior's sd in pixels from '4', '4px' or '12A' (default: 5% of the box)."""
    if spec is None:
        return max(1.0, 0.05 * box)
    s = str(spec).strip()
    try:
        if s.lower().endswith("px"):
            value = float(s[:-2])
        elif s.endswith(("A", "a", "Å")):
            value = float(s[:-1]) / apix
        else:
            value = float(s)
    except ValueError:
        raise UserError(
            f"--t-sd {spec}: expected a number of pixels (e.g. 4 or 4px) or Angstrom (12A)"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--t-sd {spec}: must be positive")
    return value


def model_config(opts: TrainOptions, stack) -> dict[str, Any]:
    """The ModelConfig fields for this data and these options."""
    from ..model import choose_likelihood

    box = stack.box
    apix = float(np.median(stack.apix))
    likelihood = opts.likelihood
    if likelihood == "auto":
        sample = stack.read(np.arange(min(len(stack), 64)))
        likelihood = choose_likelihood(torch.from_numpy(sample))
    cfg = {
        "box": box,
        "z_dim": opts.z_dim,
        "rotations": opts.rotations,
        "t_sd_px": parse_t_sd(opts.t_sd, box, apix),
        "r_prior": opts.r_prior,
        "r_prior_sd": math.radians(opts.r_prior_sd_deg),
        "likelihood": likelihood,
        "tau": opts.tau,
        "seed": opts.seed,
    }
    if opts.pixel_fraction is not None:
        cfg["pixel_fraction"] = opts.pixel_fraction
    cfg.update(opts.model_overrides)
    return cfg
