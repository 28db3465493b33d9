"""The real RELION 3.1 programs read every star tvae-em writes, from the project folder.

RELION resolves rlnImageName from the folder it runs in (the project folder). Each test runs the
tvae-em command and then RELION in one working directory with the inputs in a subfolder, so
image paths are really resolved: `relion_star_handler --discard_on_stats` and
`relion_stack_create` open every image, `relion_refine` runs one 2D iteration, and
`relion_stack_create --apply_transformation` applies embed's poses. Skipped where RELION is not
installed (.ci/run installs it); the real files come from ../shared/data/cryodrgn-tests/.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_run_folder, write_particle_set
from torch import nn

from tvae_em.cli import main
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.geometry import relion_pose, transform_images
from tvae_em.io import read_star, write_star
from tvae_em.model import TargetVAE
from tvae_em.synthetic import render_glyph

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
PROGRAMS = ("relion_star_handler", "relion_stack_create", "relion_refine")
pytestmark = [
    pytest.mark.skipif(
        not all(shutil.which(p) for p in PROGRAMS),
        reason="RELION (relion_star_handler, relion_stack_create, relion_refine) not installed",
    ),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # real stacks' odd MRC headers
]
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"shared test data not found at {REAL}")
# input -> (files to copy into sub/, extra preprocess options, particles)
INPUTS = {
    "relion31.star": (["relion31.star", "relion31.mrcs"], [], 5),
    "empiar_10076_7.star": (["empiar_10076_7.star", "empiar_10076_7.mrc"], [], 7),
    "relion31.mrcs": (["relion31.mrcs"], ["--input-apix", "2.806"], 5),
    "empiar_10076_7.cs": (["empiar_10076_7.cs", "empiar_10076_7.mrc"], [], 7),
}


def relion(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a RELION program; its output is kept for the assertion message."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def accepted(result: subprocess.CompletedProcess) -> bool:
    """RELION ran without an error (exit code 0, no ERROR line)."""
    return result.returncode == 0 and "ERROR" not in result.stdout + result.stderr


def relion_opens_every_image(star: str, n: int, box: int) -> np.ndarray:
    """relion_star_handler and relion_stack_create read `star` and all its images (from the
    working directory); returns the images relion_stack_create wrote."""
    name = Path(star).stem
    r = relion("relion_star_handler", "--i", star, "--o", f"{name}_handled.star",
               "--discard_on_stats", "--discard_sigma", "1000")  # fmt: skip
    assert accepted(r), r.stdout + r.stderr
    assert len(read_star(f"{name}_handled.star")["particles"]) == n
    r = relion("relion_stack_create", "--i", star, "--o", f"{name}_stack")
    assert accepted(r), r.stdout + r.stderr
    with mrcfile.open(f"{name}_stack.mrcs") as m:
        assert m.data.shape == (n, box, box)
        return np.array(m.data)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder, the working directory of the test; inputs go to sub/."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _preprocess(name: str, size: int = 32) -> str:
    files, extra, _ = INPUTS[name]
    for f in files:
        shutil.copy(REAL / f, "sub")
    args = ["preprocess", f"sub/{name}", "-o", "tvae/prep", "--size", str(size), *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return "tvae/prep/particles.star"


@needs_real
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_relion_reads_preprocess_outputs(project, name):
    star = _preprocess(name)
    n = INPUTS[name][2]
    images = relion_opens_every_image(star, n, 32)
    with mrcfile.open("tvae/prep/particles.mrcs") as m:
        np.testing.assert_allclose(images, m.data, atol=1e-5)  # the images we wrote, in order


@needs_real
@pytest.mark.parametrize("name, box", [("relion31.star", 256), ("empiar_10076_7.cs", 320)])
def test_relion_reads_embed_outputs(project, name, box):
    star = _preprocess(name)
    n = INPUTS[name][2]
    run = make_run_folder(project / "run", 32, encoder_kernel=5)
    embed_particles(EmbedOptions(run, star, "tvae/embed/e.star", original=f"sub/{name}", classes=2))
    relion_opens_every_image("tvae/embed/e.star", n, 32)
    assert {"tvaeZ1", "tvaeSourceRow"} <= set(read_star("e_handled.star")["particles"])  # kept
    full = relion_opens_every_image("tvae/embed/e_original.star", n, box)
    source = INPUTS[name][0][-1]
    with mrcfile.open(f"sub/{source}", permissive=True) as m:
        np.testing.assert_allclose(full, m.data, atol=1e-4)


@needs_real
def test_relion_reads_embed_output_of_a_bare_stack(project):
    """A bare .mrcs has no optics: the star gets RELION's defaults, which RELION accepts."""
    _preprocess("relion31.mrcs")
    run = make_run_folder(project / "run", 32, encoder_kernel=5)
    embed_particles(
        EmbedOptions(run, "tvae/prep/particles.mrcs", "e.star", input_apix=11.224, classes=2)
    )
    optics = read_star("e.star")["optics"]
    assert optics.iloc[0][["rlnVoltage", "rlnSphericalAberration"]].tolist() == [300.0, 2.7]
    relion_opens_every_image("e.star", 5, 32)


