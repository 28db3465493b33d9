"""`tvae-em embed` plumbing with tiny untrained models: columns kept, units, npz, .cs, bad input.

The pose convention itself is tested end to end in test_relion_roundtrip.py.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner
from conftest import TINY_MODEL, make_run_folder, write_particle_set

from tvae_em.cli import main
from tvae_em.clustering import assign_classes
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.errors import UserError
from tvae_em.export import match_rows
from tvae_em.geometry import wrap_degrees
from tvae_em.io import write_stack, write_star
from tvae_em.io.cs import particle_uids
from tvae_em.synthetic import glyphs

BOX, N = 16, 30
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
OUR_RLN = ["rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber"]
OPTICS_NEEDED = [
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
]


def _two_group_star(folder: Path, images: np.ndarray) -> Path:
    """A RELION 3.1 star in two optics groups (2.0 and 2.5 A) with old pose/class columns."""
    folder.mkdir(parents=True, exist_ok=True)
    write_stack(folder / "p.mrcs", [images], len(images), BOX, 2.0)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["g1", "g2"],
            "rlnAmplitudeContrast": [0.1, 0.07],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnVoltage": [300.0, 200.0],
            "rlnImagePixelSize": [2.0, 2.5],
            "rlnImageSize": [BOX, BOX],
            "rlnImageDimensionality": [2, 2],
        }
    )
    n = len(images)
    rng = np.random.default_rng(0)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)],
            "rlnMicrographName": [f"mics/m{i % 3:02d}.mrc" for i in range(n)],
            "rlnCoordinateX": rng.uniform(0, 4000, n).round(1),
            "rlnCoordinateY": rng.uniform(0, 4000, n).round(1),
            "rlnOpticsGroup": np.arange(n) % 2 + 1,
            "rlnDefocusU": rng.uniform(10000, 30000, n).round(1),
            "rlnDefocusV": rng.uniform(10000, 30000, n).round(1),
            "rlnDefocusAngle": rng.uniform(-180, 180, n).round(2),
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAnglePsi": np.zeros(n),
            "rlnOriginXAngst": np.full(n, 99.0),
            "rlnOriginYAngst": np.full(n, 99.0),
            "rlnClassNumber": np.full(n, 7),
            "rlnGroupName": ["01"] * n,
            "tvaeZ1": np.full(n, 5.0),
        }
    )
    star = folder / "p.star"
    write_star(star, {"optics": optics, "particles": particles})
    return star


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    images, truth = glyphs(N, box=BOX, seed=3, n_classes=3, t_sd_px=1.0)
    star = _two_group_star(root / "in", images)
    run = make_run_folder(root / "run", BOX, norm=(0.2, 0.4))
    out = root / "out"
    calls = {}

    @contextlib.contextmanager
    def record(total, description):
        calls[description] = [total]
        yield calls[description].append

    embed_particles(
        EmbedOptions(
            run,
            star,
            out / "e.star",
            classes=3,
            cs_out=out / "e.cs",
            batch_size=8,
        ),
        progress=record,
    )
    return {"root": root, "star": star, "run": run, "out": out, "calls": calls, "images": images}


def _read(star: Path) -> dict[str, pd.DataFrame]:
    return starfile.read(star, always_dict=True, parse_as_string=["rlnGroupName", "rlnImageName"])


def test_star_keeps_every_input_column_and_optics_group(data):
    text = (data["out"] / "e.star").read_text()
    assert text.startswith("# version 30001\n")
    before, after = _read(data["star"]), _read(data["out"] / "e.star")
    pd.testing.assert_frame_equal(after["optics"], before["optics"], check_dtype=False)
    p0, p1 = before["particles"], after["particles"]
    assert set(p0.columns) <= set(p1.columns)
    replaced = set(OUR_RLN) | {"tvaeZ1"}
    for col in sorted(set(p0.columns) - replaced - {"rlnImageName"}):
        pd.testing.assert_series_equal(p1[col], p0[col], check_dtype=False)
    folder = f"@{data['star'].parent}/"  # not under the working directory: absolute
    assert (p1["rlnImageName"] == p0["rlnImageName"].str.replace("@", folder)).all()
    assert not np.allclose(p1["rlnOriginXAngst"], 99.0) and (p1["rlnClassNumber"] != 7).all()
    assert not np.allclose(p1["tvaeZ1"], 5.0)


def test_new_columns_have_documented_units(data):
    p = _read(data["out"] / "e.star")["particles"]
    z = np.load(data["out"] / "e.npz")
    psi = p["rlnAnglePsi"].to_numpy()
    assert ((psi > -180) & (psi <= 180)).all()
    np.testing.assert_allclose(psi, wrap_degrees(-np.degrees(z["theta_rad"])), atol=1e-6)
    apix = np.where(p["rlnOpticsGroup"] == 1, 2.0, 2.5)  # each particle's own group
    np.testing.assert_allclose(p["rlnOriginXAngst"], -z["shift_px"][:, 0] * apix, atol=1e-6)
    np.testing.assert_allclose(p["rlnOriginYAngst"], -z["shift_px"][:, 1] * apix, atol=1e-6)
    # re-centred (--recentre class): shift = t + R(theta) c with one centre c per class
    th, c = z["theta_rad"], z["centre_px"]
    rc = np.stack(
        [np.cos(th) * c[:, 0] - np.sin(th) * c[:, 1], np.sin(th) * c[:, 0] + np.cos(th) * c[:, 1]],
        1,
    )
    np.testing.assert_allclose(z["shift_px"], z["t_px"] + rc, atol=1e-9)
    classes = p["rlnClassNumber"].to_numpy()
    for k in set(classes):
        assert np.ptp(c[classes == k], axis=0).max() < 1e-9
    assert set(classes) <= {1, 2, 3} and pd.api.types.is_integer_dtype(p["rlnClassNumber"])
    sizes = np.bincount(classes, minlength=4)[1:]
    assert (np.diff(sizes) <= 0).all()  # class 1 is the largest
    for col in ["tvaeZ1", "tvaeZ2", "tvaeZsd1", "tvaeZsd2", "tvaePoseConfidence", "tvaeElbo"]:
        assert np.isfinite(p[col]).all(), col
    assert (p["tvaeZsd1"] > 0).all()
    assert ((p["tvaePoseConfidence"] > 0) & (p["tvaePoseConfidence"] <= 1)).all()


def test_npz_matches_star(data):
    p = _read(data["out"] / "e.star")["particles"]
    z = np.load(data["out"] / "e.npz")
    keys = {"z_mu", "z_sd", "theta_rad", "psi_deg", "t_px", "origin_A", "confidence", "elbo"}
    assert keys | {"class", "indices", "apix", "box"} <= set(z.files)
    assert z["z_mu"].shape == z["z_sd"].shape == (N, 2) and z["t_px"].shape == (N, 2)
    np.testing.assert_array_equal(z["indices"], np.arange(N))
    np.testing.assert_array_equal(z["class"], p["rlnClassNumber"])
    np.testing.assert_allclose(z["psi_deg"], p["rlnAnglePsi"], atol=1e-6)
    np.testing.assert_allclose(z["origin_A"][:, 0], p["rlnOriginXAngst"], atol=1e-6)
    np.testing.assert_allclose(z["z_mu"][:, 1], p["tvaeZ2"], atol=1e-6)
    np.testing.assert_allclose(z["elbo"], p["tvaeElbo"], rtol=1e-6)
    assert int(z["box"]) == BOX


def test_cs_from_a_star_input(data):
    cs = np.load(data["out"] / "e.cs")
    p = _read(data["out"] / "e.star")["particles"]
    assert cs.dtype["alignments2D/shift"].shape == (2,)
    names = _read(data["star"])["particles"]["rlnImageName"]  # as read: the uid is stable
    np.testing.assert_array_equal(cs["uid"], particle_uids(names))
    np.testing.assert_array_equal(cs["alignments2D/class"], p["rlnClassNumber"] - 1)
    psi = wrap_degrees(np.degrees(cs["alignments2D/pose"]))
    np.testing.assert_allclose(psi, p["rlnAnglePsi"], atol=1e-3)
    psize = cs["alignments2D/psize_A"]
    np.testing.assert_allclose(psize, np.where(p["rlnOpticsGroup"] == 1, 2.0, 2.5))
    np.testing.assert_allclose(
        cs["alignments2D/shift"][:, 1] * psize, p["rlnOriginYAngst"], atol=1e-4
    )


def test_progress_gets_total_then_counts(data):
    # --classes: the template pass and two rounds against the class averages too, then the
    # split-and-merge moves tried (each an E-step; a kept one a settling round)
    base = {"embed", "classify", "classify, round 2", "classify, round 3"}
    assert base <= set(data["calls"])
    for label in set(data["calls"]) - base:
        assert re.fullmatch(r"classify, (after )?split \d", label), label
    for calls in data["calls"].values():
        assert calls[0] == N and sum(calls[1:]) == N and max(calls[1:]) == 8


def test_results_do_not_depend_on_batching(data, tmp_path):
    embed_particles(EmbedOptions(data["run"], data["star"], tmp_path / "a.star", batch_size=N))
    embed_particles(EmbedOptions(data["run"], data["star"], tmp_path / "b.star", batch_size=N))
    embed_particles(EmbedOptions(data["run"], data["star"], tmp_path / "c.star", batch_size=3))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "c.npz")
    for key in ("z_mu", "z_sd", "confidence"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
    # refined poses: float32 sums in another order, through sub-step interpolation
    np.testing.assert_allclose(a["t_px"], b["t_px"], atol=1e-3)
    np.testing.assert_allclose(np.cos(a["theta_rad"] - b["theta_rad"]), 1.0, atol=1e-6)
    assert (tmp_path / "a.star").read_bytes() == (tmp_path / "b.star").read_bytes()  # seeded ELBO


def test_no_elbo_and_npz_path(data, tmp_path):
    embed_particles(
        EmbedOptions(
            data["run"],
            data["star"],
            tmp_path / "x.star",
            with_elbo=False,
            npz_out=tmp_path / "sub" / "arrays.npz",
        )
    )
    p = _read(tmp_path / "x.star")["particles"]
    assert "tvaeElbo" not in p and "rlnClassNumber" in p  # the input's classes are kept
    assert np.isnan(np.load(tmp_path / "sub" / "arrays.npz")["elbo"]).all()


def test_ctf_run_uses_each_particles_ctf_for_the_elbo(tmp_path):
    images, _ = glyphs(12, box=BOX, seed=1)
    defocus = {
        "rlnDefocusU": np.full(12, 15000.0),
        "rlnDefocusV": np.full(12, 14000.0),
        "rlnDefocusAngle": np.zeros(12),
    }
    star = write_particle_set(tmp_path / "d", images, 2.0, extra=defocus)
    plain = write_particle_set(tmp_path / "p", images, 2.0)
    run_ctf = make_run_folder(tmp_path / "rc", BOX, ctf=True)
    run_plain = make_run_folder(tmp_path / "rp", BOX, ctf=False)  # same weights (seeded)
    embed_particles(EmbedOptions(run_ctf, star, tmp_path / "c.star"))
    embed_particles(EmbedOptions(run_plain, star, tmp_path / "n.star"))
    c, n = np.load(tmp_path / "c.npz"), np.load(tmp_path / "n.npz")
    np.testing.assert_allclose(c["z_mu"], n["z_mu"], atol=1e-6)  # the pose does not use the CTF
    assert np.abs(c["elbo"] - n["elbo"]).max() > 1e-3
    with pytest.raises(UserError, match="trained with the CTF"):
        embed_particles(EmbedOptions(run_ctf, plain, tmp_path / "bad.star"))
    assert not (tmp_path / "bad.star").exists()


def test_relion30_input_is_written_as_31(tmp_path):
    images, _ = glyphs(10, box=BOX, seed=2)
    folder = tmp_path / "in"
    folder.mkdir()
    write_stack(folder / "s.mrcs", [images], 10, BOX, 0.0)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1}@s.mrcs" for i in range(10)],
            "rlnDetectorPixelSize": 5.0,
            "rlnMagnification": 25000.0,  # 5 um * 1e4 / 25000 = 2 A
            "rlnVoltage": 300.0,
            "rlnOriginX": np.full(10, 3.0),
            "rlnOriginY": np.full(10, 3.0),
        }
    )
    write_star(folder / "s.star", {"images": particles})
    run = make_run_folder(tmp_path / "run", BOX)
    embed_particles(EmbedOptions(run, folder / "s.star", tmp_path / "o.star"))
    out = _read(tmp_path / "o.star")
    assert out["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(2.0)
    p = out["particles"]
    assert "rlnOriginX" not in p and "rlnOriginY" not in p
    z = np.load(tmp_path / "o.npz")
    np.testing.assert_allclose(p["rlnOriginXAngst"], -z["shift_px"][:, 0] * 2.0, atol=1e-6)


def test_original_rows_matched_after_skipped_particles(data, tmp_path):
    """preprocess --skip-bad drops rows: original rows are found by micrograph + coordinates."""
    full = _read(data["star"])
    keep = np.setdiff1d(np.arange(N), [3, 17])
    sub = full["particles"].iloc[keep].reset_index(drop=True)
    folder = data["star"].parent
    write_star(folder / "sub.star", {"optics": full["optics"], "particles": sub})
    embed_particles(
        EmbedOptions(
            data["run"],
            folder / "sub.star",
            tmp_path / "s.star",
            original=data["star"],
            cs_out=tmp_path / "s.cs",
        )
    )
    o = _read(tmp_path / "s_original.star")["particles"]
    np.testing.assert_allclose(o["rlnCoordinateX"], sub["rlnCoordinateX"])
    uids = particle_uids(full["particles"]["rlnImageName"])  # the rows of the original star
    np.testing.assert_array_equal(np.load(tmp_path / "s.cs")["uid"], uids[keep])


def test_match_rows_refuses_unmatchable():
    a = pd.DataFrame({"x": np.arange(5)})
    with pytest.raises(UserError, match="cannot match"):
        match_rows(a, a.iloc[:3], "orig.star", "prep.star")
    np.testing.assert_array_equal(match_rows(a, a, "o", "p"), np.arange(5))


def test_assign_classes_is_seeded_and_sorted():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 0.1, (5, 2)), rng.normal(4, 0.1, (20, 2))])
    labels = assign_classes(z, 2)
    assert (labels[5:] == 1).all() and (labels[:5] == 2).all()
    np.testing.assert_array_equal(labels, assign_classes(z, 2))


@pytest.mark.skipif(not (REAL / "relion31.star").exists(), reason="shared test data absent")
def test_real_relion31_star_keeps_everything(tmp_path):
    """On cryoDRGN's relion31.star (box 256): all columns kept, our names are RELION's own."""
    run = make_run_folder(tmp_path / "run", 256, encoder_kernel=9)
    embed_particles(EmbedOptions(run, REAL / "relion31.star", tmp_path / "r.star", classes=2))
    before, after = _read(REAL / "relion31.star"), _read(tmp_path / "r.star")
    assert set(OUR_RLN) <= set(before["particles"].columns)  # names as RELION writes them
    assert set(OPTICS_NEEDED) <= set(before["optics"].columns) & set(after["optics"].columns)
    pd.testing.assert_frame_equal(after["optics"], before["optics"], check_dtype=False)
    p0, p1 = before["particles"], after["particles"]
    ours = [*OUR_RLN, "rlnMaxValueProbDistribution"]  # RELION's, replaced by the class posterior
    assert set(ours) <= set(p0.columns)
    kept = [c for c in p0.columns if c not in ours]
    assert list(p1.columns[: len(kept)]) == kept
    assert (
        (p1["rlnMaxValueProbDistribution"] >= 0.5) & (p1["rlnMaxValueProbDistribution"] <= 1)
    ).all()
    for col in ("rlnDefocusU", "rlnAngleRot", "rlnMicrographName", "rlnCoordinateX"):
        pd.testing.assert_series_equal(p1[col], p0[col], check_dtype=False)
    assert p1["rlnImageName"].str.endswith("relion31.mrcs").all()
    assert pd.api.types.is_integer_dtype(p1["rlnClassNumber"])
    assert pd.api.types.is_integer_dtype(p0["rlnClassNumber"])


@pytest.mark.skipif(not (REAL / "empiar_10076_7.cs").exists(), reason="shared test data absent")
def test_real_cs_input_keeps_uid_and_blob_fields(tmp_path):
    run = make_run_folder(tmp_path / "run", 320, encoder_kernel=9)
    embed_particles(
        EmbedOptions(
            run,
            REAL / "empiar_10076_7.cs",
            tmp_path / "c.star",
            cs_out=tmp_path / "c.cs",
            with_elbo=False,
            classes=2,
        )
    )
    before, after = np.load(REAL / "empiar_10076_7.cs"), np.load(tmp_path / "c.cs")
    np.testing.assert_array_equal(after["uid"], before["uid"])
    for name in before.dtype.names:
        assert name in after.dtype.names, name
        if not name.startswith("alignments2D/"):
            np.testing.assert_array_equal(after[name], before[name])
    assert set(after["alignments2D/class"]) <= {0, 1}
    star = _read(tmp_path / "c.star")["particles"]
    np.testing.assert_allclose(
        after["alignments2D/shift"][:, 0] * after["alignments2D/psize_A"],
        star["rlnOriginXAngst"],
        atol=1e-4,
    )


def test_trained_run_folder_embeds(tmp_path):
    """A run folder written by train() itself (not the test payload) loads and embeds."""
    from tvae_em.training import TrainOptions, train

    images, _ = glyphs(24, box=BOX, seed=4)
    star = write_particle_set(tmp_path / "d", images, 2.0)
    opts = TrainOptions(
        input=str(star),
        out_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=12,
        model_overrides=dict(TINY_MODEL),
    )
    train(opts, log=lambda m: None)
    s = embed_particles(EmbedOptions(tmp_path / "run", star, tmp_path / "e.star", classes=2))
    assert s.n == 24 and np.isfinite(np.load(tmp_path / "e.npz")["elbo"]).all()


# ---------------------------------------------------------------- bad input through the CLI


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_checkpoint", "no checkpoint"),
        ("box", "tvae-em preprocess"),
        ("unwritable", "-o"),
        ("classes0", "--classes 0"),
        ("classes_many", "--classes 31"),
        ("suffix", "must end in .star"),
        ("overwrite_input", "would overwrite"),
        ("missing_input", "not found"),
        ("original_count", "--original"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(data, tmp_path, case, message):
    run, star = data["run"], data["star"]
    out = tmp_path / "out"
    args = [str(run), str(star), "-o", str(out / "e.star")]
    if case == "no_checkpoint":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case == "box":
        args[0] = str(make_run_folder(tmp_path / "run24", 24))
    elif case == "unwritable":
        (tmp_path / "afile").write_text("")
        args[3] = str(tmp_path / "afile" / "e.star")
    elif case == "classes0":
        args += ["--classes", "0"]
    elif case == "classes_many":
        args += ["--classes", "31"]
    elif case == "suffix":
        args[3] = str(out / "e.txt")
    elif case == "overwrite_input":
        args[3] = str(star)
    elif case == "missing_input":
        args[1] = str(tmp_path / "nope.star")
    elif case == "original_count":
        images, _ = glyphs(5, box=BOX)
        args += ["--original", str(write_particle_set(tmp_path / "o", images, 2.0))]
    before = _files(star.parent)
    r = CliRunner().invoke(main, ["embed", *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], r.stderr
    assert _files(out) == [] and _files(star.parent) == before


def test_cli_embed_help_and_run(data, tmp_path):
    r = CliRunner().invoke(main, ["embed", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--original" in r.output
    r = CliRunner().invoke(
        main,
        [
            "embed",
            str(data["run"]),
            str(data["star"]),
            "-o",
            str(tmp_path / "c.star"),
            "--classes",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"embedded {N} particles" in r.stdout and "particles/s" in r.stdout
    assert set(_read(tmp_path / "c.star")["particles"]["rlnClassNumber"]) <= {1, 2}
