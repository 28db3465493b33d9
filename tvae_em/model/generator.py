"""Spatial generator: a coordinate MLP g_z(x) on random Fourier features, z injected linearly.

Coordinates are in box units (pixel offset / (D/2)), so a model trained at box D renders the same
object at any image size and any pose. `CoordinateNetwork` is the network itself, shared with the
Fourier renderer's generator (`spectral.SpectralGenerator`), which evaluates it on frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.01


class CoordinateNetwork(nn.Module):
    """MLP(cos(W x + b) A + z Bz) -> `outputs` numbers per coordinate: (B, P, 2), (B, Z) ->
    (B, P, outputs). W (F, 2) starts Gaussian with sd `freq_sd` (radians per coordinate unit)."""

    def __init__(
        self, z_dim: int, hidden: int, layers: int, features: int, outputs: int, freq_sd: float
    ):
        super().__init__()
        self.freq = nn.Parameter(torch.randn(features, 2) * freq_sd)  # (F, 2)
        self.phase = nn.Parameter(torch.rand(features) * 2 * math.pi)  # (F,)
        self.coord = nn.Linear(features, hidden)
        self.latent = nn.Linear(z_dim, hidden, bias=False)
        body: list[nn.Module] = []
        for _ in range(layers - 1):
            body += [nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
        body.append(nn.Linear(hidden, outputs))
        self.body = nn.Sequential(*body)

    def network(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, P, 2) coordinates, (B, Z) latents -> (B, P, outputs). Coordinates shared by the
        batch may come as (1, P, 2): their features and first layer are then computed once."""
        with torch.autocast(x.device.type, enabled=False):  # phases need float32 precision
            feats = torch.cos(torch.matmul(x.float(), self.freq.T) + self.phase)  # (B|1, P, F)
        h = F.linear(feats, self.coord.weight)  # (B|1, P, H)
        zh = (self.coord.bias + self.latent(z))[:, None, :]  # (B, 1, H): z enters linearly
        h = h.add_(zh) if h.shape[0] == zh.shape[0] else h + zh  # (B, P, H)
        h = F.leaky_relu(h, LEAKY_SLOPE, inplace=True)  # in place: saves two passes per step
        return self.body(h)


class SpatialGenerator(CoordinateNetwork):
    """g(x, z): (B, P, 2) coordinates in box units, (B, Z) latents -> (B, P) pixel values."""

    def __init__(
        self,
        z_dim: int,
        box: int,
        hidden: int = 512,
        layers: int = 2,
        features: int = 256,
        scale_px: float = 2.0,
    ):
        # frequencies in rad per box unit: sd 1/scale_px rad per pixel, one box unit is box/2 px
        super().__init__(z_dim, hidden, layers, features, 1, (box / 2) / scale_px)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.network(x, z)[..., 0]  # (B, P)
