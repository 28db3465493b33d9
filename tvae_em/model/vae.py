"""TargetVAE: equivariant encoder + structured pose posterior + spatial generator + likelihood.

Pose convention (docs/architecture.md): a particle at pose (theta, t) is T(t) R(theta) template, so
the generator is evaluated at R(-theta)(p - t), in box units (pixel offset / (D/2)).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError
from ..fourier import apply_ctf, fourier_pad
from ..geometry import object_centroid, pixel_grid, undo_pose
from .aligned import AlignedLatent
from .config import ModelConfig
from .consistency import pose_consistency
from .encoder import EquivariantEncoder
from .generator import SpatialGenerator
from .likelihood import PixelLikelihood
from .posterior import (
    CellPosterior,
    gaussian_kl,
    kl_terms,
    log_prior_r,
    log_prior_t,
    pose_nll,
    posterior_from_maps,
    read_out,
    sample_pose_latent,
)
from .refine import RefineConfig, refine_poses
from .spectral import (
    Band,
    SpectralGenerator,
    ctf_band,
    gaussian_loglik,
    observed_band,
    render_spectrum,
)
from .spectral import render_image as render_spectral

# The pose search of training (`TargetVAE.searched_poses`): local, around the encoder's angle.
TRAINING_SEARCH = RefineConfig(
    global_step_deg=0.0, local_span_deg=15.0, local_step_deg=1.5, half_turns=True
)


def full_precision(device: torch.device):
    """Context that turns autocast off: pose, posterior and KL maths stay in float32."""
    return torch.autocast(device.type, enabled=False)


def pose_coordinates(p: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, size: int):
    """Generator input `geometry.undo_pose` / (size/2) (box units) for pixels p (B, P, 2)."""
    with full_precision(p.device):
        return undo_pose(p.float(), theta.float(), t.float()) / (size / 2)


class TargetVAE(nn.Module):
    """TARGET-VAE for D x D images; see docs/model.md for the model and docs/architecture.md."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.encoder = EquivariantEncoder(cfg)
            if cfg.renderer == "fourier":
                self.generator = SpectralGenerator(
                    cfg.z_dim,
                    cfg.box,
                    cfg.generator_hidden,
                    cfg.generator_layers,
                    cfg.fourier_features,
                    cfg.spectral_extent_px,
                )
            else:
                self.generator = SpatialGenerator(
                    cfg.z_dim,
                    cfg.box,
                    cfg.generator_hidden,
                    cfg.generator_layers,
                    cfg.fourier_features,
                    cfg.fourier_scale_px,
                )
            self.z_encoder = (
                AlignedLatent(cfg.box, cfg.z_dim) if cfg.z_source == "aligned" else None
            )
        self.likelihood = PixelLikelihood(cfg.likelihood, cfg.learn_sigma)
        n, d = cfg.rotations, cfg.box
        # the shift prior over the encoder's S x S cells (S = cfg.cell_side)
        self.register_buffer("log_pt", log_prior_t(cfg.cell_side, cfg.t_sd_px), persistent=False)
        self.register_buffer(
            "log_pr", log_prior_r(n, cfg.r_prior, cfg.r_prior_sd), persistent=False
        )
        self.register_buffer("grid", pixel_grid(d).reshape(d * d, 2), persistent=False)
        self.band = Band(d) if cfg.renderer == "fourier" else None

    def posterior(self, y: torch.Tensor) -> CellPosterior:
        """Encode (B, D, D) images into the per-cell posterior (cells of the S x S window)."""
        if y.shape[-2:] != (self.cfg.box, self.cfg.box):
            raise UserError(
                f"images are {tuple(y.shape[-2:])}, the model expects box {self.cfg.box}"
            )
        maps = self.encoder(y)
        with full_precision(y.device):
            return posterior_from_maps(maps, self.log_pr)

    def log_likelihood(
        self,
        y: torch.Tensor,
        theta: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        ctf: torch.Tensor | None = None,
        fraction: float = 1.0,
        k_max: float | None = None,
    ) -> torch.Tensor:
        """(B,) log p(y | theta, t, z); an unbiased subset estimate when fraction < 1.

        The subset's sum is scaled by D*D / n_subset. A CTF forces all pixels (it mixes them).
        The Fourier renderer scores the band |k| <= k_max (None: up to Nyquist) exactly instead.
        """
        if self.band is not None:
            return self._fourier_log_likelihood(y, theta, t, z, ctf, k_max)
        b, d, _ = y.shape
        npix = d * d
        yflat = y.reshape(b, npix).float()
        if ctf is not None or fraction >= 1.0:
            nsub, p, ysub = npix, self.grid.expand(b, -1, -1), yflat
        else:
            nsub = max(1, round(fraction * npix))
            idx = torch.rand(b, npix, device=y.device).argsort(1)[:, :nsub]  # (B, n)
            p, ysub = self.grid[idx], yflat.gather(1, idx)  # (B, n, 2), (B, n)
        out = self.generator(pose_coordinates(p, theta, t, d), z).float()  # (B, n)
        if ctf is not None:
            if self.cfg.likelihood != "gaussian":
                raise UserError("CTF correction needs the gaussian likelihood (--likelihood)")
            out = apply_ctf(out.reshape(b, d, d), ctf).reshape(b, npix)
        return self.likelihood(ysub, out) * (npix / nsub)

    def _fourier_log_likelihood(self, y, theta, t, z, ctf, k_max) -> torch.Tensor:
        """(B,) Gaussian log-likelihood of the band: CTF x G(R(-theta) k) exp(-2 pi i k.t)."""
        if ctf is not None and self.cfg.likelihood != "gaussian":
            raise UserError("CTF correction needs the gaussian likelihood (--likelihood)")
        band = self.band
        n = band.count(k_max)
        model = render_spectrum(self.generator, band.freqs[:n], z, theta, t, self.cfg.box)
        if ctf is not None:
            model = model * ctf_band(ctf, band, n)
        log_sigma = self.likelihood.log_sigma
        return gaussian_loglik(observed_band(y, band, n), model, band.weights[:n], log_sigma)

    def _elbo(self, y, post, ctf, fraction, k_max=None, search=False) -> dict[str, torch.Tensor]:
        """One-sample ELBO terms (B,). With `search`, the pose is the one `searched_poses` finds
        (not differentiated), the encoder learns to predict it (pose_nll) and "elbo" is
        log p(y | searched pose, z) - KL(z) (docs/model.md, "Pose search in training")."""
        n, side = self.cfg.rotations, self.cfg.cell_side
        with full_precision(y.device):
            kl_tr, kl_theta, kl_z = kl_terms(post, self.log_pt, self.log_pr)
            theta, t, z = sample_pose_latent(post, n, side, self.cfg.tau)
        nll = torch.zeros_like(kl_tr)
        if search:
            theta, t = self.searched_poses(y, post, ctf)
            with full_precision(y.device):
                nll = pose_nll(post, theta, t, n, side)
        turn = torch.zeros_like(kl_tr)
        if self.z_encoder is not None:
            mu, logsd = self.z_encoder(y, theta, t, ctf)
            z = mu + logsd.exp() * torch.randn_like(mu)
            kl_z = gaussian_kl(mu, logsd, 1.0).sum(1)
            if self.training and search and self.cfg.z_turn_penalty > 0:
                turn = self.cfg.z_turn_penalty * self.z_encoder.turn_change(y, theta, t, ctf, mu)
        log_lik = self.log_likelihood(y, theta, t, z, ctf, fraction, k_max)
        elbo = log_lik - kl_z if search else log_lik - kl_tr - kl_theta - kl_z
        return {
            "elbo": elbo,
            "log_lik": log_lik,
            "kl_tr": kl_tr,
            "kl_theta": kl_theta,
            "kl_z": kl_z,
            "pose_nll": nll,
            "z_turn": turn,
        }

    def searched_poses(
        self, y: torch.Tensor, post: CellPosterior, ctf: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Angle (B,) and shift (B, 2) px of each particle against its own template by a search
        of the likelihood (`refine.refine_poses`, +-15 deg around the encoder's angle), without
        gradients: the pose training renders at once `pose_search_from` is reached."""
        with torch.no_grad(), full_precision(y.device):
            ro = read_out(post, self.cfg.rotations, self.cfg.cell_side)
            z = self.latent_at(y, ro["theta"], ro["t"], ctf)[0] if self.z_encoder else ro["z_mu"]
            theta, t, _ = refine_poses(
                self.refine_templates, y, z, ro["theta"], ctf, self.cfg.t_sd_px, self.likelihood.sd,
                TRAINING_SEARCH,
            )  # fmt: skip
        return theta.detach(), t.detach()

    def latent_at(
        self, y: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, ctf: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z mean and sd (B, Z) of particles y at pose (theta, t) (`z_source` "aligned" only)."""
        mu, logsd = self.z_encoder(y, theta, t, ctf)
        return mu, logsd.exp()

    def forward(
        self,
        y: torch.Tensor,
        ctf: torch.Tensor | None = None,
        k_max: float | None = None,
        search: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One-sample ELBO: y (B, D, D) -> dict of (B,) elbo, log_lik, kl_tr, kl_theta, kl_z,
        pose_nll, consistency and objective (what training maximises: elbo - consistency, and
        - pose_nll with `search`).

        In training mode without a CTF the real-space likelihood uses `pixel_fraction` of the
        pixels; the Fourier renderer scores the band |k| <= k_max cycles/pixel (None: Nyquist).
        The pose-consistency penalty (`model.consistency`) is computed in training mode only.
        """
        fraction = self.cfg.pixel_fraction if self.training else 1.0
        post = self.posterior(y)
        out = self._elbo(y, post, ctf, fraction, k_max, search)
        cfg = self.cfg
        if self.training and (cfg.consistency_theta > 0 or cfg.consistency_z > 0):
            out["consistency"] = pose_consistency(
                self.posterior, y, post, cfg.rotations, cfg.consistency_theta, cfg.consistency_z
            )
        else:
            out["consistency"] = torch.zeros_like(out["elbo"])
        out["consistency"] = out["consistency"] + out.pop("z_turn")
        out["objective"] = out["elbo"] - out["consistency"] - out["pose_nll"]
        return out

    def embed(
        self, y: torch.Tensor, with_elbo: bool = False, ctf: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image pose and latent: theta (B,) rad, t (B, 2) px (x, y), z_mu, z_sd (B, Z),
        confidence (B,), r (B,) winning bin; and a full-pixel ELBO estimate when asked."""
        post = self.posterior(y)
        with full_precision(y.device):
            out = read_out(post, self.cfg.rotations, self.cfg.cell_side)
        if self.z_encoder is not None:
            out["z_mu"], out["z_sd"] = self.latent_at(y, out["theta"], out["t"], ctf)
        if with_elbo:
            out["elbo"] = self._elbo(y, post, ctf, 1.0)["elbo"]
        return out

    def render(
        self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, size: int | None = None
    ) -> torch.Tensor:
        """Image means (B, size, size) of objects z (B, Z) at pose theta (B,) rad, t (B, 2) px of
        `size`; theta (1,) and t (1, 2) pose the whole batch alike (the generator's features and
        first layer then run once)."""
        size = size or self.cfg.box
        if self.band is not None:
            return render_spectral(self.generator, z, theta, t, self.cfg.box, size)
        p = pixel_grid(size, z.device).reshape(1, size * size, 2)
        if len(theta) > 1 or len(t) > 1:
            p = p.expand(z.shape[0], -1, -1)  # else one pose: the first layer runs once
        out = self.generator(pose_coordinates(p, theta, t, size), z).float()  # (B|1, P)
        return self.likelihood.mean(out).expand(len(z), -1).reshape(-1, size, size)

    def refine_templates(self, z: torch.Tensor) -> torch.Tensor:
        """Templates (B, 2D, 2D) of z (B, Z) at pose 0 on the grid `refine.refine_poses` turns:
        twice the box, the same field of view. The Fourier renderer renders there exactly (its
        band ends at the model's Nyquist); the real-space one renders at the box and pads the
        spectrum (a quarter of the generator's evaluations; particles are sampled at the box)."""
        zero, t0, d = z.new_zeros(1), z.new_zeros(1, 2), self.cfg.box  # one pose for the batch
        if self.band is not None:
            return self.render(z, zero, t0, 2 * d)
        return fourier_pad(self.render(z, zero, t0, d).float(), 2 * d)

    def template_centre(self, z: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, 2) centroid (x, y) in pixels of each template at pose 0 (its object's centre).

        The model's template origin is arbitrary (only the prior p(t) pulls it to the object's
        centre), so shifts relative to the object's centre are t + R(theta) @ centre. The
        background is the template's median; the object's contrast is the sign of its largest
        departure from it, and the centroid is that of the departures of that sign.
        """
        size = size or self.cfg.box
        img = self.render(z, z.new_zeros(len(z)), z.new_zeros(len(z), 2), size).float()
        return object_centroid(img)

    def export_for_inference(self) -> TargetVAE:
        """An equivalent model in eval mode whose e2cnn layers are plain torch."""
        out = copy.deepcopy(self)
        out.encoder = self.encoder.export()
        return out.eval()
