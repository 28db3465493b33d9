"""Pose consistency: the encoder's angle and latent under in-bin rotations of the input.

The C_N encoder is exactly equivariant only to turns by multiples of 2*pi/N. Between them nothing
ties its angle to the image's, and the generator can turn its template with z instead, so z
learns the in-bin angle (a gauge freedom of the model) and misses real variability (docs/model.md,
"Pose consistency"). This term turns each training image by delta ~ U(-pi/N, pi/N) and asks the
encoder to answer theta + delta and the same z:

    penalty = w_theta * (1 - cos(theta(R y) - theta(y) - delta)) + w_z * |z(R y) - z(y)|^2

with theta and z the posterior means over the cells (circular for theta). It is added to -ELBO
in training only; the ELBO itself is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..geometry import transform_images
from .posterior import CellPosterior, weighted_pose


def posterior_mean_pose(post: CellPosterior, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-mean angle (B,) rad (circular mean of o_r + theta_mu over q) and z (B, Z)."""
    return weighted_pose(post, post.log_q.exp(), n)


def in_bin_turns(batch: int, n: int, device=None) -> torch.Tensor:
    """(B,) angles delta ~ U(-pi/N, pi/N): the turns the C_N encoder is not equivariant to."""
    return (torch.rand(batch, device=device) * 2 - 1) * (math.pi / n)


def pose_consistency(
    posterior: Callable[[torch.Tensor], CellPosterior],
    y: torch.Tensor,
    post: CellPosterior,
    n: int,
    w_theta: float,
    w_z: float,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) penalty for images y (B, D, D) whose posterior is `post`; `posterior` encodes images.

    delta (B,) rad: the turns (None: drawn by `in_bin_turns`). Turned images are resampled
    bilinearly; the corners that come from outside the box are zero (the images' mean).
    """
    if delta is None:
        delta = in_bin_turns(len(y), n, y.device)
    turned = transform_images(y.float(), delta, y.new_zeros(len(y), 2).float())
    post_turned = posterior(turned.to(y.dtype))
    with torch.autocast(y.device.type, enabled=False):
        theta, z = posterior_mean_pose(post, n)
        theta_t, z_t = posterior_mean_pose(post_turned, n)
        angle = 1.0 - torch.cos(theta_t - theta - delta)
        return w_theta * angle + w_z * ((z_t - z) ** 2).sum(1)