def test_star_relative_to_its_own_folder_is_refused_from_the_project_folder(project):
    """The negative control: RELION does not look in the star's folder, so the check above
    would catch outputs whose paths are relative to their own folder."""
    rng = np.random.default_rng(0)
    write_particle_set(project / "sub", rng.normal(size=(3, 16, 16)), 2.0)  # names "particles.mrcs"
    r = relion("relion_stack_create", "--i", "sub/particles.star", "--o", "stack")
    assert not accepted(r)
    assert accepted(relion("relion_stack_create", "--i", "particles.star", "--o", "s", cwd="sub"))


@needs_real
def test_relion_refine_runs_one_2d_iteration_on_a_preprocess_output(project):
    star = _preprocess("relion31.star")
    assert {"rlnDefocusU", "rlnDefocusV"} <= set(read_star(star)["particles"].columns)
    Path("Class2D").mkdir()
    r = relion("relion_refine", "--i", star, "--o", "Class2D/run", "--K", "2", "--iter", "1",
               "--tau2_fudge", "2", "--particle_diameter", "300", "--j", "1", "--ctf",
               "--psi_step", "30", "--offset_range", "3", "--offset_step", "2", "--zero_mask",
               "--flatten_solvent", "--dont_combine_weights_via_disc", "--pool", "5")  # fmt: skip
    assert accepted(r), r.stdout[-2000:] + r.stderr[-2000:]
    data = read_star("Class2D/run_it001_data.star")["particles"]
    assert len(data) == 5 and data["rlnClassNumber"].isin([1, 2]).all()
    with mrcfile.open("Class2D/run_it001_classes.mrcs") as m:
        assert m.data.shape == (2, 32, 32)


# ---- poses applied by relion_stack_create --apply_transformation ------------------------------
N_PER_CLASS, BOX, APIX = 12, 32, 3.0
GLYPH_NAMES = ("F", "P")
NORM = (0.0, 1.0)


class OracleModel(nn.Module):
    """Stands in for the exported model: looks each image up among the known particles and
    returns its true pose, and a latent mean that is its class (so k-means finds the classes)."""

    def __init__(self, cfg, images, theta, t_px, labels):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("known", torch.from_numpy(images.reshape(len(images), -1)).float())
        self.theta, self.t = torch.from_numpy(theta).float(), torch.from_numpy(t_px).float()
        self.z = torch.from_numpy(np.eye(2)[labels] * 5.0).float()

    def embed(self, y, with_elbo=False, ctf=None):
        d = torch.cdist(y.reshape(len(y), -1).float(), self.known)
        dist, idx = d.min(1)
        assert float(dist.max()) < 1e-3
        b = len(y)
        out = {"theta": self.theta[idx], "t": self.t[idx], "z_mu": self.z[idx],
               "z_sd": torch.ones(b, 2), "confidence": torch.ones(b),
               "r": torch.zeros(b, dtype=torch.long)}  # fmt: skip
        if with_elbo:
            out["elbo"] = -dist
        return out


