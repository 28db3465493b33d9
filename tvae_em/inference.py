"""Batched inference: per-particle pose and latent from a trained model, and their npz form.

Inference runs without gradients on the exported (plain torch) model, with bf16 autocast where
the device has bf16 arithmetic (`runtime.native_bf16`); images are streamed batch by batch,
normalised as in training, and results go into preallocated arrays, so memory does not grow with
the stack beyond one row of numbers per particle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .clustering import class_probabilities
from .errors import UserError
from .geometry import relion_pose
from .model.refine import PoseSearch, RefineConfig, polish_poses, refine_poses, search_poses
from .progress import Advance
from .runtime import native_bf16

NPZ_KEYS = ("z_mu", "theta_rad", "t_px", "psi_deg", "origin_A", "class", "apix")


@dataclass
class Embedding:
    """The model's per-particle results, rows in input order, in the model stack's pixels."""

    z_mu: np.ndarray  # (n, Z) latent mean at the winning cell
    z_sd: np.ndarray  # (n, Z) latent sd at the winning cell
    theta: np.ndarray  # (n,) radians, our convention (particle = T(t) R(theta) template)
    t: np.ndarray  # (n, 2) pixels (x, y) of the stack the model read
    confidence: np.ndarray  # (n,) posterior probability of the winning cell
    elbo: np.ndarray  # (n,) one-sample ELBO estimate (nats); NaN when not computed
    labels: np.ndarray | None = None  # (n,) 1-based classes; None when not clustered
    apix: np.ndarray | None = None  # (n,) pixel size (A) of the stack the model read
    box: int | None = None  # image side of that stack
    centre: np.ndarray | None = None  # (n, 2) px: object centre in the template frame (None: 0)
    # (n, K) log posterior of the classes (column k-1: class k of `labels`); None without one
    # (no classes, or k-means classes)
    class_log_post: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int, z_dim: int) -> Embedding:
        """Preallocated arrays for n particles (ELBO NaN until filled)."""
        f = np.float32
        return cls(
            z_mu=np.zeros((n, z_dim), f),
            z_sd=np.zeros((n, z_dim), f),
            theta=np.zeros(n, np.float64),
            t=np.zeros((n, 2), np.float64),
            confidence=np.zeros(n, f),
            elbo=np.full(n, np.nan, f),
        )

    def __len__(self) -> int:
        return len(self.theta)

    def store(self, idx: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        """Copy one batch of `TargetVAE.embed` outputs into rows `idx`."""
        self.z_mu[idx] = out["z_mu"].float().cpu().numpy()
        self.z_sd[idx] = out["z_sd"].float().cpu().numpy()
        self.theta[idx] = out["theta"].double().cpu().numpy()
        self.t[idx] = out["t"].double().cpu().numpy()
        self.confidence[idx] = out["confidence"].float().cpu().numpy()
        if "elbo" in out:
            self.elbo[idx] = out["elbo"].float().cpu().numpy()

    def check_finite(self, source: str, fix: str) -> None:
        """UserError naming the first particle whose z, angle or shift is NaN or Inf."""
        parts = {"z": self.z_mu, "angle": self.theta, "shift": self.t}
        for what, values in parts.items():
            bad = ~np.isfinite(np.asarray(values, dtype=np.float64).reshape(len(self), -1)).all(1)
            if bad.any():
                i = int(np.argmax(bad))
                raise UserError(f"{source}: particle {i + 1} has a non-finite {what}; {fix}")

    @property
    def has_elbo(self) -> bool:
        return bool(np.isfinite(self.elbo).any())

    @property
    def shift(self) -> np.ndarray:
        """(n, 2) px: where each particle's object centre is, t + R(theta) @ centre.

        `t` places the model's template origin, which only the prior pins; this is the shift
        written to files and used to align particles (docs/outputs.md, re-centring).
        """
        if self.centre is None:
            return self.t
        c, s = np.cos(self.theta), np.sin(self.theta)
        cx, cy = self.centre[:, 0], self.centre[:, 1]
        return self.t + np.stack([c * cx - s * cy, s * cx + c * cy], 1)

    def relion_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """rlnAnglePsi (n,) degrees and rlnOriginX/YAngst (n, 2) that centre each particle's
        object and undo its rotation."""
        if self.apix is None:
            raise ValueError("Embedding.relion_pose needs the pixel sizes (apix)")
        return relion_pose(self.theta, self.shift, self.apix)

    def class_probability(self) -> np.ndarray | None:
        """(n,) posterior probability of each particle's own class (`class_log_post`); None when
        there is no class posterior."""
        if self.class_log_post is None or self.labels is None:
            return None
        return class_probabilities(self.class_log_post, self.labels)[0]

    # ---- the npz form (docs/outputs.md) ------------------------------------------------------
    def npz_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of embedded.npz (`class_log_post` only when there is a class posterior)."""
        psi, origin = self.relion_pose()
        n = len(self)
        extra = {} if self.class_log_post is None else {"class_log_post": self.class_log_post}
        return {
            "z_mu": self.z_mu,
            "z_sd": self.z_sd,
            "theta_rad": self.theta,
            "psi_deg": psi,
            "t_px": self.t,
            "centre_px": self.centre if self.centre is not None else np.zeros((n, 2)),
            "shift_px": self.shift,
            "origin_A": origin,
            "confidence": self.confidence,
            "elbo": self.elbo,
            "class": self.labels if self.labels is not None else np.zeros(n, np.int64),
            "indices": np.arange(n, dtype=np.int64),
            "apix": np.asarray(self.apix, dtype=np.float64),
            "box": np.int64(self.box),
            **extra,
        }

    def save_npz(self, file: str | os.PathLike | BinaryIO) -> None:
        """Write the npz form (to a path or an open binary file)."""
        np.savez(file, **self.npz_arrays())

    @classmethod
    def load_npz(cls, path: str | os.PathLike, z_dim: int) -> Embedding:
        """An embed .npz, checked against the model's z dimension (UserError naming the file)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--embedding {path}: file not found")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except Exception as e:
            raise UserError(
                f"--embedding {path}: not a readable .npz ({type(e).__name__})"
            ) from None
        missing = [k for k in NPZ_KEYS if k not in data]
        if missing:
            raise UserError(
                f"--embedding {path}: no {', '.join(missing)} (not written by tvae-em embed)"
            )
        z = data["z_mu"]
        if z.ndim != 2 or z.shape[1] != z_dim:
            raise UserError(
                f"--embedding {path}: z has shape {z.shape} but the model has z_dim {z_dim}"
                " (embedded with another run?)"
            )
        n = len(z)
        labels = np.asarray(data["class"], dtype=np.int64)
        emb = cls(
            z_mu=z,
            z_sd=data.get("z_sd", np.zeros_like(z)),
            theta=np.asarray(data["theta_rad"], dtype=np.float64),
            t=np.asarray(data["t_px"], dtype=np.float64),
            confidence=data.get("confidence", np.zeros(n, np.float32)),
            elbo=data.get("elbo", np.full(n, np.nan, np.float32)),
            labels=labels if (labels > 0).any() else None,
            apix=np.broadcast_to(np.asarray(data["apix"], np.float64), (n,)).copy(),
            box=int(data["box"]) if "box" in data else None,
            centre=np.asarray(data["centre_px"], np.float64) if "centre_px" in data else None,
            class_log_post=_class_log_post(data, labels, path),
        )
        emb.check_finite(f"--embedding {path}", "re-embed those particles with tvae-em embed")
        return emb


def _class_log_post(data: dict, labels: np.ndarray, path: Path) -> np.ndarray | None:
    """The npz's class_log_post (n, K) checked against its classes; None when it has none."""
    if "class_log_post" not in data:
        return None
    log_post = np.asarray(data["class_log_post"], dtype=np.float64)
    n, k = len(labels), int(labels.max(initial=0))
    if log_post.ndim != 2 or log_post.shape[0] != n or log_post.shape[1] < max(k, 1):
        raise UserError(
            f"--embedding {path}: class_log_post has shape {log_post.shape} but the npz has "
            f"{n} particles in classes up to {k} (not written by tvae-em embed)"
        )
    return log_post


