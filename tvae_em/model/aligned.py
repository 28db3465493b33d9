"""q(z | y, pose) from the particle put back into the template frame (`ModelConfig.z_source`).

The paper reads z at the encoder's winning cell. On flexible particles that z learns to correct
the encoder's angle instead of the motion (docs/model.md, "z from the aligned particle"). Here z is
a linear map of the particle phase-flipped by its CTF (one contrast at every frequency) and turned
and shifted back by its pose: what is left once the pose is undone, as 2D variability analyses
(PCA of aligned particles) read it.
A small turn is a linear change of the aligned image, so the linear map could also read the
residual error of the pose and the generator use it to turn its template; `turn_change` measures
z's response to small turns, which training penalises (`ModelConfig.z_turn_penalty`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..fourier import phase_flip
from ..geometry import align_images
from .posterior import LOGSD_MAX, LOGSD_MIN


class AlignedLatent(nn.Module):
    """Gaussian q(z | y, theta, t): mean and log-sd (B, Z) from the aligned particle (B, D, D)."""

    def __init__(self, box: int, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.linear = nn.Linear(box * box, 2 * z_dim)

    def forward(
        self, y: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, ctf: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y (B, D, D), pose theta (B,) rad and t (B, 2) px (not differentiated), CTFs (B, D, D)
        or None -> z mean and log-sd (B, Z)."""
        with torch.autocast(y.device.type, enabled=False):
            x = y.float() if ctf is None else phase_flip(y.float(), ctf)
            a = align_images(x, theta.detach().float(), t.detach().float())  # (B, D, D)
            h = self.linear(a.reshape(len(a), -1))
        return h[:, : self.z_dim], h[:, self.z_dim :].clamp(LOGSD_MIN, LOGSD_MAX)

    def turn_change(
        self,
        y: torch.Tensor,
        theta: torch.Tensor,
        t: torch.Tensor,
        ctf: torch.Tensor | None,
        mu: torch.Tensor,
        max_deg: float = 5.0,
    ) -> torch.Tensor:
        """(B,) |z(pose turned by delta) - z(pose)|^2 for delta ~ U(-max_deg, max_deg): how much
        z's mean mu (B, Z) at (theta, t) follows a small error of the angle."""
        delta = (torch.rand_like(theta) * 2 - 1) * math.radians(max_deg)
        turned, _ = self(y, theta + delta, t, ctf)
        return ((turned - mu) ** 2).sum(1)
