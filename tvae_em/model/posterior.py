"""Priors, the structured posterior over cells (r, i, j), its KL terms, sampling and read-out.

A cell is a rotation bin r (angle o_r = 2*pi*r/N) and a position (i, j) of the encoder's centred
S x S window (S = `ModelConfig.cell_side`, at most the box D) standing for the shift
t = (j - S//2, i - S//2) pixels (x, y), as in `geometry.pixel_grid(S)`. Cells are flattened in the
order (r, i, j): index m = r * S * S + i * S + j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import pixel_grid, wrap_angle
from .layout import HeadLayout

LOGSD_MIN, LOGSD_MAX = -10.0, 5.0  # log-sd range: keeps every per-cell KL finite


def bin_angles(n: int, device=None) -> torch.Tensor:
    """(N,) bin centres o_r = 2*pi*r/N in radians."""
    return torch.arange(n, device=device, dtype=torch.float32) * (2 * math.pi / n)


def cell_shifts(n: int, side: int, device=None) -> torch.Tensor:
    """(N * S * S, 2) shift (x, y) in pixels of every cell of an S x S grid, in cell order."""
    t = pixel_grid(side, device).reshape(1, side * side, 2)
    return t.expand(n, -1, -1).reshape(n * side * side, 2)


def log_prior_t(side: int, sd_px: float, device=None) -> torch.Tensor:
    """(S, S) log p(t): Gaussian in the shift with sd `sd_px` px, normalised over the cells."""
    t = pixel_grid(side, device)
    return F.log_softmax((-(t**2).sum(-1) / (2 * sd_px**2)).flatten(), 0).reshape(side, side)


def log_prior_r(
    n: int, kind: str = "uniform", sd: float = math.pi / 4, device=None
) -> torch.Tensor:
    """(N,) log p(r): uniform, or a Gaussian in the wrapped bin angle around 0 with sd `sd` rad."""
    if kind == "uniform":
        return torch.full((n,), -math.log(n), device=device)
    o = wrap_angle(bin_angles(n, device))
    return F.log_softmax(-(o**2) / (2 * sd**2), 0)


@dataclass
class CellPosterior:
    """The encoder's per-cell outputs, flattened over the M = N * S * S cells."""

    logits: torch.Tensor  # (B, M) prior-adjusted attention a + log p(r)
    log_q: torch.Tensor  # (B, M) log q(t, r | y)
    theta_mu: torch.Tensor  # (B, M) rotation offset mean (rad) within the bin
    theta_logsd: torch.Tensor  # (B, M)
    z_mu: torch.Tensor  # (B, Z, M)
    z_logsd: torch.Tensor  # (B, Z, M)


def posterior_from_maps(maps: torch.Tensor, log_pr: torch.Tensor) -> CellPosterior:
    """Build q from encoder maps (B, 3 + 2Z, N, S, S) (float32) and log p(r) (N,)."""
    b, f, n = maps.shape[:3]
    lay = HeadLayout.from_fields(f)
    maps = maps.float()
    logits = (maps[:, lay.attention] + log_pr[None, :, None, None]).reshape(b, -1)  # (B, M)
    flat = maps.reshape(b, f, -1)  # (B, F, M)
    return CellPosterior(
        logits=logits,
        log_q=F.log_softmax(logits, dim=1),
        theta_mu=flat[:, lay.theta_mu],
        theta_logsd=flat[:, lay.theta_logsd].clamp(LOGSD_MIN, LOGSD_MAX),
        z_mu=flat[:, lay.z_mu],
        z_logsd=flat[:, lay.z_logsd].clamp(LOGSD_MIN, LOGSD_MAX),
    )


def gaussian_kl(mu: torch.Tensor, logsd: torch.Tensor, prior_sd: float) -> torch.Tensor:
    """Elementwise KL(N(mu, exp(logsd)^2) || N(0, prior_sd^2))."""
    var_ratio = torch.exp(2 * logsd) / prior_sd**2
    return 0.5 * (var_ratio + mu**2 / prior_sd**2 - 1.0 - torch.log(var_ratio))


