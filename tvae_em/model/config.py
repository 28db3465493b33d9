"""ModelConfig: every setting of the TARGET-VAE model, validated and JSON-serialisable."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import UserError

LIKELIHOODS = ("gaussian", "bernoulli")
RENDERERS = ("real", "fourier")
ROTATION_PRIORS = ("uniform", "gaussian")
Z_SOURCES = ("cells", "aligned")
MIN_BOX = 8


def default_kernel(box: int) -> int:
    """Lifting-kernel side for a box: the odd integer nearest 0.55 * box (about the object size)."""
    k = int(round(0.55 * box))
    return max(3, k if k % 2 == 1 else k + 1 if k + 1 <= box else k - 1)


def _positive(x) -> bool:
    """True for a finite number > 0 (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass
class ModelConfig:
    """Settings of the model; None fields are resolved from `box` when the config is created.

    Save with ``dataclasses.asdict(cfg)`` and load with ``ModelConfig.from_dict(d)``.
    """

    box: int
    z_dim: int = 2
    rotations: int = 8
    t_sd_px: float | None = None  # sd of the Gaussian shift prior in pixels; None: 0.05 * box
    shift_window: float = 4.0  # encoder cells cover shifts up to this many t_sd_px (`cell_side`)
    r_prior: str = "uniform"  # "uniform" or "gaussian" over the bin centres
    r_prior_sd: float = math.pi / 4  # radians, for r_prior == "gaussian"
    likelihood: str = "gaussian"  # "gaussian" or "bernoulli"
    learn_sigma: bool = False  # Gaussian only: learn one log-sigma instead of unit variance
    encoder_kernel: int | None = None  # odd lifting-kernel side; None: about 0.55 * box
    encoder_fields: int = 8  # learned templates: regular fields (x N channels) of the lifting layer
    encoder_hidden_fields: int = 16  # regular fields of each 1x1 layer
    encoder_layers: int = 2  # number of 1x1 regular -> regular layers before the heads
    attention_gain: float = 10.0  # fixed factor on the attention head: lets q(t, r) sharpen fast
    generator_hidden: int = 512
    generator_layers: int = 2
    fourier_features: int = 256
    fourier_scale_px: float = 2.0  # length scale of the random Fourier features, in pixels
    pixel_fraction: float = 0.25  # pixels evaluated per training step (1.0 at eval or with a CTF)
    renderer: str = "real"  # "real": generator on pixels; "fourier": on frequencies (docs/model.md)
    spectral_extent_px: float | None = None  # Fourier renderer: feature positions' sd; 0.25 * box
    tau: float = 1.0  # Gumbel-softmax temperature
    consistency_theta: float = 0.0  # training penalty weight on the angle under in-bin turns
    consistency_z: float = 0.0  # training penalty weight on z under in-bin turns
    z_source: str = "cells"  # "cells": z head at the winning cell; "aligned": the aligned particle
    z_turn_penalty: float = 10.0  # aligned z: penalty (nats / unit^2) on z under small turns
    seed: int = 0  # seed of the fixed random initialisation (Fourier features, weights)

    def __post_init__(self) -> None:
        if self.t_sd_px is None:
            self.t_sd_px = 0.05 * self.box
        if self.spectral_extent_px is None:
            self.spectral_extent_px = 0.25 * self.box
        if self.encoder_kernel is None:
            self.encoder_kernel = default_kernel(self.box) if self.box >= MIN_BOX else 3
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first impossible setting."""
        n = self.rotations
        if not isinstance(self.box, int) or self.box < MIN_BOX:
            raise UserError(f"box size {self.box} is too small: the model needs at least {MIN_BOX}")
        if not isinstance(n, int) or n < 4 or n & (n - 1):
            raise UserError(f"--rotations must be a power of two >= 4 (4, 8, 16, ...), got {n}")
        k = self.encoder_kernel
        if not isinstance(k, int) or k < 3 or k % 2 == 0:
            raise UserError(f"encoder kernel must be an odd integer >= 3, got {k}")
        if k > self.box:
            raise UserError(f"box {self.box} is smaller than the encoder's receptive field {k}")
        checks = [
            (self.z_dim >= 1, f"--z-dim must be >= 1, got {self.z_dim}"),
            (self.t_sd_px > 0, f"--t-sd must be > 0, got {self.t_sd_px}"),
            (
                _positive(self.shift_window),
                f"shift_window must be > 0 (shift-prior sds), got {self.shift_window}",
            ),
            (self.r_prior in ROTATION_PRIORS, f"--r-prior must be one of {ROTATION_PRIORS}"),
            (self.r_prior_sd > 0, f"rotation prior sd must be > 0, got {self.r_prior_sd}"),
            (self.likelihood in LIKELIHOODS, f"--likelihood must be one of {LIKELIHOODS}"),
            (self.encoder_fields >= 1, "encoder_fields must be >= 1"),
            (self.encoder_hidden_fields >= 1, "encoder_hidden_fields must be >= 1"),
            (self.encoder_layers >= 0, "encoder_layers must be >= 0"),
            (self.attention_gain > 0, "attention_gain must be > 0"),
            (self.generator_hidden >= 1, "--generator-hidden must be >= 1"),
            (self.generator_layers >= 1, "generator_layers must be >= 1"),
            (self.fourier_features >= 1, "fourier_features must be >= 1"),
            (self.fourier_scale_px > 0, "fourier_scale_px must be > 0"),
            (
                0 < self.pixel_fraction <= 1,
                f"pixel_fraction must be in (0, 1], got {self.pixel_fraction}",
            ),
            (self.tau > 0, f"Gumbel-softmax temperature must be > 0, got {self.tau}"),
            (
                self.consistency_theta >= 0 and self.consistency_z >= 0,
                "--pose-consistency weights must be >= 0",
            ),
            (self.renderer in RENDERERS, f"--renderer must be one of {RENDERERS}"),
            (self.z_source in Z_SOURCES, f"--z-source must be one of {Z_SOURCES}"),
            (self.z_turn_penalty >= 0, f"z_turn_penalty must be >= 0, got {self.z_turn_penalty}"),
            (
                self.renderer == "real" or self.likelihood == "gaussian",
                "--renderer fourier needs the gaussian likelihood (use --renderer real)",
            ),
            (self.spectral_extent_px > 0, "spectral_extent_px must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def cell_side(self) -> int:
        """S: side of the centred S x S window of translation cells (shifts |x|, |y| <= S // 2 px).

        S = 2R + 1 with R = ceil(shift_window * t_sd_px): cells further out have prior mass
        below exp(-shift_window^2 / 2) each. Where that window does not fit the box, S = box
        (every pixel is a cell).
        """
        half = math.ceil(self.shift_window * self.t_sd_px - 1e-9)
        side = 2 * half + 1
        return side if side <= self.box else self.box

    def to_dict(self) -> dict:
        """Plain dict of every (resolved) setting, for config.json and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Rebuild from `to_dict()` output; unknown keys are a UserError (wrong file or version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model settings {unknown} in the saved configuration")
        return cls(**d)
