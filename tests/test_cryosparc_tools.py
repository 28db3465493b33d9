"""Every .cs tvae-em writes, read by cryoSPARC's own reader (cryosparc-tools) and checked against
the files cryoSPARC itself wrote: field layout, values, and the round trip back into tvae-em.

empiar_10076_7.cs is cryoSPARC's import of empiar_10076_7.star (the same 7 particles), so the
.cs tvae-em writes from that star must carry the same blob/* and ctf/* values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner
from conftest import make_run_folder, write_particle_set
from scipy.spatial.transform import Rotation

from tvae_em.cli import main
from tvae_em.clustering import soft_classes
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.errors import UserError
from tvae_em.geometry import wrap_degrees
from tvae_em.io import ParticleStack, write_star
from tvae_em.io.cs import ALIGNMENTS2D_LAYOUT, CS_LAYOUT, particle_uids
from tvae_em.preprocess import preprocess_stack

dataset = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is not installed")
tools = pytest.importorskip("cryosparc.tools", reason="cryosparc-tools is not installed")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
REAL_CS = [
    "empiar_10076_7.cs",
    "cryosparc_P12_J24_001_particles.cs",
    "cryosparc_J2_particles_exported.cs",
]
# cryoSPARC's import of the star: fields whose values a .cs from the star must reproduce.
SAME_AS_CRYOSPARC = [
    "blob/idx",
    "blob/shape",
    "blob/psize_A",
    "blob/sign",
    "ctf/type",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/phase_shift_rad",
    "ctf/scale",
    "ctf/scale_const",
    "ctf/shift_A",
    "ctf/tilt_A",
    "ctf/trefoil_A",
    "ctf/tetra_A",
    "ctf/anisomag",
    "ctf/bfactor",
]


def load(path: Path):
    """The .cs as cryoSPARC reads it (raises DatasetLoadError if it cannot)."""
    return dataset.Dataset.load(str(path))


@needs_data
def test_our_field_layout_is_cryosparcs():
    """Each field tvae-em writes has the dtype and shape cryoSPARC gives it in its own files."""
    seen = set()
    for name in REAL_CS:
        arr = np.load(DATA / name)
        for field in arr.dtype.names:
            if field in CS_LAYOUT:
                base, shape = CS_LAYOUT[field]
                real = arr.dtype[field]
                assert real.shape == shape, (name, field)
                assert real.base.kind == "S" if base == "S" else real.base == np.dtype(base), field
                seen.add(field)
    assert set(ALIGNMENTS2D_LAYOUT) <= seen  # the whole 2D slot is checked
    assert seen == set(CS_LAYOUT)  # and every other field written
    two_d = [f for f in np.load(DATA / REAL_CS[2]).dtype.names if f.startswith("alignments2D/")]
    assert two_d == list(ALIGNMENTS2D_LAYOUT)  # same fields, same order


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """embed --cs from the real star and from cryoSPARC's .cs of the same particles."""
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    root = tmp_path_factory.mktemp("cstools")
    run = make_run_folder(root / "run", 320, encoder_kernel=9)
    out = {}
    for name in ("empiar_10076_7.star", "empiar_10076_7.cs"):
        kind = Path(name).suffix[1:]
        folder = root / kind
        embed_particles(
            EmbedOptions(
                run,
                DATA / name,
                folder / "e.star",
                cs_out=folder / "e.cs",
                classes=2,
                with_elbo=False,
            )
        )
        out[kind] = folder
    return out


