"""The synthetic data sets are what they claim: poses, classes, SNR, CTF, files."""

from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from click.testing import CliRunner

from tvae_em.cli import main
from tvae_em.ctf import compute_ctf
from tvae_em.errors import UserError
from tvae_em.fourier import apply_ctf, fourier_resize
from tvae_em.geometry import align_images, transform_images
from tvae_em.metrics import relion_align
from tvae_em.synthetic import (
    blob_family,
    blob_volume,
    build_dataset,
    clean_images,
    glyphs,
    load_mnist,
    mnist_rotated,
    project,
    simulate_particles,
    spread_views,
    write_dataset,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = SHARED / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST not found at {MNIST}")


def _cc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _aligned(images: np.ndarray, truth: dict) -> np.ndarray:
    """Undo the true pose of each image with geometry.align_images."""
    theta = torch.from_numpy(truth["theta"]).float()
    t = torch.from_numpy(truth["t"]).float()
    return align_images(torch.from_numpy(images), theta, t).numpy()


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return blob_volume(32, seed=1)


@pytest.fixture(scope="module")
def clean(volume):
    """A noise-free, CTF-free particle set."""
    return simulate_particles(
        volume, 60, spread_views(3), apix=4.0, snr=math.inf, ctf=False, seed=2
    )


def test_glyphs_derotated_match_templates():
    images, truth = glyphs(90, box=40, seed=0, n_classes=3, t_sd_px=2.0)
    assert images.shape == (90, 40, 40) and truth["templates"].shape == (3, 40, 40)
    assert np.bincount(truth["label"]).tolist() == [30, 30, 30]
    aligned = _aligned(images, truth)
    cc = [_cc(aligned[i], truth["templates"][truth["label"][i]]) for i in range(90)]
    assert min(cc) > 0.95
    # the classes are distinct and not rotation-symmetric: a wrong pose does not match
    other = [_cc(aligned[i], truth["templates"][(truth["label"][i] + 1) % 3]) for i in range(90)]
    assert max(other) < 0.9
    assert np.std(truth["t"]) == pytest.approx(2.0, rel=0.25)


def test_project_axes_and_rotation():
    d, c = 21, 10
    vol = np.zeros((d, d, d), np.float32)
    vol[c, c, c + 5] = 1.0  # a point at x = +5 (axes z, y, x)
    rz90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (x, y) -> (-y, x)
    ry90 = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # x -> -z
    proj = project(vol, np.stack([np.eye(3), rz90, ry90]))
    peaks = [np.unravel_index(p.argmax(), p.shape) for p in proj]
    assert peaks == [(c, c + 5), (c + 5, c), (c, c)]  # (row, col): x=5; y=5; on the axis
    np.testing.assert_allclose(proj.sum((1, 2)), 1.0, atol=1e-5)


def test_spread_views_are_rotations_with_distinct_directions():
    r = spread_views(5)
    np.testing.assert_allclose(
        r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (5, 3, 3)), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(r), 1.0)
    directions = r[:, 2, :]  # R d = z  <=>  d = third row of R
    gram = directions @ directions.T
    assert np.all(gram[~np.eye(5, dtype=bool)] < 0.9)


def test_fourier_resize_keeps_values():
    const = np.full((2, 16, 16), 3.0, np.float32)
    np.testing.assert_allclose(fourier_resize(const, 8), 3.0, atol=1e-5)
    np.testing.assert_allclose(fourier_resize(const, 21), 3.0, atol=1e-5)


def test_particles_derotated_match_clean_projections(clean):
    images, truth = clean
    assert images.shape == (60, 32, 32)
    assert np.bincount(truth["label"]).tolist() == [20, 20, 20]
    aligned = _aligned(images, truth) / truth["scale"]
    cc = [_cc(aligned[i], truth["templates"][truth["label"][i]]) for i in range(60)]
    assert min(cc) > 0.97
    views = truth["templates"].reshape(3, -1)
    assert np.corrcoef(views)[~np.eye(3, dtype=bool)].max() < 0.9  # classes differ


def test_relion_convention_truth_undoes_the_pose(clean, tmp_path):
    images, truth = clean
    write_dataset(tmp_path, images, truth, apix=4.0)
    table = pd.read_csv(tmp_path / "truth.csv")
    for i in range(5):
        row = table.iloc[i]
        aligned = relion_align(images[i], row.psi_deg, row.originX_A / 4.0, row.originY_A / 4.0)
        assert _cc(aligned, truth["templates"][int(row["class"])]) > 0.97


def test_snr_measured_matches_request(volume):
    args = dict(n=80, views=spread_views(2), apix=4.0, seed=5, ctf=True)
    noisy, tn = simulate_particles(volume, snr=0.5, **args)
    clean, tc = simulate_particles(volume, snr=math.inf, **args)
    signal = clean / tc["scale"]
    noise = noisy / tn["scale"] - signal
    snr = signal.var(axis=(1, 2)).mean() / noise.var()
    assert snr == pytest.approx(0.5, rel=0.05)
    assert noisy.var() == pytest.approx(1.0, rel=0.02)  # scaled to unit variance


