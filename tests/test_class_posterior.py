"""The class posterior of `embed --classes K --classify templates` in the outputs: its columns
follow the classes' numbering by size, and it is what the star (rlnMaxValueProbDistribution), the
npz (class_log_post), the .cs (alignments2D/class_posterior, class_ess, read with cryosparc-tools)
and the Class2D _data.star (read back with starfile and the real relion_star_handler) carry."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import starfile
from conftest import make_run_folder, write_particle_set

from tvae_em.clustering import class_probabilities, soft_classes
from tvae_em.embed import EmbedOptions, embed_particles, numbered_classes
from tvae_em.errors import UserError
from tvae_em.export import CLASS_PROBABILITY, alignments2d_fields, embedding_columns
from tvae_em.generate import GenerateOptions, generate_figures
from tvae_em.inference import Embedding, TemplateClasses
from tvae_em.select import SelectOptions, select_particles
from tvae_em.synthetic import glyphs

BOX, N, K = 16, 30, 3
PREFIX = "Class2D/run_it000"


def _hand_probabilities(log_post: np.ndarray, labels: np.ndarray) -> tuple:
    """Own-class probability and 1 / sum_k p_k^2, written out from the definition."""
    p = np.exp(log_post - log_post.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    own = np.array([p[i, c - 1] for i, c in enumerate(labels)])
    return own, np.array([1.0 / sum(q * q for q in row) for row in p])


def _embedding(n: int, labels=None, log_post=None) -> Embedding:
    rng = np.random.default_rng(1)
    emb = Embedding.empty(n, 2)
    emb.z_mu[:] = rng.normal(size=(n, 2))
    emb.z_sd[:] = 0.1
    emb.confidence[:] = rng.uniform(0.2, 1.0, n)
    emb.apix, emb.box = np.full(n, 2.0), BOX
    emb.labels, emb.class_log_post = labels, log_post
    return emb


def _sized_classes() -> TemplateClasses:
    """7 particles, 0-based classes 0 x2, 1 x1, 2 x4: by size, old 2 -> 1, old 0 -> 2, old 1 -> 3.
    Each row's best column is its class; the values differ so a column can be told apart."""
    old = np.array([2, 0, 2, 1, 2, 0, 2])
    rng = np.random.default_rng(0)
    scores = rng.uniform(-30.0, -20.0, (7, 3))
    scores[np.arange(7), old] = rng.uniform(-10.0, -5.0, 7)
    log_post = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    return TemplateClasses(old, np.zeros(7), np.zeros((7, 2)), log_post)


def test_posterior_columns_follow_the_numbering_by_size():
    found = _sized_classes()
    labels, log_post = numbered_classes(found, 3)
    np.testing.assert_array_equal(labels, [1, 2, 1, 3, 1, 2, 1])
    for new, old in [(1, 2), (2, 0), (3, 1)]:  # column new - 1 is old class `old`
        np.testing.assert_array_equal(log_post[:, new - 1], found.log_post[:, old])
    rows = np.arange(7)
    np.testing.assert_array_equal(log_post[rows, labels - 1], log_post.max(1))
    np.testing.assert_array_equal(log_post.argmax(1) + 1, labels)  # its own class is its best
    # what is written: each particle's posterior is the largest of its row, its own class's
    emb = _embedding(7, labels, log_post)
    written = embedding_columns(emb)[CLASS_PROBABILITY].to_numpy()
    p = np.exp(log_post)
    np.testing.assert_allclose(written, p.max(1) / p.sum(1), rtol=1e-12)
    cs = alignments2d_fields(emb, emb.apix)
    np.testing.assert_array_equal(cs["alignments2D/class"], labels - 1)
    np.testing.assert_allclose(cs["alignments2D/class_posterior"], written, rtol=1e-6)


