"""Every option of a training run (written to config.json) and the model settings they give."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UserError

# Pose-consistency weights (model.consistency; docs/model.md, "Pose consistency"): nats per unit
# of 1 - cos(angle error) and per unit^2 of z change under an in-bin turn of the input.
ANGLE_CONSISTENCY = 0.0
Z_CONSISTENCY = 0.0
# Aligned z: nats per unit^2 of z change under a turn of up to 5 deg (docs/model.md)
Z_TURN_PENALTY = 10.0


@dataclass
class TrainOptions:
    """Every option of a training run (written to config.json)."""

    input: str
    out_dir: str
    z_dim: int = 2
    rotations: int = 8
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    t_sd: str | None = None
    r_prior: str = "uniform"
    r_prior_sd_deg: float = 45.0
    likelihood: str = "auto"
    ctf: str = "auto"
    tau: float = 1.0
    angle_consistency: float = ANGLE_CONSISTENCY
    z_consistency: float = Z_CONSISTENCY
    pixel_fraction: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    num_workers: int = 0
    checkpoint_every: int = 1
    datadir: str | None = None
    input_apix: float | None = None
    renderer: str = "auto"
    generator_hidden: int = 512
    band_start: float = 0.3
    band_epochs: float | None = None
    z_source: str = "auto"
    pose_search_from: int | None = None
    z_turn_penalty: float = Z_TURN_PENALTY
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """UserError naming the first impossible option that needs no data; `prepare` runs it
        first (the batch size and the model settings are checked against the data next, still
        before anything is created)."""
        from ..data import check_num_workers
        from ..runtime import check_seed

        positive = [
            ("--lr", self.lr),
            ("--tau", self.tau),
            ("--r-prior-sd", self.r_prior_sd_deg),
        ]
        for option, value in positive:
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise UserError(f"{option} {value}: must be a positive number")
        for option, value in (
            ("--epochs", self.epochs),
            ("--checkpoint-every", self.checkpoint_every),
        ):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{option} {value}: must be at least 1")
        ps = self.pose_search_from
        if ps is not None and (not isinstance(ps, int) or isinstance(ps, bool) or ps < 0):
            raise UserError(f"--pose-search-from {ps}: must be an epoch >= 1 (0: off)")
        if self.z_source not in Z_SOURCE_CHOICES:
            raise UserError(
                f"--z-source {self.z_source}: choose from {', '.join(Z_SOURCE_CHOICES)}"
            )
        for option, value in (
            ("--angle-consistency", self.angle_consistency),
            ("--z-consistency", self.z_consistency),
            ("--z-turn-penalty", self.z_turn_penalty),
        ):
            if not _is_number(value) or not (math.isfinite(value) and value >= 0):
                raise UserError(f"{option} {value}: must be a number >= 0 (0 turns it off)")
        fraction = self.pixel_fraction
        if fraction is not None and not (_is_number(fraction) and 0 < fraction <= 1):
            raise UserError(f"--pixel-fraction {fraction}: must be in (0, 1]")
        check_num_workers(self.num_workers)
        check_seed(self.seed)
        parse_t_sd(self.t_sd, box=1, apix=1.0)  # the form only; the value needs the data
        check_band_options(self)


RENDERER_CHOICES = ("auto", "real", "fourier")
Z_SOURCE_CHOICES = ("auto", "cells", "aligned")
POSE_SEARCH_FROM = 2  # the default epoch for gaussian (cryo-EM) data


def pose_search_epoch(opts: TrainOptions, likelihood: str) -> int:
    """The epoch from which training renders at searched poses (0: never): by default epoch 2
    for gaussian data (docs/model.md, "Pose search in training"), off for binary images."""
    if opts.pose_search_from is not None:
        return opts.pose_search_from
    return POSE_SEARCH_FROM if likelihood == "gaussian" else 0


def z_source(opts: TrainOptions, likelihood: str) -> str:
    """Where z is read: by default the aligned particle for gaussian data, the encoder's cells
    (the paper's model) for binary images."""
    if opts.z_source != "auto":
        return opts.z_source
    return "aligned" if likelihood == "gaussian" else "cells"


@dataclass(frozen=True)
class BandSchedule:
    """Coarse-to-fine training of the Fourier renderer: the scored band |k| <= k_max grows
    linearly from ``start`` x Nyquist to Nyquist over the first ``epochs`` epochs (0: no ramp)."""

    start: float
    epochs: float

    def k_max(self, epochs_done: float) -> float | None:
        """k_max in cycles per pixel after ``epochs_done`` (fractional) epochs; None at Nyquist."""
        if self.epochs <= 0 or epochs_done >= self.epochs:
            return None
        return 0.5 * (self.start + (1.0 - self.start) * epochs_done / self.epochs)


def band_schedule(opts: TrainOptions, renderer: str) -> BandSchedule:
    """The schedule of a run: none for the real-space renderer; by default the band reaches
    Nyquist after 40% of the epochs."""
    if renderer != "fourier":
        return BandSchedule(1.0, 0.0)
    epochs = 0.4 * opts.epochs if opts.band_epochs is None else opts.band_epochs
    return BandSchedule(opts.band_start, epochs)


def check_band_options(opts: TrainOptions) -> None:
    """UserError for impossible renderer and schedule options (before anything is created)."""
    if opts.renderer not in RENDERER_CHOICES:
        raise UserError(f"--renderer {opts.renderer}: choose from {', '.join(RENDERER_CHOICES)}")
    if not (math.isfinite(opts.band_start) and 0 < opts.band_start <= 1):
        raise UserError(
            f"--band-start {opts.band_start}: must be in (0, 1] (a fraction of Nyquist)"
        )
    if opts.band_epochs is not None and not (
        math.isfinite(opts.band_epochs) and opts.band_epochs >= 0
    ):
        raise UserError(f"--band-epochs {opts.band_epochs}: must be >= 0 (0: no schedule)")


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
        idx = np.arange(min(len(stack), 64))
        sample = stack.read(idx)
        stack.check_pixels(idx, sample)
        likelihood = choose_likelihood(torch.from_numpy(sample))
    renderer = opts.renderer
    if renderer == "auto":
        renderer = "fourier" if likelihood == "gaussian" else "real"
    cfg = {
        "box": box,
        "renderer": renderer,
        "generator_hidden": opts.generator_hidden,
        "z_dim": opts.z_dim,
        "rotations": opts.rotations,
        "t_sd_px": parse_t_sd(opts.t_sd, box, apix),
        "r_prior": opts.r_prior,
        "r_prior_sd": math.radians(opts.r_prior_sd_deg),
        "likelihood": likelihood,
        "tau": opts.tau,
        "consistency_theta": opts.angle_consistency,
        "consistency_z": opts.z_consistency,
        "z_source": z_source(opts, likelihood),
        "z_turn_penalty": opts.z_turn_penalty,
        "seed": opts.seed,
    }
    if opts.pixel_fraction is not None:
        cfg["pixel_fraction"] = opts.pixel_fraction
    cfg.update(opts.model_overrides)
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
