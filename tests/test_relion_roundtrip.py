"""RELION convention round trip: poses written by `embed` align particles back onto their template.

Synthetic particles are an asymmetric glyph at known rotation and shift, made at full size (64 px)
and Fourier-cropped 2x (32 px) like `preprocess`. The model is replaced by an oracle that looks each
image up among the known (normalised) particles and returns its true pose, so the test covers
loading, normalisation, batching, the pose -> star conversion and the writers, but not training.
Alignment is checked with RELION's alignment (metrics.relion_align, DESIGN.md 3), reading the
written files back with starfile and mrcfile.
"""

from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from torch import nn

from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.geometry import cryosparc_pose, relion_pose, transform_images, wrap_degrees
from tvae_em.metrics import relion_align
from tvae_em.model import TargetVAE
from tvae_em.synthetic import fourier_resize, render_glyph

N, FULL, PREP, APIX_FULL = 24, 64, 32, 2.0
APIX_PREP = APIX_FULL * FULL / PREP
NORM = (0.3, 2.0)  # the run's normalisation (mean, sd): the oracle only matches normalised images


class OracleModel(nn.Module):
    """Stands in for the exported model: exact look-up of each image -> its true pose."""

    def __init__(self, cfg, images: np.ndarray, theta: np.ndarray, t_px: np.ndarray):
        super().__init__()
        self.cfg = cfg
        flat = (images.reshape(len(images), -1) - NORM[0]) / NORM[1]
        self.register_buffer("known", torch.from_numpy(flat.astype(np.float32)))
        self.theta = torch.from_numpy(theta)
        self.t = torch.from_numpy(t_px)

    def embed(self, y: torch.Tensor, with_elbo: bool = False, ctf=None) -> dict[str, torch.Tensor]:
        d = torch.cdist(y.reshape(len(y), -1).float(), self.known)  # (B, n)
        dist, idx = d.min(1)
        assert float(dist.max()) < 1e-3, "embed did not feed the images as training did"
        b = len(y)
        out = {
            "theta": self.theta[idx].float(),
            "t": self.t[idx].float(),
            "z_mu": torch.stack([self.theta[idx].cos(), self.theta[idx].sin()], 1).float(),
            "z_sd": torch.ones(b, 2),
            "confidence": torch.ones(b),
            "r": torch.zeros(b, dtype=torch.long),
        }
        if with_elbo:
            out["elbo"] = -dist
        return out


@pytest.fixture(scope="module")
def posed():
    """Template (full and prep size), true poses in prep pixels, full and prep particle images."""
    rng = np.random.default_rng(7)
    template = render_glyph("F", FULL)
    theta = rng.uniform(-math.pi, math.pi, N)
    t_prep = rng.normal(0.0, 2.5, (N, 2))
    stack = torch.from_numpy(template)[None].expand(N, -1, -1).contiguous()
    full = transform_images(
        stack, torch.from_numpy(theta).float(), torch.from_numpy(t_prep * FULL / PREP).float()
    ).numpy()
    prep = fourier_resize(full, PREP)
    template_prep = fourier_resize(template[None], PREP)[0]
    return {
        "template": template,
        "template_prep": template_prep,
        "theta": theta,
        "t": t_prep,
        "full": full,
        "prep": prep,
    }