def test_class_probabilities_by_hand():
    own, ess = class_probabilities(
        np.log([[1.0, 3.0], [1.0, 1.0], [1.0, 1.0]]) + [[0, 0], [0, 0], [0, -np.inf]],
        np.array([2, 1, 1]),
    )
    np.testing.assert_allclose(own, [0.75, 0.5, 1.0])
    np.testing.assert_allclose(ess, [1 / (0.25**2 + 0.75**2), 2.0, 1.0])  # -inf: impossible
    rng = np.random.default_rng(2)
    log_post, labels = rng.normal(0, 3, (50, 4)), rng.integers(1, 5, 50)
    ours, hand = class_probabilities(log_post, labels), _hand_probabilities(log_post, labels)
    for a, b in zip(ours, hand, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_without_a_posterior_the_soft_reading_of_z_is_kept():
    labels = np.array([1, 2, 1, 2, 2, 1])
    emb = _embedding(6, labels)
    cs = alignments2d_fields(emb, emb.apix)
    own, ess = soft_classes(emb.z_mu, emb.z_sd, labels)
    np.testing.assert_allclose(cs["alignments2D/class_posterior"], own, rtol=1e-6)
    np.testing.assert_allclose(cs["alignments2D/class_ess"], ess, rtol=1e-6)
    assert CLASS_PROBABILITY not in embedding_columns(emb)
    assert "class_log_post" not in emb.npz_arrays()


def test_npz_keeps_the_posterior_and_refuses_a_wrong_shape(tmp_path):
    labels, log_post = numbered_classes(_sized_classes(), 3)
    _embedding(7, labels, log_post).save_npz(tmp_path / "e.npz")
    back = Embedding.load_npz(tmp_path / "e.npz", 2)
    np.testing.assert_array_equal(back.class_log_post, log_post)
    np.testing.assert_array_equal(back.labels, labels)
    _embedding(7, labels, log_post[:, :2]).save_npz(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="class_log_post has shape"):
        Embedding.load_npz(tmp_path / "bad.npz", 2)


# ---- end to end: embed --classes K (templates) --cs --class2d, from a project folder -----------
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("classpost")
    images, _ = glyphs(N, box=BOX, seed=3, n_classes=K, t_sd_px=1.5)
    rng = np.random.default_rng(0)
    defocus = {f"rlnDefocus{a}": rng.uniform(1e4, 2e4, N).round(1) for a in ("U", "V")}
    write_particle_set(root, images, 2.0, extra={**defocus, "rlnDefocusAngle": np.zeros(N)})
    make_run_folder(root / "run", BOX)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        embed_particles(
            EmbedOptions("run", "particles.star", "e.star", classes=K, cs_out="e.cs",
                         class2d=PREFIX, class_rounds=1)
        )  # fmt: skip
    npz = np.load(root / "e.npz")
    return root, npz["class_log_post"], npz["class"]


def test_star_and_npz_carry_the_posterior_of_the_class(project):
    root, log_post, labels = project
    p = starfile.read(root / "e.star", always_dict=True)["particles"]
    assert log_post.shape == (N, K)
    np.testing.assert_array_equal(labels, p["rlnClassNumber"])
    np.testing.assert_array_equal(log_post.argmax(1) + 1, labels)  # the posterior decided it
    own, _ = _hand_probabilities(log_post, labels)
    np.testing.assert_allclose(p[CLASS_PROBABILITY], own, rtol=1e-6)
    assert own.min() < 0.99  # not all certain: the column says something
    assert not np.allclose(p[CLASS_PROBABILITY], p["tvaePoseConfidence"])


def test_cs_class_fields_from_the_posterior_load_with_cryosparc_tools(project):
    dataset = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is not installed")
    root, log_post, labels = project
    cs = dataset.Dataset.load(str(root / "e.cs"))
    own, ess = _hand_probabilities(log_post, labels)
    np.testing.assert_array_equal(cs["alignments2D/class"], labels - 1)
    np.testing.assert_allclose(cs["alignments2D/class_posterior"], own, rtol=1e-6)
    np.testing.assert_allclose(cs["alignments2D/class_ess"], ess, rtol=1e-6)
    assert cs["alignments2D/class_posterior"].dtype == np.float32


def test_class2d_data_star_has_the_posterior_and_relion_selects_on_it(project):
    root, log_post, labels = project
    own, _ = _hand_probabilities(log_post, labels)
    data = starfile.read(root / f"{PREFIX}_data.star", always_dict=True)["particles"]
    np.testing.assert_allclose(data[CLASS_PROBABILITY], own, rtol=1e-6)
    general = starfile.read(root / f"{PREFIX}_model.star", always_dict=True)["model_general"]
    assert general["rlnAveragePmax"].iloc[0] == pytest.approx(own.mean(), rel=1e-6)
    if shutil.which("relion_star_handler") is None:
        pytest.skip("RELION 3.1 (relion_star_handler) is not installed")
    cut = float(np.median(own))
    out = subprocess.run(
        ["relion_star_handler", "--i", f"{PREFIX}_data.star", "--o", "sure.star",
         "--select", CLASS_PROBABILITY, "--minval", f"{cut:.6f}", "--maxval", "1.01"],
        cwd=root, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    kept = starfile.read(root / "sure.star", always_dict=True)["particles"]
    assert 0 < len(kept) < N and len(kept) == (own >= float(f"{cut:.6f}")).sum()


def test_select_min_confidence_is_the_pose_confidence(project, tmp_path, monkeypatch):
    """--min-confidence filters on tvaePoseConfidence, not on the class posterior; its .cs (from
    the npz) keeps the class posterior of the kept particles."""
    root, log_post, labels = project
    monkeypatch.chdir(root)
    p = starfile.read(root / "e.star", always_dict=True)["particles"]
    cut = float(np.median(p["tvaePoseConfidence"]))
    s = select_particles(
        SelectOptions("e.star", tmp_path / "s.star", min_confidence=cut, cs_out=tmp_path / "s.cs")
    )
    kept = (p["tvaePoseConfidence"] >= cut).to_numpy()
    assert s.kept == kept.sum() and not np.array_equal(kept, p[CLASS_PROBABILITY] >= cut)
    subset = starfile.read(tmp_path / "s.star", always_dict=True)["particles"]
    assert subset["rlnImageName"].tolist() == p["rlnImageName"][kept].tolist()
    own, ess = _hand_probabilities(log_post, labels)
    cs = np.load(tmp_path / "s.cs")
    np.testing.assert_allclose(cs["alignments2D/class_posterior"], own[kept], rtol=1e-6)
    np.testing.assert_allclose(cs["alignments2D/class_ess"], ess[kept], rtol=1e-6)


def test_generate_reclustering_drops_the_old_posterior(project, tmp_path, monkeypatch):
    root, _, _ = project
    monkeypatch.chdir(root)
    generate_figures(
        GenerateOptions("run", tmp_path, embedding="e.npz", particles="e.star", classes=2,
                        n_steps=2, n_recon=2)
    )  # fmt: skip
    p = starfile.read(tmp_path / "particle_classes.star", always_dict=True)["particles"]
    assert CLASS_PROBABILITY not in p and set(p["rlnClassNumber"]) <= {1, 2}


def test_select_original_carries_the_posterior_to_the_original_rows(project, tmp_path, monkeypatch):
    root, _, _ = project
    monkeypatch.chdir(root)
    select_particles(
        SelectOptions("e.star", tmp_path / "s.star", classes="1", original="particles.star")
    )
    p = starfile.read(root / "e.star", always_dict=True)["particles"]
    out = starfile.read(tmp_path / "s.star", always_dict=True)["particles"]
    kept = p["rlnClassNumber"] == 1
    np.testing.assert_allclose(out[CLASS_PROBABILITY], p[CLASS_PROBABILITY][kept], rtol=1e-8)
