"""`embed --classes K --class2d PREFIX`: the files relion_refine writes for a 2D run, checked with
the real RELION 3.1 where it is installed (relion_star_handler, relion_stack_create,
relion_refine --ref), and the class averages' one home (`tvae_em.class2d.class_averages`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from click.testing import CliRunner
from conftest import make_run_folder, write_particle_set

from tvae_em.cli import main
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.errors import UserError
from tvae_em.run import RunFolder
from tvae_em.select import SelectOptions, select_particles
from tvae_em.synthetic import glyphs

BOX, N, K = 16, 30, 3
PREFIX = "Class2D/run_it000"


def _relion(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"RELION 3.1 ({', '.join(missing)}) is not installed")


def _run(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder: particles, a run, and embed --class2d run from inside it (as RELION)."""
    root = tmp_path_factory.mktemp("project")
    images, _ = glyphs(N, box=BOX, seed=3, n_classes=K, t_sd_px=1.5)
    write_particle_set(root, images, 2.0)
    make_run_folder(root / "run", BOX)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        summary = embed_particles(
            EmbedOptions(  # an untrained model: its templates are no basis for classes
                "run",
                "particles.star",
                "embedded.star",
                classes=K,
                class2d=PREFIX,
                classify="kmeans",
            )  # fmt: skip
        )
    return root, summary


def _blocks(root: Path, suffix: str) -> dict:
    return starfile.read(root / f"{PREFIX}_{suffix}", always_dict=True)


def test_files_and_blocks_as_relion_refine_writes_them(project):
    root, summary = project
    names = {p.name for p in summary.outputs}
    assert {"run_it000_data.star", "run_it000_model.star", "run_it000_classes.mrcs"} <= names
    model = _blocks(root, "model.star")
    assert list(model) == ["model_general", "model_classes"]
    general = model["model_general"].iloc[0]
    assert general["rlnNrClasses"] == K and general["rlnPixelSize"] == 2.0
    assert general["rlnOriginalImageSize"] == BOX and general["rlnDataDimensionality"] == 2
    classes = model["model_classes"]
    refs = [f"{k:06d}@{PREFIX}_classes.mrcs" for k in range(1, K + 1)]
    assert classes["rlnReferenceImage"].tolist() == refs  # from the project folder, as RELION
    data = _blocks(root, "data.star")["particles"]
    counts = np.bincount(data["rlnClassNumber"], minlength=K + 1)[1:]
    np.testing.assert_allclose(classes["rlnClassDistribution"], counts / N, atol=1e-9)
    assert classes["tvaeClassSize"].tolist() == counts.tolist()
    embedded = starfile.read(root / "embedded.star", always_dict=True)["particles"]
    for ours, theirs in [
        ("rlnClassNumber", "rlnClassNumber"),
        ("rlnAnglePsi", "rlnAnglePsi"),
        ("rlnMaxValueProbDistribution", "tvaePoseConfidence"),
        ("rlnLogLikeliContribution", "tvaeElbo"),
    ]:
        np.testing.assert_allclose(data[ours], embedded[theirs], rtol=1e-8)
    assert (data["rlnNormCorrection"] == 1).all() and (data["rlnNrOfSignificantSamples"] == 1).all()
    with mrcfile.open(root / f"{PREFIX}_classes.mrcs") as m:
        assert m.data.shape == (K, BOX, BOX) and float(m.voxel_size.x) == pytest.approx(2.0)


def test_kmeans_classes_have_no_class_posterior(project):
    """--classify kmeans: no class posterior, so the data star's rlnMaxValueProbDistribution is
    the pose confidence (above), embed's star has none and the npz no class_log_post."""
    root, _ = project
    assert "class_log_post" not in np.load(root / "embedded.npz").files
    embedded = starfile.read(root / "embedded.star", always_dict=True)["particles"]
    assert "rlnMaxValueProbDistribution" not in embedded
    general = _blocks(root, "model.star")["model_general"].iloc[0]
    assert general["rlnAveragePmax"] == pytest.approx(embedded["tvaePoseConfidence"].mean())