def _particle_star_and_images(star: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(star blocks, images in row order, pixel size per row) read back independently."""
    blocks = starfile.read(star, always_dict=True)
    particles, optics = blocks["particles"], blocks["optics"]
    apix = optics.set_index("rlnOpticsGroup")["rlnImagePixelSize"]
    images = []
    for name in particles["rlnImageName"]:
        k, stack = name.split("@")
        with mrcfile.open(star.parent / stack, permissive=True) as m:
            images.append(np.array(m.data[int(k) - 1]))
    return blocks, np.stack(images), particles["rlnOpticsGroup"].map(apix).to_numpy()


def _aligned_correlations(star: Path, template: np.ndarray, psi_sign: float = 1.0) -> np.ndarray:
    """(n,) correlation with the template of each particle aligned by RELION with its star pose."""
    blocks, images, apix = _particle_star_and_images(star)
    p = blocks["particles"]
    psi = psi_sign * p["rlnAnglePsi"].to_numpy()
    ox = p["rlnOriginXAngst"].to_numpy() / apix
    oy = p["rlnOriginYAngst"].to_numpy() / apix
    out = [
        np.corrcoef(relion_align(img, a, x, y).ravel(), template.ravel())[0, 1]
        for img, a, x, y in zip(images, psi, ox, oy, strict=True)
    ]
    return np.array(out)


@pytest.fixture(scope="module")
def exported(posed, tmp_path_factory):
    """embed run on the prep star with --original full star: paths of everything written."""
    from conftest import make_run_folder, write_particle_set

    root = tmp_path_factory.mktemp("roundtrip")
    full_star = write_particle_set(root / "full", posed["full"], APIX_FULL)
    prep_star = write_particle_set(root / "prep", posed["prep"], APIX_PREP)
    run = make_run_folder(root / "run", PREP, norm=NORM)
    oracle = OracleModel(None, posed["prep"], posed["theta"], posed["t"])
    mp = pytest.MonkeyPatch()

    def export(self):
        oracle.cfg = self.cfg
        return oracle

    mp.setattr(TargetVAE, "export_for_inference", export)
    try:
        out = root / "out"
        embed_particles(
            EmbedOptions(
                run,
                prep_star,
                out / "embedded.star",
                batch_size=5,
                original=full_star,
                cs_out=out / "embedded.cs",
                recentre="none",  # the oracle's poses are about the template's own origin
            )
        )
    finally:
        mp.undo()
    return out


def test_prep_star_aligns_particles_onto_template(posed, exported):
    cc = _aligned_correlations(exported / "embedded.star", posed["template_prep"])
    assert cc.min() > 0.95


def test_original_star_aligns_full_size_particles(posed, exported):
    star = exported / "embedded_original.star"
    blocks = starfile.read(star, always_dict=True)
    assert blocks["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(APIX_FULL)
    stack = exported.parent / "full" / "particles.mrcs"  # outside the working directory
    assert blocks["particles"]["rlnImageName"].str.endswith(f"@{stack}").all()
    cc = _aligned_correlations(star, posed["template"])
    assert cc.min() > 0.95


def test_wrong_sign_would_fail(posed, exported):
    """Negative control: the check above detects a flipped psi convention."""
    cc = _aligned_correlations(exported / "embedded.star", posed["template_prep"], psi_sign=-1.0)
    assert np.median(cc) < 0.8


def test_cs_shifts_are_pixels_of_the_full_stack(posed, exported):
    """pyem's csparc2star on the .cs (psi = deg(pose), origin = shift * psize) gives the star."""
    cs = np.load(exported / "embedded.cs")
    star = starfile.read(exported / "embedded_original.star", always_dict=True)["particles"]
    np.testing.assert_allclose(cs["alignments2D/psize_A"], APIX_FULL)
    np.testing.assert_allclose(
        wrap_degrees(np.degrees(cs["alignments2D/pose"])), star["rlnAnglePsi"], atol=1e-3
    )
    origin = cs["alignments2D/shift"] * cs["alignments2D/psize_A"][:, None]
    np.testing.assert_allclose(origin[:, 0], star["rlnOriginXAngst"], atol=1e-3)
    np.testing.assert_allclose(origin[:, 1], star["rlnOriginYAngst"], atol=1e-3)
    np.testing.assert_allclose(cs["alignments2D/shift"], -posed["t"] * FULL / PREP, atol=1e-3)


def test_relion_pose_formulas():
    theta = np.radians([0.0, 30.0, -90.0, 180.0, 200.0])
    t = np.array([[1.0, -2.0], [0.0, 0.5], [3.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    psi, origin = relion_pose(theta, t, np.full(5, 2.5))
    np.testing.assert_allclose(psi, [0.0, -30.0, 90.0, 180.0, 160.0], atol=1e-9)
    np.testing.assert_allclose(origin, -t * 2.5)
    assert ((psi > -180) & (psi <= 180)).all()
    pose, shift = cryosparc_pose(psi, origin, np.full(5, 2.5))
    np.testing.assert_allclose(np.degrees(pose), psi)
    np.testing.assert_allclose(shift, -t)