def test_cs_from_a_star_is_what_cryosparc_imports(embedded):
    ours = load(embedded["star"] / "e.cs")
    theirs = load(DATA / "empiar_10076_7.cs")  # cryoSPARC's import of the same star
    assert len(ours) == 7
    assert set(theirs.fields()) <= set(ours.fields())  # every field cryoSPARC's import has
    for field in SAME_AS_CRYOSPARC:
        a, b = ours[field], theirs[field]
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7, err_msg=field)
        else:
            np.testing.assert_array_equal(a, b, err_msg=field)
    assert ours["uid"].dtype == np.uint64 and len(set(ours["uid"])) == 7
    star = starfile.read(DATA / "empiar_10076_7.star")
    np.testing.assert_array_equal(ours["uid"], particle_uids(star["rlnImageName"]))
    stack = ParticleStack.open(DATA / "empiar_10076_7.star")
    np.testing.assert_array_equal(
        ours["blob/import_sig"], tools.get_import_signatures(list(stack.stack_paths))
    )


def test_cs_from_a_star_reads_back_as_the_star(embedded):
    """star -> embed --cs -> ParticleStack.open(.cs): same images, pixel sizes and CTF."""
    star = ParticleStack.open(DATA / "empiar_10076_7.star")
    cs = ParticleStack.open(embedded["star"] / "e.cs")
    assert cs.kind == "cryosparc" and len(cs) == len(star)
    np.testing.assert_array_equal(cs.read(np.arange(7)), star.read(np.arange(7)))
    np.testing.assert_allclose(cs.apix, star.apix, rtol=1e-6)
    a, b = cs.ctf_params(), star.ctf_params()
    for key in vars(b):
        if getattr(b, key) is not None:
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-6, err_msg=key)


def test_cs_from_a_cs_keeps_every_field_verbatim(embedded):
    before, after = load(DATA / "empiar_10076_7.cs"), load(embedded["cs"] / "e.cs")
    np.testing.assert_array_equal(after["uid"], before["uid"])
    for field in before.fields():
        np.testing.assert_array_equal(after[field], before[field], err_msg=field)
    joined = before.innerjoin(after.filter_prefix("alignments2D"))  # cryoSPARC joins on uid
    assert len(joined) == 7 and "alignments2D/pose" in joined.fields()


@pytest.mark.parametrize("kind", ["star", "cs"])
def test_alignments2d_is_a_whole_2d_classification_slot(embedded, kind):
    cs = load(embedded[kind] / "e.cs")
    assert [f for f in cs.fields() if f.startswith("alignments2D/")] == list(ALIGNMENTS2D_LAYOUT)
    p = starfile.read(embedded[kind] / "e.star")["particles"]
    pose = cs["alignments2D/pose"]
    assert ((pose >= 0) & (pose < 2 * math.pi)).all()
    np.testing.assert_allclose(wrap_degrees(np.degrees(pose)), p["rlnAnglePsi"], atol=1e-3)
    psize = cs["alignments2D/psize_A"]
    np.testing.assert_allclose(psize, cs["blob/psize_A"])
    origin = cs["alignments2D/shift"] * psize[:, None]
    np.testing.assert_allclose(origin, p[["rlnOriginXAngst", "rlnOriginYAngst"]], atol=1e-3)
    np.testing.assert_array_equal(cs["alignments2D/class"], p["rlnClassNumber"] - 1)
    posterior, ess = cs["alignments2D/class_posterior"], cs["alignments2D/class_ess"]
    assert ((posterior >= 0.5 - 1e-6) & (posterior <= 1)).all()  # its own class is the likeliest
    assert ((ess >= 1 - 1e-6) & (ess <= 2 + 1e-6)).all() and (ess >= 1 / posterior - 1e-5).all()
    np.testing.assert_array_equal(cs["alignments2D/alpha"], 1.0)
    for field in ("split", "error", "cross_cor", "pose_ess", "shift_ess", "weight"):
        np.testing.assert_array_equal(cs[f"alignments2D/{field}"], 0, err_msg=field)


def _relion_rotation(psi_deg: np.ndarray) -> np.ndarray:
    """cryoDRGN's parse_pose_star rotation (utils.R_from_relion) for rot = tilt = 0."""
    c, s = np.cos(np.radians(psi_deg)), np.sin(np.radians(psi_deg))
    r = np.zeros((len(c), 3, 3))
    r[:, 0, 0], r[:, 0, 1], r[:, 1, 0], r[:, 1, 1], r[:, 2, 2] = c, s, -s, c, 1.0
    return r