def test_relion_star_handler_selects_a_class(project):
    _relion("relion_star_handler")
    root, _ = project
    data = _blocks(root, "data.star")["particles"]
    for k in range(1, K + 1):
        _run(
            ["relion_star_handler", "--i", f"{PREFIX}_data.star", "--o", f"c{k}.star",
             "--select", "rlnClassNumber", "--minval", str(k), "--maxval", str(k)],
            root,
        )  # fmt: skip
        kept = starfile.read(root / f"c{k}.star", always_dict=True).get("particles", [])
        assert len(kept) == (data["rlnClassNumber"] == k).sum()  # an empty class: no block


def test_relion_reads_the_model_star_blocks_by_name(project):
    _relion("relion_star_printtable")
    root, _ = project
    model = f"{PREFIX}_model.star"
    general = _run(["relion_star_printtable", model, "data_model_general", "rlnNrClasses"], root)
    assert general.split() == [str(K)]
    rows = _run(
        ["relion_star_printtable", model, "data_model_classes", "rlnReferenceImage"], root
    ).split()
    assert rows == [f"{k:06d}@{PREFIX}_classes.mrcs" for k in range(1, K + 1)]


def test_averages_are_relions_own_alignment_of_the_data_star(project):
    """relion_stack_create --apply_transformation aligns each particle by its psi/origins as
    RELION does; its per-class means are our class averages."""
    _relion("relion_stack_create")
    root, _ = project
    _run(["relion_stack_create", "--i", f"{PREFIX}_data.star", "--o", "aligned",
          "--apply_transformation"], root)  # fmt: skip
    aligned = (
        RunFolder(root / "run")
        .load_model()
        .normalisation.apply(mrcfile.read(root / "aligned.mrcs"))
    )
    labels = _blocks(root, "data.star")["particles"]["rlnClassNumber"].to_numpy()
    ours = mrcfile.read(root / f"{PREFIX}_classes.mrcs")
    psi = _blocks(root, "data.star")["particles"]["rlnAnglePsi"]
    assert psi.std() > 30  # the poses really turn the particles
    for k in range(K):
        theirs = aligned[labels == k + 1].mean(0)
        assert np.corrcoef(theirs.ravel(), ours[k].ravel())[0, 1] > 0.99


def test_relion_refine_reads_the_classes_through_the_model_star(project):
    """relion_refine --ref PREFIX_model.star opens PREFIX_classes.mrcs via rlnReferenceImage:
    its iteration-0 references are our averages, one per class."""
    _relion("relion_refine")
    root, _ = project
    (root / "refine").mkdir()
    refine = ["relion_refine", "--i", f"{PREFIX}_data.star", "--ref", f"{PREFIX}_model.star"]
    refine += ["--o", "refine/run", "--iter", "1", "--tau2_fudge", "2", "--particle_diameter"]
    refine += ["24", "--j", "1", "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2"]
    _run(refine, root)
    refs = mrcfile.read(root / "refine" / "run_it000_classes.mrcs")
    np.testing.assert_allclose(refs, mrcfile.read(root / f"{PREFIX}_classes.mrcs"), atol=1e-6)
    assert (root / "refine" / "run_it001_model.star").is_file()


def test_class2d_needs_classes_and_a_prefix(project, tmp_path):
    root, _ = project
    base = [
        "embed",
        str(root / "run"),
        str(root / "particles.star"),
        "-o",
        str(tmp_path / "e.star"),
    ]
    for extra, message in [
        (["--class2d", str(tmp_path / "c")], "needs --classes"),
        (["--classes", "2", "--class2d", str(tmp_path)], "is a folder"),
    ]:
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 2 and message in r.stderr, r.output
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_written_when_embeds_other_files_fail(project, tmp_path, monkeypatch):
    root, _ = project

    def broken(*a, **k):
        raise UserError("disk full")

    monkeypatch.setattr("tvae_em.embed.write_outputs", broken)
    opts = EmbedOptions(
        root / "run",
        root / "particles.star",
        tmp_path / "e.star",
        classes=2,
        class2d=tmp_path / "c",
    )
    with pytest.raises(UserError):
        embed_particles(opts)
    assert list(tmp_path.iterdir()) == []


def test_select_reads_the_data_star(project, tmp_path, monkeypatch):
    root, _ = project
    monkeypatch.chdir(root)  # its image names are from the project folder, as RELION's
    data = _blocks(root, "data.star")["particles"]
    s = select_particles(
        SelectOptions(root / f"{PREFIX}_data.star", tmp_path / "s.star", classes="2")
    )
    assert s.kept == (data["rlnClassNumber"] == 2).sum() == s.per_class[2][0]
