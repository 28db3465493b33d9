"""Re-centred origins: embed writes shifts of each class's object centre, not of the model's
template origin (which only the shift prior pins and which can sit pixels off the object).

The model is an oracle whose template is the glyph displaced by a known offset c0 (as a trained
model's template can be): it reports poses in that displaced frame and renders that template, so
`embed --recentre class` must give back the glyph's true shifts, and `--recentre none` the displaced
ones. Where RELION is installed, its own re-extraction with the written origins
(`relion_stack_create --apply_rounded_offsets_only`, run from the folder embed ran in) must put
every particle's object within 1 px of the box centre.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from torch import nn

from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.geometry import pixel_grid, transform_images
from tvae_em.model import TargetVAE
from tvae_em.synthetic import render_glyph

N, BOX, APIX = 40, 32, 3.0
C0 = np.array([3.0, -2.0])  # the oracle template's origin sits this far from the glyph's centre


def _rotate(theta: np.ndarray, v: np.ndarray) -> np.ndarray:
    """R(theta) v for theta (n,) and v (2,) -> (n, 2)."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([c * v[0] - s * v[1], s * v[0] + c * v[1]], 1)


def _centroid(img: np.ndarray) -> np.ndarray:
    """(x, y) centroid in pixels from the box centre of an image's positive part."""
    w = np.clip(img, 0, None)
    grid = pixel_grid(img.shape[-1]).numpy()  # (D, D, 2)
    return (w[..., None] * grid).sum((0, 1)) / w.sum()


class DisplacedOracle(nn.Module):
    """Looks each particle up among the known ones; poses in a template frame displaced by C0."""

    def __init__(self, cfg, images, theta, t, template):
        super().__init__()
        self.cfg = cfg
        self.known = torch.from_numpy(images.reshape(len(images), -1))
        self.theta = theta
        self.t_model = t + _rotate(theta, C0)  # particle = T(t') R(theta) g', g'(u) = g(u + C0)
        shifted = transform_images(
            torch.from_numpy(template)[None], torch.zeros(1), torch.from_numpy(-C0[None]).float()
        )
        self.template = shifted[0]  # (D, D) g'

    def embed(self, y, with_elbo=False, ctf=None):
        idx = torch.cdist(y.reshape(len(y), -1).float(), self.known).argmin(1).numpy()
        b = len(y)
        return {
            "theta": torch.from_numpy(self.theta[idx]),
            "t": torch.from_numpy(self.t_model[idx]),
            "z_mu": torch.zeros(b, 2),
            "z_sd": torch.ones(b, 2),
            "confidence": torch.ones(b),
            "r": torch.zeros(b, dtype=torch.long),
        }

    def render(self, z, theta, t, size=None):
        return self.template.expand(len(z), -1, -1)

    template_centre = TargetVAE.template_centre


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    from conftest import make_run_folder, write_particle_set

    rng = np.random.default_rng(3)
    template = render_glyph("F", BOX, height=0.45)
    theta = rng.uniform(-math.pi, math.pi, N)
    t = rng.uniform(-3.0, 3.0, (N, 2))
    images = transform_images(
        torch.from_numpy(template)[None].expand(N, -1, -1).contiguous(),
        torch.from_numpy(theta).float(),
        torch.from_numpy(t).float(),
    ).numpy()
    root = tmp_path_factory.mktemp("recentre")
    star = write_particle_set(root / "prep", images, APIX)
    run = make_run_folder(root / "run", BOX, norm=(0.0, 1.0))
    return {
        "root": root,
        "star": star,
        "run": run,
        "images": images,
        "theta": theta,
        "t": t,
        "template": template,
    }


def _embed(particles, name: str, recentre: str) -> Path:
    p = particles
    normalised = p["images"]  # the run's normalisation is (0, 1)
    oracle = DisplacedOracle(None, normalised, p["theta"], p["t"], p["template"])
    mp = pytest.MonkeyPatch()

    def export(self):
        oracle.cfg = self.cfg
        return oracle

    mp.setattr(TargetVAE, "export_for_inference", export)
    try:
        out = p["root"] / name / "embedded.star"
        out.parent.mkdir()
        embed_particles(
            EmbedOptions(
                p["run"],
                p["star"],
                out,
                classes=1,
                recentre=recentre,
                with_elbo=False,
                refine=False,
                classify="kmeans",
            )
        )
    finally:
        mp.undo()
    return out


def _shifts(star: Path) -> np.ndarray:
    """(n, 2) px: the particle shift undone by the star's origins."""
    p = starfile.read(star, always_dict=True)["particles"]
    return -np.stack([p["rlnOriginXAngst"], p["rlnOriginYAngst"]], 1) / APIX


def test_origins_centre_the_object_not_the_template_origin(particles):
    centred = _shifts(_embed(particles, "class", "class"))
    raw = _shifts(_embed(particles, "none", "none"))
    np.testing.assert_allclose(centred, particles["t"], atol=0.15)
    np.testing.assert_allclose(raw, particles["t"] + _rotate(particles["theta"], C0), atol=1e-4)


def test_particle_mode_gives_the_same_centres_for_one_object(particles):
    np.testing.assert_allclose(
        _shifts(_embed(particles, "particle", "particle")), particles["t"], atol=0.15
    )


@pytest.mark.skipif(shutil.which("relion_stack_create") is None, reason="RELION not installed")
@pytest.mark.parametrize("recentre", ["class", "none"])
def test_relion_reextraction_centres_every_particle(particles, recentre):
    star = _embed(particles, f"relion-{recentre}", recentre)
    project = particles["root"]  # RELION runs in the project folder, the star in a subfolder
    rel = os.path.relpath(star, project)
    subprocess.run(
        [
            "relion_stack_create",
            "--i",
            rel,
            "--o",
            f"reext-{recentre}",
            "--apply_rounded_offsets_only",
        ],
        cwd=project,
        check=True,
        capture_output=True,
    )
    with mrcfile.open(project / f"reext-{recentre}.mrcs", permissive=True) as m:
        stack = np.array(m.data)
    off = np.linalg.norm([_centroid(img) for img in stack], axis=1)  # (n,) px from the centre
    if recentre == "class":
        assert off.max() <= 1.0, off
    else:
        assert np.median(off) > 2.5, off  # the template origin is C0 (3.6 px) off the object