def test_ctf_is_applied_per_particle(volume):
    images, truth = simulate_particles(volume, 8, spread_views(2), apix=3.0, snr=math.inf, seed=4)
    p = truth["ctf"]
    assert np.all((p.dfu_A + p.dfv_A) / 2 >= 1e4) and np.all((p.dfu_A + p.dfv_A) / 2 <= 2.5e4)
    posed = transform_images(
        torch.from_numpy(truth["templates"][truth["label"]]),
        torch.from_numpy(truth["theta"]).float(),
        torch.from_numpy(truth["t"]).float(),
    )
    expected = apply_ctf(posed, compute_ctf(32, 3.0, p)).numpy() * truth["scale"]
    np.testing.assert_allclose(images, expected, atol=1e-4)
    # RELION sign: the CTF keeps the low-frequency contrast of the positive density positive
    assert np.all(images.mean(axis=(1, 2)) > 0)


def test_bad_views_and_snr_are_user_errors(volume):
    with pytest.raises(UserError, match="views"):
        simulate_particles(volume, 4, np.zeros((2, 2)))
    with pytest.raises(UserError, match="snr"):
        simulate_particles(volume, 4, spread_views(2), snr=0.0)


def test_written_files_read_back(volume, tmp_path):
    images, truth = simulate_particles(volume, 10, spread_views(2), apix=4.0, snr=1.0, seed=3)
    paths = write_dataset(tmp_path / "set", images, truth, 4.0, truth["ctf"], float16=True)
    assert paths["star"].read_text().startswith("# version 30001")
    blocks = starfile.read(paths["star"], always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(4.0)
    assert optics["rlnImageSize"].iloc[0] == 32 and optics["rlnVoltage"].iloc[0] == 300
    assert particles["rlnImageName"].iloc[3] == "000004@particles.mrcs"
    np.testing.assert_allclose(particles["rlnDefocusU"], truth["ctf"].dfu_A, rtol=1e-6)
    assert not any(c.startswith("tvae") or "true" in c.lower() for c in particles.columns)
    with mrcfile.open(paths["stack"], permissive=True) as m:
        assert m.data.dtype == np.float16 and m.voxel_size.x == pytest.approx(4.0)
        np.testing.assert_allclose(m.data.astype(np.float32), images, atol=4e-3)
    table = pd.read_csv(paths["truth"])
    np.testing.assert_allclose(table["psi_deg"], -np.degrees(truth["theta"]), atol=1e-5)
    np.testing.assert_allclose(table["originY_A"], -truth["t"][:, 1] * 4.0, atol=1e-5)


def test_ctf_round_trip_through_particle_stack(volume, tmp_path):
    io = pytest.importorskip("tvae_em.io")
    if not hasattr(io, "ParticleStack"):
        pytest.skip("tvae_em.io has no ParticleStack yet")
    images, truth = simulate_particles(volume, 6, spread_views(2), apix=4.0, snr=1.0, seed=3)
    paths = write_dataset(tmp_path, images, truth, 4.0, truth["ctf"])
    stack = io.ParticleStack.open(paths["star"])
    np.testing.assert_allclose(stack.read(np.arange(6)), images, atol=1e-6)
    read = stack.ctf_params()
    for field in ("dfu_A", "dfv_A", "dfang_deg", "volt_kv", "cs_mm", "amp_contrast"):
        np.testing.assert_allclose(getattr(read, field), getattr(truth["ctf"], field), rtol=1e-6)


@needs_mnist
def test_mnist_files_and_counts():
    images, labels = load_mnist(MNIST)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(labels).tolist() == counts


@needs_mnist
@pytest.mark.parametrize("mode", ["N", "U"])
def test_mnist_rotated_distribution_and_pose(mode):
    digits, labels = load_mnist(MNIST)
    images, truth = mnist_rotated(digits[:3000], labels[:3000], mode=mode, seed=1)
    assert images.shape == (3000, 50, 50) and 0.0 <= images.min() and images.max() <= 1.0
    theta = truth["theta"]
    if mode == "N":
        assert np.std(theta) == pytest.approx(math.pi / 4, rel=0.05) and abs(theta.mean()) < 0.05
    else:
        ecdf = np.sort(theta)
        uniform = (np.arange(1, 3001) - 0.5) / 3000 * 2 * math.pi - math.pi
        assert np.abs(ecdf - uniform).max() < 0.15  # Kolmogorov distance < 0.025 in probability
    aligned = _aligned(images[:50], {k: v[:50] for k, v in truth.items()})
    cc = [_cc(aligned[i], truth["unrotated"][i]) for i in range(50)]
    assert np.median(cc) > 0.9


def test_cli_simulate_glyphs(tmp_path):
    res = CliRunner().invoke(main, ["simulate", "glyphs", "-o", str(tmp_path), "--n", "12"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "truth.csv")) == 12
    assert starfile.read(tmp_path / "particles.star", always_dict=True)["particles"].shape[0] == 12


def test_cli_simulate_particles_and_user_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["simulate", "particles", "-o", str(tmp_path), "--n", "6", "--box", "24", "--views", "2"],
    )
    assert res.exit_code == 0, res.output
    particles = starfile.read(tmp_path / "particles.star", always_dict=True)["particles"]
    assert "rlnDefocusU" in particles.columns
    res = runner.invoke(main, ["simulate", "mnist-u", "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and "--mnist-dir" in res.output
    res = runner.invoke(
        main, ["simulate", "particles", "-o", str(tmp_path), "--volume", "nope.mrc"]
    )
    assert res.exit_code == 2 and "nope.mrc" in res.output
    assert "Example" in runner.invoke(main, ["simulate", "--help"]).output


# ---- hard sets: look-alike volumes, distinct views ---------------------------------------------


def test_view_rotated_about_the_beam_axis_is_refused(volume):
    # the same direction (rot, tilt) with psi turned by 90 deg: one image, rotated in-plane
    with pytest.raises(UserError, match=r"classes 0 and 1 .*correlation 1\.000"):
        simulate_particles(volume, 6, [(30, 60, 0), (30, 60, 90), (200, 100, 0)], apix=4.0)
    with pytest.raises(UserError, match="classes 0 and 1"):  # a small turn too
        simulate_particles(volume, 6, [(30, 60, 0), (30, 60, 37), (200, 100, 0)], apix=4.0)


def test_view_from_the_opposite_side_is_refused_as_a_mirror(volume):
    # looking from -d gives the mirror image of the view from d
    with pytest.raises(UserError, match="classes 0 and 1"):
        simulate_particles(volume, 6, [(30, 60, 0), (210, 120, 0)], apix=4.0)
    _, truth = simulate_particles(
        volume, 6, [(30, 60, 0), (210, 120, 0)], apix=4.0, max_view_cc=None
    )
    assert truth["view_cc"][0, 1] > 0.999  # measured, not refused


def test_distinct_views_pass_and_their_correlations_are_kept(volume):
    _, truth = simulate_particles(volume, 6, spread_views(3), apix=4.0, snr=1.0)
    cc = truth["view_cc"]
    assert cc.shape == (3, 3) and np.allclose(cc, cc.T) and np.allclose(np.diag(cc), 1.0)
    assert cc[~np.eye(3, dtype=bool)].max() < 0.98
    assert truth["views"]["max_cc"].tolist() == pytest.approx(
        np.where(np.eye(3, dtype=bool), -1, cc).max(1).tolist()
    )


def test_hard_preset_writes_views_csv_of_lookalike_volumes(tmp_path):
    # the preset at a quarter of its size: 3 volumes x 2 views, equal mass, distinct views
    paths = build_dataset("particles", tmp_path, n=12, box=32, apix=4.0, snr=0.1, hard=True)
    views = pd.read_csv(paths["views"])
    assert len(views) == 6 and sorted(views["volume"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert views["max_cc"].max() < 0.98 and views["max_cc"].min() > 0.5  # alike, not equal
    cc = views[[f"cc_{j}" for j in range(6)]].to_numpy()
    np.testing.assert_allclose(cc, cc.T)
    vols = blob_family(3, 32, seed=0)
    mass = vols.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(mass, mass.mean(), rtol=1e-5)
    assert _cc(vols[0], vols[1]) > 0.5  # the shared core: alike at low resolution
    assert not np.allclose(vols[0], vols[1], atol=0.05)
    truth = pd.read_csv(paths["truth"])
    assert np.bincount(truth["class"]).tolist() == [2] * 6


def test_hard_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="--volumes 4 needs"):
        build_dataset("particles", tmp_path / "a", n=4, box=24, volumes=4, views=3)
    with pytest.raises(UserError, match="--defocus"):
        build_dataset("particles", tmp_path / "b", n=4, box=24, defocus_um=(2.0, 1.0))
    with pytest.raises(UserError, match="particles only"):
        build_dataset("glyphs", tmp_path / "c", n=4, hard=True)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_clean_images_are_the_posed_templates(clean):
    images, truth = clean
    noise_free = clean_images(truth["templates"], truth["theta"], truth["t"], truth["label"])
    np.testing.assert_allclose(noise_free * truth["scale"], images, atol=1e-5)
    small = clean_images(truth["templates"], truth["theta"], truth["t"], truth["label"], 16)
    np.testing.assert_allclose(small, fourier_resize(noise_free, 16), atol=1e-5)