def test_pose_and_shift_agree_with_cryodrgns_two_parsers(embedded):
    """cryoDRGN reads a .cs pose as expmap(pose)^T and a star psi as R_from_relion(0, 0, psi),
    and a .cs shift and a star origin (pixels) alike: our .cs and star give the same pose."""
    cs = load(embedded["star"] / "e.cs")
    p = starfile.read(embedded["star"] / "e.star")["particles"]
    rotvec = np.zeros((len(cs), 3))
    rotvec[:, 2] = cs["alignments2D/pose"]
    from_cs = np.transpose(Rotation.from_rotvec(rotvec).as_matrix(), (0, 2, 1))
    np.testing.assert_allclose(from_cs, _relion_rotation(p["rlnAnglePsi"].to_numpy()), atol=1e-5)
    flipped = _relion_rotation(-p["rlnAnglePsi"].to_numpy())  # the check can fail
    assert not np.allclose(from_cs, flipped, atol=1e-3)
    apix = cs["blob/psize_A"][:, None]
    np.testing.assert_allclose(
        cs["alignments2D/shift"], p[["rlnOriginXAngst", "rlnOriginYAngst"]] / apix, atol=1e-4
    )


@needs_data
def test_preprocess_cs_output_loads(tmp_path):
    summary = preprocess_stack(ParticleStack.open(DATA / "empiar_10076_7.cs"), tmp_path, size=64)
    cs = load(summary.cs)
    assert len(cs) == 7 and cs["uid"].dtype == np.uint64
    np.testing.assert_array_equal(cs["uid"], np.load(DATA / "empiar_10076_7.cs")["uid"])
    np.testing.assert_array_equal(cs["blob/shape"], 64)


