"""Image coordinates, rotations and shifts: the one pose convention used everywhere.

Convention (see docs/conventions.md):
- an image is an array ``img[row, col]`` of size D x D, centred on pixel (D//2, D//2) (RELION);
- x = col - D//2 and y = row - D//2, in pixels (y grows with the row index, as RELION's alignment);
- ``R(theta) = [[cos, -sin], [sin, cos]]`` acts on (x, y);
- a particle at pose (theta, t) is ``T(t) R(theta) template``:
  ``particle(p) = template(R(-theta) (p - t))``.
RELION then aligns it with rlnAnglePsi = -theta (degrees) and rlnOriginX/YAngst = -t * pixel size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixel_grid(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(size, size, 2) tensor of (x, y) pixel coordinates relative to the centre pixel size//2."""
    r = torch.arange(size, device=device, dtype=dtype) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def normalised_grid(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(size, size, 2) (x, y) coordinates in box units: pixel offset / (size / 2), about [-1, 1]."""
    return pixel_grid(size, device, dtype) / (size / 2)


def rotation_matrix(theta: torch.Tensor) -> torch.Tensor:
    """(..., 2, 2) matrices [[cos, -sin], [sin, cos]] acting on (x, y) column vectors."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def transform_images(
    img: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """Apply T(t) R(theta) to a batch of images: out(p) = img(R(-theta) (p - t)).

    img: (B, D, D); theta: (B,) radians; t: (B, 2) pixels as (x, y). Outside is zero.
    """
    b, d, _ = img.shape
    p = pixel_grid(d, img.device, img.dtype).reshape(1, -1, 2) - t[:, None, :]  # (B, D*D, 2)
    rinv = rotation_matrix(-theta.to(img.dtype))  # (B, 2, 2)
    src = torch.einsum("bij,bpj->bpi", rinv, p)  # source (x, y) in pixels
    # grid_sample with align_corners=True maps -1 -> pixel 0 and +1 -> pixel D-1.
    src_pix = src + d // 2
    grid = (2.0 * src_pix / (d - 1) - 1.0).reshape(b, d, d, 2)
    out = F.grid_sample(img[:, None], grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[:, 0]


def align_images(img: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Undo a pose: the template estimate R(-theta) T(-t) img for particles at pose (theta, t)."""
    b, d, _ = img.shape
    p = pixel_grid(d, img.device, img.dtype).reshape(1, -1, 2)
    rot = rotation_matrix(theta.to(img.dtype))
    src = torch.einsum("bij,bpj->bpi", rot, p) + t[:, None, :]
    grid = (2.0 * (src + d // 2) / (d - 1) - 1.0).reshape(b, d, d, 2)
    out = F.grid_sample(
        img[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[:, 0]


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Angles wrapped to [-pi, pi)."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
