"""`tvae-em generate`: PNGs of the expected size, --size, class averages, bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from click.testing import CliRunner
from conftest import make_run_folder, write_particle_set
from matplotlib.image import imread

from tvae_em import figures
from tvae_em.class2d import class_averages
from tvae_em.cli import main
from tvae_em.data import Normalisation
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.generate import (
    GenerateOptions,
    generate_figures,
    latent_axes,
    parse_dims,
    plane_latents,
    render,
    step_values,
    traversal_latents,
)
from tvae_em.io import ParticleStack
from tvae_em.metrics import template_correlation
from tvae_em.run import RunFolder
from tvae_em.synthetic import glyphs

BOX, N = 16, 24
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    images, _ = glyphs(N, box=BOX, seed=5, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(root / "d", images, 2.0)
    run = make_run_folder(root / "run", BOX)
    embed_particles(EmbedOptions(run, star, root / "e.star", classes=2, classify="kmeans"))
    return {"root": root, "star": star, "run": run, "npz": root / "e.npz"}


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    h, w = imread(path).shape[:2]
    return w, h


def test_all_figures_with_embedding_and_particles(embedded, tmp_path):
    s = generate_figures(
        GenerateOptions(
            embedded["run"],
            tmp_path / "figs",
            embedding=embedded["npz"],
            particles=embedded["star"],
            n_steps=5,
        )
    )
    names = {p.name for p in s.outputs}
    pngs = {
        "latent_traversal.png",
        "latent_plane.png",
        "reconstructions.png",
        "latent_scatter.png",
        "pose_histograms.png",
        "class_averages.png",
    }
    assert pngs | {"class_averages.mrcs", "class_averages.star"} == names and not s.notes
    for name in pngs:
        _png_size(tmp_path / "figs" / name)
    lay = figures.grid_layout(2, 5, BOX, row_labels=True, col_labels=True, xlabel=True)
    assert _png_size(tmp_path / "figs" / "latent_traversal.png") == lay.size
    plane = figures.grid_layout(5, 5, BOX, row_labels=True, col_labels=True, xlabel=True)
    assert _png_size(tmp_path / "figs" / "latent_plane.png") == plane.size
    assert not list((tmp_path / "figs").glob(".*"))  # no temporary files left


def test_class_average_files_list_class_sizes(embedded, tmp_path):
    generate_figures(
        GenerateOptions(
            embedded["run"],
            tmp_path,
            embedding=embedded["npz"],
            particles=embedded["star"],
            classes=3,
            n_steps=3,
        )
    )
    table = starfile.read(tmp_path / "class_averages.star", always_dict=True)["particles"]
    assert list(table["rlnClassNumber"]) == [1, 2, 3]
    assert table["tvaeClassSize"].sum() == N
    np.testing.assert_allclose(table["rlnClassDistribution"].sum(), 1.0)
    with mrcfile.open(tmp_path / "class_averages.mrcs") as m:
        assert m.data.shape == (3, BOX, BOX) and np.isfinite(m.data).all()


def test_size_changes_the_rendered_size(embedded, tmp_path):
    sizes = {}
    for size in (16, 160):
        out = tmp_path / f"s{size}"
        generate_figures(GenerateOptions(embedded["run"], out, size=size, n_steps=3))
        sizes[size] = _png_size(out / "latent_traversal.png")
        lay = figures.grid_layout(2, 3, size, row_labels=True, col_labels=True, xlabel=True)
        assert sizes[size] == lay.size
    assert sizes[160][0] > sizes[16][0]
    model = RunFolder(embedded["run"]).load_model().model
    assert render(model, np.zeros((2, 2)), 40).shape == (2, 40, 40)


def test_render_size_is_the_same_object(embedded):
    """Rendering at 2x size and downsampling gives about the same image (coordinate generator)."""
    model = RunFolder(embedded["run"]).load_model().model
    z = np.array([[0.5, -1.0]])
    small = render(model, z, BOX)[0]
    big = torch.from_numpy(render(model, z, 2 * BOX))[None]
    down = torch.nn.functional.avg_pool2d(big, 2)[0, 0].numpy()
    assert np.corrcoef(small.ravel(), down.ravel())[0, 1] > 0.8


def test_class_averages_with_true_poses_match_templates(tmp_path):
    images, truth = glyphs(40, box=32, seed=2, n_classes=2, t_sd_px=2.0)
    stack = ParticleStack.open(write_particle_set(tmp_path, images, 1.5))
    args = (stack, Normalisation(), truth["theta"], truth["t"], truth["label"], 2)
    averages, counts = class_averages(*args, batch_size=16)
    assert counts.tolist() == np.bincount(truth["label"]).tolist()
    cc = template_correlation(
        averages, truth["templates"], n_angles=1, max_shift_px=0, one_to_one=True
    )
    assert cc.min() > 0.95
    unaligned, _ = class_averages(
        stack, Normalisation(), np.zeros(40), np.zeros((40, 2)), truth["label"], 2
    )
    cc0 = template_correlation(
        unaligned, truth["templates"], n_angles=1, max_shift_px=0, one_to_one=True
    )
    assert cc0.max() < 0.8  # without the poses the averages are blurs


def test_latent_axes_follow_the_embedding():
    rng = np.random.default_rng(0)
    direction = np.array([0.6, 0.8])
    z = 3.0 + rng.normal(0, 2.0, (500, 1)) * direction + rng.normal(0, 0.1, (500, 2))
    axes = latent_axes(2, z)
    assert abs(axes.axes[0] @ direction) > 0.99
    assert axes.scales[0] == pytest.approx(2.0, rel=0.15) and axes.scales[1] < 0.2
    np.testing.assert_allclose(axes.centre, 3.0, atol=0.3)
    prior = latent_axes(3)
    lat = traversal_latents(prior, [2], step_values(5, 2.0))  # (1, 5, 3)
    np.testing.assert_allclose(lat[0, :, 2], [-2, -1, 0, 1, 2])
    np.testing.assert_allclose(lat[0, :, :2], 0.0)


def test_plane_rows_go_up_columns_go_right():
    z = plane_latents(latent_axes(2), [0, 1], step_values(3, 1.0))  # (3, 3, 2)
    np.testing.assert_allclose(z[0, :, 0], [-1, 0, 1])
    np.testing.assert_allclose(z[:, 0, 1], [1, 0, -1])


def test_parse_dims():
    assert parse_dims("1,3", 3, "z") == [0, 2] and parse_dims(None, 12, "z") == list(range(10))


def test_z_dim_3_plane_only_for_two_dims(tmp_path):
    run = make_run_folder(tmp_path / "run", BOX, z_dim=3)
    s = generate_figures(GenerateOptions(run, tmp_path / "a", n_steps=3))
    assert {p.name for p in s.outputs} == {"latent_traversal.png"}
    s = generate_figures(GenerateOptions(run, tmp_path / "b", n_steps=3, dims="1,3"))
    assert {p.name for p in s.outputs} == {"latent_traversal.png", "latent_plane.png"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dims", "3"], "--dims 3"),
        (["--dims", "0"], "--dims 0"),
        (["--dims", "x"], "--dims x"),
        (["--size", "4"], "--size 4"),
        (["--n-steps", "1"], "--n-steps 1"),
        (["--embedding", "{root}/missing.npz"], "--embedding"),
        (["--embedding", "{npz3}"], "z_dim 2"),
        (["--particles", "{few}", "--embedding", "{npz}"], "--particles"),
        (["RUN={root}"], "no checkpoint"),
        (["OUT={root}/afile/figs"], "afile"),
    ],
)
def test_bad_input_exits_2_with_one_line(embedded, tmp_path, extra, message):
    root = tmp_path
    (root / "afile").write_text("")
    fmt = {"root": root, "npz": embedded["npz"]}
    if any("{npz3}" in a for a in extra):
        np.savez(root / "z3.npz", **{**np.load(embedded["npz"]), "z_mu": np.zeros((N, 3))})
        fmt["npz3"] = root / "z3.npz"
    if any("{few}" in a for a in extra):
        images, _ = glyphs(5, box=BOX)
        fmt["few"] = write_particle_set(root / "few", images, 2.0)
    run, out = str(embedded["run"]), root / "figs"
    args = []
    for a in (x.format(**fmt) for x in extra):
        if a.startswith("RUN="):
            run = a[4:]
        elif a.startswith("OUT="):
            out = Path(a[4:])
        else:
            args.append(a)
    r = CliRunner().invoke(main, ["generate", run, "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], r.stderr
    assert not (root / "figs").exists()


def test_cli_generate(embedded, tmp_path):
    r = CliRunner().invoke(main, ["generate", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--embedding" in r.output
    r = CliRunner().invoke(
        main, ["generate", str(embedded["run"]), "-o", str(tmp_path / "f"), "--n-steps", "3"]
    )
    assert r.exit_code == 0, r.output
    assert "latent_traversal.png" in r.stdout and "need --particles" in r.stderr


def test_ctf_run_adds_a_ctf_row_and_phase_flips(tmp_path):
    images, _ = glyphs(10, box=BOX, seed=1)
    defocus = {"rlnDefocusU": np.full(10, 12000.0), "rlnDefocusV": np.full(10, 11000.0)}
    star = write_particle_set(tmp_path / "d", images, 2.0, extra=defocus)
    run = make_run_folder(tmp_path / "run", BOX, ctf=True)
    embed_particles(EmbedOptions(run, star, tmp_path / "e.star"))
    generate_figures(
        GenerateOptions(
            run, tmp_path / "f", embedding=tmp_path / "e.npz", particles=star, n_steps=2, n_recon=4
        )
    )
    lay = figures.grid_layout(3, 4, BOX, row_labels=True, col_labels=True, xlabel=True)
    assert _png_size(tmp_path / "f" / "reconstructions.png") == lay.size
    with mrcfile.open(tmp_path / "f" / "class_averages.mrcs") as m:
        assert m.data.reshape(-1, BOX, BOX).shape == (1, BOX, BOX) and np.isfinite(m.data).all()


# ---- classes: the embedding's by default; --classes K also writes the per-particle classes ----
@pytest.fixture(scope="module")
def embedded3(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen3")
    images, _ = glyphs(30, box=BOX, seed=7, n_classes=3, t_sd_px=1.0)
    star = write_particle_set(root / "d", images, 2.0)
    run = make_run_folder(root / "run", BOX)
    embed_particles(EmbedOptions(run, star, root / "e.star", classes=3, classify="kmeans"))
    return {"star": star, "run": run, "npz": root / "e.npz", "out": root / "e.star"}


def _counts(column) -> list[int]:
    return np.bincount(np.asarray(column, dtype=np.int64)).tolist()[1:]


def test_generate_uses_the_embedding_classes(embedded3, tmp_path):
    e = embedded3
    s = generate_figures(
        GenerateOptions(e["run"], tmp_path, embedding=e["npz"], particles=e["star"], n_steps=2)
    )
    embedded = starfile.read(e["out"], always_dict=True)["particles"]
    table = starfile.read(tmp_path / "class_averages.star", always_dict=True)["particles"]
    assert len(table) == 3 and table["tvaeClassSize"].tolist() == _counts(
        embedded["rlnClassNumber"]
    )
    assert not {"particle_classes.csv", "particle_classes.star"} & {p.name for p in s.outputs}


def test_generate_classes_4_writes_the_particle_classes_it_averaged(embedded3, tmp_path):
    e = embedded3
    generate_figures(
        GenerateOptions(
            e["run"], tmp_path, embedding=e["npz"], particles=e["star"], classes=4, n_steps=2
        )
    )
    table = starfile.read(tmp_path / "class_averages.star", always_dict=True)["particles"]
    per_particle = ParticleStack.open(tmp_path / "particle_classes.star")  # its images resolve
    csv = pd.read_csv(tmp_path / "particle_classes.csv")
    classes = per_particle.particles["rlnClassNumber"].to_numpy(np.int64)
    assert len(table) == 4 and table["tvaeClassSize"].tolist() == _counts(classes)
    assert csv["rlnClassNumber"].tolist() == classes.tolist()
    assert csv["particle"].tolist() == list(range(1, len(classes) + 1))
    # the averages are those of these classes (and not of the embedding's 3)
    npz = np.load(e["npz"])
    norm = RunFolder(e["run"]).load_model().normalisation
    again, _ = class_averages(per_particle, norm, npz["theta_rad"], npz["shift_px"], classes - 1, 4)
    with mrcfile.open(tmp_path / "class_averages.mrcs") as m:
        np.testing.assert_allclose(m.data, again, atol=1e-5)
    if shutil.which("relion_star_handler") is None:
        pytest.skip("RELION 3.1 (relion_star_handler) is not installed")
    out = subprocess.run(
        ["relion_star_handler", "--i", "particle_classes.star", "--o", "c4.star",
         "--select", "rlnClassNumber", "--minval", "4", "--maxval", "4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    written = starfile.read(tmp_path / "c4.star", always_dict=True).get("particles", [])
    assert len(written) == (classes == 4).sum()


def test_class_averages_star_has_the_particles_optics(embedded3, tmp_path):
    e = embedded3
    generate_figures(
        GenerateOptions(e["run"], tmp_path, embedding=e["npz"], particles=e["star"], n_steps=2)
    )
    optics = starfile.read(tmp_path / "class_averages.star", always_dict=True)["optics"]
    row = optics.iloc[0]
    assert (row["rlnVoltage"], row["rlnSphericalAberration"], row["rlnAmplitudeContrast"]) == (
        300.0,
        2.7,
        0.1,
    )
    assert row["rlnImagePixelSize"] == 2.0 and row["rlnImageSize"] == BOX
    if shutil.which("relion_star_handler") is None:
        pytest.skip("RELION 3.1 (relion_star_handler) is not installed")
    out = subprocess.run(
        ["relion_star_handler", "--i", "class_averages.star", "--o", "sel.star",
         "--select", "rlnClassNumber", "--minval", "2", "--maxval", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(starfile.read(tmp_path / "sel.star", always_dict=True)["particles"]) == 2