def _sigma(model: torch.nn.Module) -> float:
    """The Gaussian likelihood's noise sd (`PixelLikelihood.sd`; 1 for a model without one)."""
    return model.likelihood.sd if model.likelihood is not None else 1.0


def object_centres(
    model: torch.nn.Module, z: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """(n, 2) px: the object's centre in the template frame of each latent z (n, Z), from the
    model's noise-free template (`TargetVAE.template_centre`)."""
    out = np.zeros((len(z), 2), np.float64)
    with torch.inference_mode():
        for i in range(0, len(z), batch_size):
            zb = torch.as_tensor(z[i : i + batch_size], dtype=torch.float32, device=device)
            out[i : i + batch_size] = model.template_centre(zb).double().cpu().numpy()
    return out


def class_mean_centres(centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 2): each particle's class mean of `centres` (n, 2), labels (n,) any integers.

    RELION 2D re-centres each class average on its centre of mass; one centre per class keeps
    the particles of a class in one frame, whatever the noise in their own z."""
    out = np.empty_like(centres)
    for k in np.unique(labels):
        members = labels == k
        out[members] = centres[members].mean(0)
    return out


@dataclass
class TemplateClasses:
    """Each particle aligned to every class template: best class (0-based), its pose, and the
    log posterior of the classes (uniform prior) from the aligned log-likelihoods."""

    labels: np.ndarray  # (n,) 0-based
    theta: np.ndarray  # (n,) rad, pose against the winning class's template
    t: np.ndarray  # (n, 2) px
    log_post: np.ndarray  # (n, K)
    score: np.ndarray | None = None  # (n,) the winning class's aligned log-likelihood, nats

    def total(self) -> float:
        """The summed log-likelihood of every particle under its class: what EM raises."""
        return float(self.score.sum())


def classify_with_templates(
    model: torch.nn.Module,
    loader,
    n: int,
    z_classes: np.ndarray | None,
    device: torch.device,
    ctf_for: Callable[[np.ndarray], torch.Tensor | None] | None = None,
    config: RefineConfig | None = None,
    advance: Advance | None = None,
    images: np.ndarray | None = None,
) -> TemplateClasses:
    """Assign each particle to the class whose template it fits best after a pose search
    (`refine_poses`: every angle and shift, with its CTF): the E-step of a 2D classification.

    Templates: the model's noise-free images of the class latents z_classes (K, Z), or `images`
    (K, 2D, 2D): CTF-free class images at twice the box (e.g. the aligned class averages, the
    M-step); an all-zero image is an empty class and gets no particle."""
    k = len(images) if images is not None else len(z_classes)
    config = config or RefineConfig()
    scores = np.full((n, k), -np.inf)
    theta = np.zeros(n)
    t = np.zeros((n, 2))
    fine = (
        torch.as_tensor(images, dtype=torch.float32, device=device)
        if images is not None
        else model_templates(model, z_classes, device)
    )  # (K, 2D, 2D)
    empty = [c for c in range(k) if not bool(fine[c].abs().sum() > 0)] if images is not None else []
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        for idx, y in loader:
            i = idx.numpy()
            y = y.to(device).float()
            ctf = ctf_for(i) if ctf_for is not None else None
            start = torch.zeros(len(i), device=device)
            best, win = None, torch.zeros(len(i), dtype=torch.long, device=device)
            for c in range(k):
                if c in empty:
                    continue
                f = search_poses(
                    fine[c][None], y, ctf, start, model.cfg.t_sd_px, _sigma(model), config
                )
                scores[i, c] = f.value.double().cpu().numpy()
                if best is None:
                    best, win = f, win.fill_(c)
                    continue
                better = f.value > best.value  # strict: ties keep the first class, as argmax
                win = torch.where(better, c, win)
                best = PoseSearch(
                    torch.where(better, f.theta, best.theta),
                    torch.where(better[:, None], f.t, best.t),
                    torch.where(better, f.value, best.value),
                )
            # Only the winner's pose is kept, so only it is polished to sub-step precision.
            th, tt = polish_poses(fine[win], y, ctf, best, config)
            theta[i], t[i] = th.double().cpu().numpy(), tt.double().cpu().numpy()
            if advance is not None:
                advance(len(i))
    labels = scores.argmax(1)
    log_post = scores - scores.max(1, keepdims=True)
    log_post -= np.log(np.exp(log_post).sum(1, keepdims=True))
    return TemplateClasses(labels, theta, t, log_post, scores.max(1))


def model_templates(model: torch.nn.Module, z: np.ndarray, device: torch.device) -> torch.Tensor:
    """(K, 2D, 2D) the model's noise-free, CTF-free templates of latents z (K, Z) at pose 0,
    rendered once at twice the box (`TargetVAE.refine_templates`, the grid `refine_poses` turns)."""
    zc = torch.as_tensor(z, dtype=torch.float32, device=device)
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        return model.refine_templates(zc).float()


def run_inference(
    model: torch.nn.Module,
    loader,
    n: int,
    device: torch.device,
    with_elbo: bool = True,
    ctf_for: Callable[[np.ndarray], torch.Tensor | None] | None = None,
    advance: Advance | None = None,
    seed: int = 0,
    refine: RefineConfig | None = None,
    amp: bool = True,
) -> Embedding:
    """Embed every batch (indices, images) of `loader` with `model.embed` into an Embedding;
    with `refine`, each pose is then refined against the particle's own template
    (`tvae_em.model.refine`), with its CTF when `ctf_for` is given."""
    emb = Embedding.empty(n, model.cfg.z_dim)
    use_amp = amp and native_bf16(device)  # the encoder and the ELBO; refinement is float32
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)  # the ELBO's one Gumbel-softmax sample is reproducible
        for idx, y in loader:
            idx_np = idx.numpy()
            y = y.to(device, non_blocking=True)
            ctf = ctf_for(idx_np) if ctf_for is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model.embed(y, with_elbo=with_elbo, ctf=ctf)
            if refine is not None:
                out["theta"], out["t"], _ = refine_poses(
                    model.refine_templates, y, out["z_mu"], out["theta"], ctf, model.cfg.t_sd_px,
                    _sigma(model), refine,
                )  # fmt: skip
                if model.z_encoder is not None:  # z of the particle aligned by the refined pose
                    out["z_mu"], out["z_sd"] = model.latent_at(y, out["theta"], out["t"], ctf)
            emb.store(idx_np, out)
            if advance is not None:
                advance(len(idx_np))
    return emb