def _class_averages(star: str, out: str) -> tuple[np.ndarray, np.ndarray]:
    """relion_stack_create --apply_transformation on `star`; the mean aligned image of each
    class (rlnClassNumber 1, 2) and the classes."""
    r = relion("relion_stack_create", "--i", star, "--o", out, "--apply_transformation")
    assert accepted(r), r.stdout + r.stderr
    with mrcfile.open(f"{out}.mrcs") as m:
        aligned = np.array(m.data)
    classes = read_star(star)["particles"]["rlnClassNumber"].to_numpy()
    return np.stack([aligned[classes == k].mean(0) for k in (1, 2)]), classes


def _sharpness(averages: np.ndarray, templates: np.ndarray) -> float:
    """The worse class's correlation with its best-matching template."""
    cc = [[np.corrcoef(a.ravel(), t.ravel())[0, 1] for t in templates] for a in averages]
    return float(np.min(np.max(cc, axis=1)))


def test_stack_create_applies_embed_poses_as_sharply_as_the_true_poses(project):
    rng = np.random.default_rng(3)
    templates = np.stack([render_glyph(g, BOX) for g in GLYPH_NAMES])
    labels = np.repeat([0, 1], N_PER_CLASS)
    theta = rng.uniform(-math.pi, math.pi, len(labels))
    t = rng.normal(0.0, 1.5, (len(labels), 2))
    images = transform_images(
        torch.from_numpy(templates[labels]).float(),
        torch.from_numpy(theta).float(),
        torch.from_numpy(t).float(),
    ).numpy()
    images += rng.normal(0.0, 0.3, images.shape).astype(np.float32)
    write_particle_set(project / "sub", images, APIX)
    run = make_run_folder(project / "run", BOX, norm=NORM)
    oracle = OracleModel(None, images, theta, t, labels)

    def export(self):
        oracle.cfg = self.cfg
        return oracle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TargetVAE, "export_for_inference", export)
        embed_particles(  # the oracle's poses are about the template's own origin
            EmbedOptions(
                run,
                "sub/particles.star",
                "tvae/e.star",
                classes=2,
                recentre="none",
                refine=False,
                classify="kmeans",
            )
        )
    embedded, classes = _class_averages("tvae/e.star", "embedded")
    assert len(set(zip(classes, labels, strict=True))) == 2  # the two classes were found

    blocks = read_star("tvae/e.star")
    psi, origin = relion_pose(theta, t, np.full(len(theta), APIX))
    true = blocks["particles"].assign(
        rlnAnglePsi=psi, rlnOriginXAngst=origin[:, 0], rlnOriginYAngst=origin[:, 1]
    )
    write_star("true.star", {"optics": blocks["optics"], "particles": true})
    random = true.assign(
        rlnAnglePsi=rng.uniform(-180, 180, len(true)),
        rlnOriginXAngst=rng.normal(0, 1.5 * APIX, len(true)),
        rlnOriginYAngst=rng.normal(0, 1.5 * APIX, len(true)),
    )
    write_star("random.star", {"optics": blocks["optics"], "particles": random})
    sharp = {
        "embed": _sharpness(embedded, templates),
        "true": _sharpness(_class_averages("true.star", "true")[0], templates),
        "random": _sharpness(_class_averages("random.star", "random")[0], templates),
    }
    assert sharp["embed"] > 0.9 and sharp["embed"] >= sharp["true"] - 0.01, sharp
    assert sharp["random"] < sharp["true"] - 0.3, sharp
