"""Image coordinates, rotations and shifts: the one pose convention used everywhere.

Convention (docs/architecture.md):
- an image is an array ``img[row, col]`` of size D x D, centred on pixel (D//2, D//2) (RELION);
- x = col - D//2 and y = row - D//2, in pixels (y grows with the row index, as RELION's alignment);
- ``R(theta) = [[cos, -sin], [sin, cos]]`` acts on (x, y);
- a particle at pose (theta, t) is ``T(t) R(theta) template``:
  ``particle(p) = template(R(-theta) (p - t))``.
RELION then aligns it with rlnAnglePsi = -theta (degrees) and rlnOriginX/YAngst = -t * pixel size
(`relion_pose`); cryoSPARC's alignments2D carry the same alignment in radians and pixels
(`cryosparc_pose`). The model's generator is evaluated at `undo_pose` coordinates.
"""

from __future__ import annotations

import math

import numpy as np
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


def same_rows(x: torch.Tensor) -> bool:
    """Whether every row of x (B, ...) equals the first (one pose or angle set for a batch)."""
    return bool((x == x[:1]).all())


def undo_pose(p: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """R(-theta) (p - t): where a particle at pose (theta, t) samples its template at pixels p.

    p: (B or 1, P, 2) pixel coordinates (x, y); theta: (B,) radians; t: (B, 2) -> (B, P, 2).
    """
    rinv = rotation_matrix(-theta)  # (B, 2, 2)
    return torch.einsum("bij,bpj->bpi", rinv, p - t[:, None, :])


def apply_pose(p: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """R(theta) p + t: the inverse of `undo_pose` (where template pixels p land in the particle)."""
    return torch.einsum("bij,bpj->bpi", rotation_matrix(theta), p) + t[:, None, :]


def transform_images(
    img: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """Apply T(t) R(theta) to a batch of images: out(p) = img(R(-theta) (p - t)).

    img: (B, D, D); theta: (B,) radians; t: (B, 2) pixels as (x, y). Outside is zero.
    """
    b, d, _ = img.shape
    p = pixel_grid(d, img.device, img.dtype).reshape(1, -1, 2)  # (1, D*D, 2)
    src = undo_pose(p, theta.to(img.dtype), t)  # source (x, y) in pixels
    # grid_sample with align_corners=True maps -1 -> pixel 0 and +1 -> pixel D-1.
    src_pix = src + d // 2
    grid = (2.0 * src_pix / (d - 1) - 1.0).reshape(b, d, d, 2)
    out = F.grid_sample(img[:, None], grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[:, 0]


def align_images(img: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Undo a pose: the template estimate R(-theta) T(-t) img for particles at pose (theta, t)."""
    b, d, _ = img.shape
    p = pixel_grid(d, img.device, img.dtype).reshape(1, -1, 2)
    src = apply_pose(p, theta.to(img.dtype), t)
    grid = (2.0 * (src + d // 2) / (d - 1) - 1.0).reshape(b, d, d, 2)
    out = F.grid_sample(
        img[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[:, 0]


def object_centroid(img: torch.Tensor) -> torch.Tensor:
    """(B, 2) centroid (x, y) in pixels of the object in each image (B, D, D): the image's
    departures from its median (the background), of the sign of the largest one (so dark and
    light objects both work), weighted by size."""
    img = img - img.flatten(1).median(1).values[:, None, None]
    flat = img.flatten(1)
    peak = flat.gather(1, flat.abs().argmax(1, keepdim=True))[:, 0]  # (B,)
    sign = torch.where(peak < 0, -1.0, 1.0)
    img = (img * sign[:, None, None]).clamp(min=0)
    w = img / img.sum((1, 2), keepdim=True).clamp(min=1e-12)
    return torch.einsum("bij,ijk->bk", w, pixel_grid(img.shape[-1], img.device))


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Angles wrapped to [-pi, pi)."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


# ---- export conventions -------------------------------------------------------------------------
def wrap_degrees(deg: np.ndarray) -> np.ndarray:
    """Angles in degrees wrapped to (-180, 180]."""
    return 180.0 - np.mod(180.0 - np.asarray(deg, dtype=np.float64), 360.0)


def relion_pose(
    theta: np.ndarray, t_px: np.ndarray, apix: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """RELION alignment undoing pose theta (n,) rad, t (n, 2) px: psi (n,) deg, origin (n, 2) A."""
    psi = wrap_degrees(-np.degrees(theta))
    origin = -np.asarray(t_px, dtype=np.float64) * np.asarray(apix, dtype=np.float64).reshape(-1, 1)
    return psi, origin


def cryosparc_pose(
    psi_deg: np.ndarray, origin_A: np.ndarray, psize: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """alignments2D pose (n,) rad in [0, 2 pi) (cryoSPARC's range) and shift (n, 2) px that pyem's
    csparc2star maps to the given RELION psi/origins (psi = degrees(pose), origin = shift * psize;
    no sign change); docs/outputs.md says how the sign was checked."""
    shift = np.asarray(origin_A, dtype=np.float64) / np.asarray(psize, np.float64).reshape(-1, 1)
    return np.mod(np.radians(psi_deg), 2 * np.pi), shift


def relion_from_cryosparc(
    pose_rad: np.ndarray, shift_px: np.ndarray, psize: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `cryosparc_pose`: rlnAnglePsi (n,) deg and origins (n, 2) A (pyem)."""
    origin = np.asarray(shift_px, dtype=np.float64) * np.asarray(psize, np.float64).reshape(-1, 1)
    return np.degrees(pose_rad), origin
