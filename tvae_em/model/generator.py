"""Spatial generator: a coordinate MLP g_z(x) on random Fourier features, z injected linearly.

Coordinates are in box units (pixel offset / (D/2)), so a model trained at box D renders the same
object at any image size and any pose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.01


class SpatialGenerator(nn.Module):
    """g(x, z) = MLP(cos(W x + b) A + z Bz): (B, P, 2) coordinates, (B, Z) latents -> (B, P)."""

    def __init__(
        self,
        z_dim: int,
        box: int,
        hidden: int = 512,
        layers: int = 2,
        features: int = 256,
        scale_px: float = 2.0,
    ):
        super().__init__()
        # frequencies in rad per box unit: sd 1/scale_px rad per pixel, one box unit is box/2 px
        sd = (box / 2) / scale_px
        self.freq = nn.Parameter(torch.randn(features, 2) * sd)  # (F, 2)
        self.phase = nn.Parameter(torch.rand(features) * 2 * math.pi)  # (F,)
        self.coord = nn.Linear(features, hidden)
        self.latent = nn.Linear(z_dim, hidden, bias=False)
        body: list[nn.Module] = []
        for _ in range(layers - 1):
            body += [nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
        body.append(nn.Linear(hidden, 1))
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # phases need float32 precision
            feats = torch.cos(torch.matmul(x.float(), self.freq.T) + self.phase)  # (B, P, F)
        h = F.linear(feats, self.coord.weight)  # (B, P, H)
        h += (self.coord.bias + self.latent(z))[:, None, :]  # z enters linearly, per image
        h = F.leaky_relu(h, LEAKY_SLOPE, inplace=True)  # in place: saves two passes per step
        return self.body(h)[..., 0]  # (B, P)
