"""Pose refinement at read-out: align each particle to the model's own noise-free template.

The encoder gives the angle on a grid of N bins plus an offset that the KL term pulls to the bin
centre, and its shift is a posterior mean over pixel cells. Refinement programs follow a coarse
search by a finer one on the likelihood itself; so does this: the template of the particle's z is
rendered once (at twice the size, the same field of view, so that rotating it by interpolation is
accurate), turned to a grid of angles, multiplied by the particle's CTF, and scored against the
particle at every integer shift at once (an FFT cross-correlation) with the Gaussian
log-likelihood and the model's shift prior. A global pass over the circle (which also undoes
half-turn flips of the encoder) is followed by a local pass around its best angle; the best angle
and shift are then interpolated to sub-step precision (a parabola through the neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fourier import apply_ctf, fourier_crop, shift_images
from ..geometry import pixel_grid, rotation_matrix, same_rows, wrap_angle


@dataclass(frozen=True)
class RefineConfig:
    """Angular search: a global pass at `global_step_deg` over the circle (0: skip it, search
    only around the encoder's angle), then a local pass of +-`local_span_deg` at
    `local_step_deg` (with `half_turns`, also around the angle plus 180 deg: a search without the
    global pass that can still undo an encoder's half-turn flip); shifts up to `max_shift_px`
    from the box centre. The global pass scores
    Fourier-cropped copies at `coarse_box` (a low-resolution first pass, as refinement programs
    start; it picks the angle, the local pass scores at full size)."""

    global_step_deg: float = 10.0
    local_span_deg: float = 6.0
    local_step_deg: float = 1.0
    max_shift_px: float | None = None  # None: a quarter of the box
    coarse_box: int | None = 32  # the global pass on copies cropped to this box (None: full)
    half_turns: bool = False  # the local pass also around the half-turned angle


def rotated_templates(fine: torch.Tensor, theta: torch.Tensor, box: int) -> torch.Tensor:
    """Templates (B, 2D, 2D) rendered at twice the box turned by theta (B, J): (B, J, D, D).

    Output pixel p samples the template at R(-theta) p (pose (theta, 0)); the fine grid holds the
    template at half-pixel spacing, so bilinear interpolation there is accurate. A template
    shared by the batch (fine (1, 2D, 2D)) is turned once when every row of theta is the same.
    """
    b, j = theta.shape
    if fine.shape[0] == 1 and b > 1:
        if same_rows(theta):
            return rotated_templates(fine, theta[:1], box).expand(b, -1, -1, -1)
        fine = fine.expand(b, -1, -1)
    size = fine.shape[-1]
    p = pixel_grid(box, fine.device).reshape(-1, 2)  # (D*D, 2) coarse pixels
    src = torch.einsum("bjik,pk->bjpi", rotation_matrix(-theta), p)  # (B, J, D*D, 2)
    idx = src * (size / box) + size // 2  # fine-grid pixel index
    grid = (2.0 * idx / (size - 1) - 1.0).reshape(b, j * box, box, 2)
    out = F.grid_sample(
        fine[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.reshape(b, j, box, box)


def _parabola(lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Offset in [-0.5, 0.5] steps of the maximum of a parabola through three equally spaced
    values (0 where they are flat or the centre is not a maximum)."""
    den = lo - 2 * mid + hi
    ok = (den < 0) & torch.isfinite(lo) & torch.isfinite(hi)
    off = 0.5 * (lo - hi) / torch.where(ok, den, torch.full_like(den, -1.0))
    return torch.where(ok, off, torch.zeros_like(off)).clamp(-0.5, 0.5)


def score_spectra(
    fy: torch.Tensor,
    fm: torch.Tensor,
    energy: torch.Tensor,
    log_prior_t: torch.Tensor,
    sigma: float,
) -> torch.Tensor:
    """Log-likelihood + log shift prior of particles against model images at every circular
    integer shift, (B, J, D, D) with shift (x, y) at [.., y+D/2, x+D/2]: -||y - m(. - s)||^2 /
    (2 sigma^2) up to the constant ||y||^2 term, by one FFT correlation of the half-plane spectra
    of the particles fy (B, D, D//2+1) and models fm (B, J, D, D//2+1), with the models' energies
    ||m||^2 (B, J, 1, 1)."""
    d = fm.shape[-2]
    cross = torch.fft.irfft2(fy[:, None] * fm.conj(), s=(d, d))  # (B, J, D, D): sum_x y(x) m(x - s)
    cross = torch.fft.fftshift(cross, dim=(-2, -1))
    return (cross - 0.5 * energy) / sigma**2 + log_prior_t


def _energy(fm: torch.Tensor, box: int) -> torch.Tensor:
    """||m||^2 (..., 1, 1) of real images from their half-plane spectra (..., D, D//2+1), by
    Parseval: the columns that stand for two of the full plane count twice."""
    w = torch.full((fm.shape[-1],), 2.0, device=fm.device)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return ((fm.real**2 + fm.imag**2) * w).sum((-2, -1), keepdim=True) / box**2


def shift_log_prior(box: int, sd_px: float, max_px: float, device=None) -> torch.Tensor:
    """(D, D) log N(s; 0, sd^2) of each integer shift s (x, y) of the box, -inf beyond max_px."""
    g = pixel_grid(box, device)  # (D, D, 2), [row y, col x] -> (x, y)
    r2 = (g**2).sum(-1)
    out = -0.5 * r2 / sd_px**2
    return torch.where(r2 <= max_px**2, out, torch.full_like(out, -math.inf))


def _best(scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Best (angle index, row, col) of scores (B, J, D, D) and its value (B,)."""
    b, j, d, _ = scores.shape
    flat = scores.reshape(b, -1)
    value, idx = flat.max(1)
    a = torch.div(idx, d * d, rounding_mode="floor")
    rest = idx - a * d * d
    row = torch.div(rest, d, rounding_mode="floor")
    return a, row, rest - row * d, value


@dataclass
class PoseSearch:
    """The best pose of each particle against one template on the search grid (before the
    sub-step polish): angle (B,) rad, shift (B, 2) px and its score (B,)."""

    theta: torch.Tensor
    t: torch.Tensor
    value: torch.Tensor


def refine_poses(
    template: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    z: torch.Tensor,
    theta0: torch.Tensor,
    ctf: torch.Tensor | None,
    t_sd_px: float,
    sigma: float = 1.0,
    config: RefineConfig = RefineConfig(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refined angle theta (B,) rad, shift t (B, 2) px and score (B,) of particles y (B, D, D).

    template(z) -> (B, 2D, 2D) is the model's noise-free image of each z at pose 0 at twice the
    box (the same field of view; `TargetVAE.refine_templates`), or (1, 2D, 2D) for one template
    shared by the batch; z (B, Z) the particles' latents, theta0 (B,) the encoder's angles,
    ctf (B, D, D) or None.
    """
    with torch.autocast(y.device.type, enabled=False):
        fine = template(z).float()  # (B or 1, 2D, 2D)
        found = search_poses(fine, y, ctf, theta0, t_sd_px, sigma, config)
        theta, t = polish_poses(fine, y, ctf, found, config)
    return theta, t, found.value


def search_poses(
    fine: torch.Tensor,
    y: torch.Tensor,
    ctf: torch.Tensor | None,
    theta0: torch.Tensor,
    t_sd_px: float,
    sigma: float = 1.0,
    config: RefineConfig = RefineConfig(),
) -> PoseSearch:
    """The global and local passes of `refine_poses` against templates fine (B or 1, 2D, 2D):
    the score of the best pose, which is what a classification compares between classes.

    The global pass runs on Fourier-cropped copies of the particles, templates and CTFs at
    `config.coarse_box` (when it is smaller than the box): it only has to pick the angle that
    the local pass, at full size, starts from."""
    b, d, _ = y.shape
    dev = y.device
    y = y.float()
    max_px = config.max_shift_px if config.max_shift_px is not None else d / 4
    centre = theta0.float()
    if config.global_step_deg > 0:
        n = max(1, round(360.0 / config.global_step_deg))
        grid = torch.arange(n, device=dev) * (2 * math.pi / n)
        dc = min(d, config.coarse_box or d)
        a = _search(
            fourier_crop(fine, 2 * dc) if dc < d else fine,
            fourier_crop(y, dc) if dc < d else y,
            _crop_filter(ctf, dc) if ctf is not None and dc < d else ctf,
            centre[:, None] + grid[None],
            shift_log_prior(dc, t_sd_px * dc / d, max_px * dc / d, dev),
            sigma * dc / d,  # the per-pixel noise of the cropped copy
        )[1][0]
        centre = centre + grid[a]
    step = math.radians(config.local_step_deg)
    k = max(1, round(config.local_span_deg / config.local_step_deg))
    angles = centre[:, None] + torch.arange(-k, k + 1, device=dev)[None] * step  # (B, 2k+1)
    if config.half_turns:
        angles = torch.cat([angles, angles + math.pi], 1)  # (B, 2(2k+1))
    prior = shift_log_prior(d, t_sd_px, max_px, dev)
    scores, (a, row, col, value) = _search(fine, y, ctf, angles, prior, sigma)
    i = torch.arange(b, device=dev)
    at = scores[i, a]  # (B, D, D) at the best angle
    r0, r1 = (row - 1).clamp(0, d - 1), (row + 1).clamp(0, d - 1)
    c0, c1 = (col - 1).clamp(0, d - 1), (col + 1).clamp(0, d - 1)
    dy = _parabola(at[i, r0, col], at[i, row, col], at[i, r1, col])
    dx = _parabola(at[i, row, c0], at[i, row, col], at[i, row, c1])
    t = torch.stack([col - d // 2 + dx, row - d // 2 + dy], 1).float()
    return PoseSearch(angles[i, a], t, value)


def polish_poses(
    fine: torch.Tensor,
    y: torch.Tensor,
    ctf: torch.Tensor | None,
    found: PoseSearch,
    config: RefineConfig = RefineConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The searched poses to sub-step precision: the angle at the shift, then the shift at the
    angle, twice; theta (B,) wrapped to (-pi, pi], t (B, 2) px."""
    step = math.radians(config.local_step_deg)
    theta, t = found.theta, found.t
    for _ in range(2):
        theta = _fine_angle(y, fine, ctf, theta, t, step / 4)
        t = _fine_shift(y, fine, ctf, theta, t, 0.25)
    return wrap_angle(theta), t


def _search(fine, y, ctf, angles, prior, sigma):
    """Scores (B, J, D, D) of particles y against fine turned by angles (B, J) at every shift,
    and their best (angle index, row, col, value)."""
    fm = _model_spectra(fine, ctf, angles, y.shape[-1])
    scores = score_spectra(torch.fft.rfft2(y), fm, _energy(fm, y.shape[-1]), prior, sigma)
    return scores, _best(scores)


def _crop_filter(ctf: torch.Tensor, size: int) -> torch.Tensor:
    """Filters (B, D, D) on the fft2 grid restricted to the frequencies of a `size` box of the
    same field of view (what multiplies the spectrum of a Fourier-cropped image)."""
    d = ctf.shape[-1]
    k = torch.round(torch.fft.fftfreq(size, device=ctf.device) * size).long() % d
    return ctf[:, k[:, None], k[None, :]]


def _model_spectra(fine, ctf, angles: torch.Tensor, box: int) -> torch.Tensor:
    """Half-plane spectra (B, J, D, D//2+1) of the templates turned by angles (B, J) times each
    particle's CTF: `_model_images` without the FFT round trip (the CTF is Hermitian, so its
    first D//2+1 columns act on the real FFT as the full filter acts on the full one)."""
    shared = fine.shape[0] == 1 and same_rows(angles)  # one template, one set of angles
    fm = torch.fft.rfft2(rotated_templates(fine, angles[:1] if shared else angles, box).float())
    if shared and ctf is None:
        return fm.expand(angles.shape[0], -1, -1, -1)
    if ctf is not None:
        fm = fm * ctf[:, None, :, : box // 2 + 1].float()
    return fm


def _model_images(fine, ctf, angles: torch.Tensor, box: int) -> torch.Tensor:
    """Templates turned by angles (B, J), times each particle's CTF: (B, J, D, D)."""
    b, j = angles.shape
    models = rotated_templates(fine, angles, box)
    if ctf is not None:
        models = apply_ctf(models.reshape(b * j, box, box), ctf.repeat_interleave(j, 0))
    return models.reshape(b, j, box, box)


def _fit(y: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
    """<y, m> - ||m||^2 / 2 of particles y (B, [J,] D, D) and models (B, J, D, D): (B, J)."""
    if y.dim() == 3:
        y = y[:, None]
    return (y * models).sum((-2, -1)) - 0.5 * (models**2).sum((-2, -1))


def _fine_angle(y, fine, ctf, theta, t, step: float) -> torch.Tensor:
    """The angle near theta (B,) at shift t (B, 2): 9 steps, then a parabola."""
    b, d = y.shape[0], y.shape[-1]
    i = torch.arange(b, device=y.device)
    near = theta[:, None] + torch.arange(-4, 5, device=y.device)[None] * step  # (B, 9)
    s = _fit(shift_images(y.float(), -t), _model_images(fine, ctf, near, d))
    j = s.argmax(1).clamp(1, 7)
    return near[i, j] + _parabola(s[i, j - 1], s[i, j], s[i, j + 1]) * step


def _fine_shift(y, fine, ctf, theta, t, step: float) -> torch.Tensor:
    """The shift near t (B, 2) px at angle theta (B,): a 3 x 3 grid of sub-pixel steps, then a
    parabola per axis (the particle moved back exactly, by a phase ramp)."""
    d = y.shape[-1]
    model = _model_images(fine, ctf, theta[:, None], d)  # (B, 1, D, D)
    grid = torch.tensor([-step, 0.0, step], device=y.device)
    scores = []
    for dy in grid:
        row = []
        for dx in grid:
            moved = shift_images(y.float(), -(t + torch.stack([dx, dy])[None]))
            row.append(_fit(moved, model)[:, 0])
        scores.append(torch.stack(row, 1))
    s = torch.stack(scores, 1)  # (B, 3 dy, 3 dx)
    ox = _parabola(s[:, 1, 0], s[:, 1, 1], s[:, 1, 2])
    oy = _parabola(s[:, 0, 1], s[:, 1, 1], s[:, 2, 1])
    return t + torch.stack([ox, oy], 1) * step