def _defocus_star(folder: Path, n: int = 12, box: int = 16) -> Path:
    """A RELION 3.1 star with two optics groups and every per-particle CTF column."""
    rng = np.random.default_rng(4)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    star = write_particle_set(folder, images, 1.5)
    blocks = starfile.read(star, always_dict=True)
    optics = pd.concat([blocks["optics"]] * 2, ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
    optics["rlnVoltage"] = [300.0, 200.0]
    optics["rlnAmplitudeContrast"] = [0.1, 0.07]
    p = blocks["particles"]
    p["rlnOpticsGroup"] = np.arange(n) % 2 + 1
    p["rlnDefocusU"] = rng.uniform(8000, 30000, n)
    p["rlnDefocusV"] = p["rlnDefocusU"] - rng.uniform(0, 500, n)
    p["rlnDefocusAngle"] = rng.uniform(-180, 180, n)
    p["rlnPhaseShift"] = rng.uniform(0, 90, n)
    p["rlnCtfBfactor"] = rng.uniform(0, 50, n)
    p["rlnCtfScalefactor"] = rng.uniform(0.5, 1.0, n)
    write_star(star, {"optics": optics, "particles": p})
    return star


def test_every_ctf_column_round_trips_through_a_cs(tmp_path, make_run):
    star = _defocus_star(tmp_path / "in")
    run = make_run(16)
    embed_particles(EmbedOptions(run, star, tmp_path / "e.star", cs_out=tmp_path / "e.cs"))
    cs = load(tmp_path / "e.cs")
    p = starfile.read(star)["particles"]
    np.testing.assert_allclose(cs["ctf/df_angle_rad"], np.radians(p["rlnDefocusAngle"]), rtol=1e-6)
    np.testing.assert_allclose(cs["ctf/phase_shift_rad"], np.radians(p["rlnPhaseShift"]), rtol=1e-6)
    np.testing.assert_allclose(cs["ctf/scale"], p["rlnCtfScalefactor"], rtol=1e-6)
    np.testing.assert_allclose(cs["ctf/bfactor"], p["rlnCtfBfactor"], rtol=1e-6)
    np.testing.assert_array_equal(cs["ctf/exp_group_id"], p["rlnOpticsGroup"])
    np.testing.assert_allclose(cs["ctf/accel_kv"], np.where(p["rlnOpticsGroup"] == 1, 300, 200))
    np.testing.assert_array_equal(cs["alignments2D/class"], 0)  # no --classes: one class
    np.testing.assert_array_equal(cs["alignments2D/class_posterior"], 1.0)
    np.testing.assert_array_equal(cs["alignments2D/class_ess"], 1.0)
    back = ParticleStack.open(tmp_path / "e.cs")
    a, b = back.ctf_params(), ParticleStack.open(star).ctf_params()
    for key in ("dfu_A", "dfv_A", "dfang_deg", "phase_shift_deg", "bfactor", "volt_kv"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(back.particles["rlnCtfScalefactor"], p["rlnCtfScalefactor"], 1e-6)
    _, optics = back.relion31_tables()
    assert len(optics) == 2  # one optics group per exposure group, as read


def test_cs_refused_without_defocus(tmp_path, make_run):
    """A bare stack or a star without defocus: no .cs (cryoSPARC needs ctf/*), a one-line error."""
    images = np.zeros((4, 16, 16), np.float32)
    star = write_particle_set(tmp_path / "in", images, 2.0)
    run = make_run(16)
    for source in (star, star.with_suffix(".mrcs")):
        out = tmp_path / f"out_{source.suffix[1:]}"
        args = [
            "embed",
            str(run),
            str(source),
            "-o",
            str(out / "e.star"),
            "--cs",
            str(out / "e.cs"),
        ]
        res = CliRunner().invoke(main, [*args, "--input-apix", "2.0"])
        assert res.exit_code == 2, res.output
        assert "--cs" in res.output and "no defocus" in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not out.exists() or not any(out.iterdir())


def test_cs_refused_for_phase_flipped_images(tmp_path, make_run):
    """cryoSPARC would correct the CTF of phase-flipped images again: no .cs, the fix named."""
    extra = {"rlnDefocusU": np.full(4, 1e4), "tvaePhaseFlipped": np.ones(4, np.int64)}
    star = write_particle_set(tmp_path / "in", np.zeros((4, 16, 16)), 2.0, extra=extra)
    opts = EmbedOptions(make_run(16), star, tmp_path / "e.star", cs_out=tmp_path / "e.cs")
    with pytest.raises(UserError, match=r"--cs: the images of .*phase-flipped.*--original"):
        embed_particles(opts)
    assert not list(tmp_path.glob("e.*"))


def test_soft_classes_read_k_means_softly():
    """Points deep in a class are certain of it; one midway between two is split half and half."""
    rng = np.random.default_rng(1)
    blobs = [rng.normal(0, 0.3, (20, 2)) + [-4, 0], rng.normal(0, 0.3, (20, 2)) + [4, 0]]
    z = np.concatenate([*blobs, [[0.0, 0.5], [0.0, -0.5]]])  # two points midway, one per class
    labels = np.r_[np.ones(20), np.full(20, 2), 1, 2].astype(np.int64)
    own, ess = soft_classes(z, np.full_like(z, 0.1), labels)
    assert (own[:40] > 0.999).all() and (ess[:40] < 1.001).all()
    np.testing.assert_allclose(own[40:], 0.5, atol=0.1)
    np.testing.assert_allclose(ess[40:], 2.0, atol=0.1)
    wide, _ = soft_classes(z, np.full_like(z, 4.0), labels)  # an uncertain z is less certain
    assert (wide[:40] < own[:40]).all() and (wide[:40] > 0.5).all()
    one, one_ess = soft_classes(z, np.zeros_like(z), np.ones(len(z), np.int64))
    np.testing.assert_array_equal(one, 1.0)
    np.testing.assert_array_equal(one_ess, 1.0)