def kl_terms(
    post: CellPosterior, log_pt: torch.Tensor, log_pr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (B,) KL terms: cells KL(q(t,r) || p(t,r)), expected KL of theta and of z.

    q is exp(log_softmax), so cells that underflow contribute exactly 0 (never 0 * inf).
    """
    n = log_pr.shape[0]
    log_p = (log_pr[:, None] + log_pt.reshape(1, -1)).reshape(-1)  # (M,)
    q = post.log_q.exp()  # (B, M)
    kl_tr = (q * (post.log_q - log_p[None])).sum(1)
    kl_theta_cell = gaussian_kl(post.theta_mu, post.theta_logsd, math.pi / n)  # (B, M)
    kl_z_cell = gaussian_kl(post.z_mu, post.z_logsd, 1.0).sum(1)  # (B, M)
    return kl_tr, (q * kl_theta_cell).sum(1), (q * kl_z_cell).sum(1)


def weighted_pose(
    post: CellPosterior, w: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle (B,) rad and z (B, Z) averaged over the cells with weights w (B, M): the circular
    mean of the cells' angles o_r + theta_mu (so bins 0 and N-1 do not average to pi) and the
    weighted mean of z_mu."""
    cells_per_bin = w.shape[1] // n
    ang = bin_angles(n, w.device).repeat_interleave(cells_per_bin)[None] + post.theta_mu  # (B, M)
    theta = torch.atan2((w * torch.sin(ang)).sum(1), (w * torch.cos(ang)).sum(1))
    return theta, torch.einsum("bm,bzm->bz", w, post.z_mu)


def sample_pose_latent(
    post: CellPosterior, n: int, side: int, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relaxed reparameterised sample: theta (B,) rad, t (B, 2) px (x, y), z (B, Z).

    `side` is the cell grid's S (`ModelConfig.cell_side`).

    Gumbel-softmax weights w over cells; theta is the w-weighted circular mean of the cells'
    angles (so bins 0 and N-1 do not average to pi) plus (sum w sd_theta) * eps.
    """
    logits = post.logits
    u = torch.rand_like(logits).clamp(1e-10, 1.0 - 1e-7)
    w = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)  # (B, M)
    theta_mean, z_mean = weighted_pose(post, w, n)
    z_sd = torch.einsum("bm,bzm->bz", w, post.z_logsd.exp())
    z = z_mean + z_sd * torch.randn_like(z_sd)
    theta_sd = (w * post.theta_logsd.exp()).sum(1)
    theta = theta_mean + theta_sd * torch.randn_like(theta_sd)
    t = w @ cell_shifts(n, side, logits.device)  # (B, 2)
    return theta, t, z


def read_out(post: CellPosterior, n: int, side: int) -> dict[str, torch.Tensor]:
    """Point estimates: the winning cell (argmax of the prior-adjusted logits) and posterior mean t.

    `side` is the cell grid's S (`ModelConfig.cell_side`).
    Returns theta (B,) rad in [-pi, pi), t (B, 2) px, z_mu, z_sd (B, Z), confidence (B,), r (B,).
    """
    idx = post.logits.argmax(1)  # (B,)
    r = torch.div(idx, side * side, rounding_mode="floor")
    pick = idx[:, None]
    theta = bin_angles(n, idx.device)[r] + post.theta_mu.gather(1, pick)[:, 0]
    zi = pick[:, None, :].expand(-1, post.z_mu.shape[1], 1)  # (B, Z, 1)
    return {
        "theta": wrap_angle(theta),
        "t": post.log_q.exp() @ cell_shifts(n, side, idx.device),
        "z_mu": post.z_mu.gather(2, zi)[..., 0],
        "z_sd": post.z_logsd.gather(2, zi)[..., 0].exp(),
        "confidence": post.log_q.gather(1, pick)[:, 0].exp(),
        "r": r,
    }


def pose_nll(
    post: CellPosterior, theta: torch.Tensor, t: torch.Tensor, n: int, side: int
) -> torch.Tensor:
    """(B,) -log q(theta, t | y) of given poses under the encoder's posterior: the cell of the
    nearest bin centre and the nearest window cell of t (clamped to the window), plus the
    Gaussian density of the in-bin offset. What trains the encoder to predict searched poses."""
    step = 2 * math.pi / n
    r = torch.round(wrap_angle(theta) / step).long() % n  # (B,)
    offset = wrap_angle(theta - r.float() * step)
    half = side // 2
    j = (torch.round(t[:, 0]).long() + half).clamp(0, side - 1)  # column: x
    i = (torch.round(t[:, 1]).long() + half).clamp(0, side - 1)  # row: y
    m = (r * side * side + i * side + j)[:, None]  # (B, 1) cell index
    mu = post.theta_mu.gather(1, m)[:, 0]
    logsd = post.theta_logsd.gather(1, m)[:, 0]
    nll_theta = 0.5 * ((offset - mu) / logsd.exp()) ** 2 + logsd + 0.5 * math.log(2 * math.pi)
    return -post.log_q.gather(1, m)[:, 0] + nll_theta
