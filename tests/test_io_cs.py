"""cryoSPARC .cs tables: parsing real files, round trips, RELION conversion, ParticleStack."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from tvae_em.errors import UserError
from tvae_em.io import (
    ParticleStack,
    cs_to_dataframe,
    cs_to_relion31,
    dataframe_to_cs,
    read_cs,
    write_cs,
)
from tvae_em.io.cs import cs_array, particle_uids, relion31_to_cs, sha1_uint64

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
REAL_CS = {
    "empiar_10076_7.cs": 7,
    "cryosparc_P12_J24_001_particles.cs": 2019,
    "cryosparc_J2_particles_exported.cs": 22,
}


def assert_same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype.names == b.dtype.names
    for name in a.dtype.names:
        assert a.dtype[name] == b.dtype[name], name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@needs_data
@pytest.mark.parametrize("name", sorted(REAL_CS))
def test_real_cs_round_trip_keeps_every_field(name, tmp_path):
    arr = read_cs(DATA / name)
    assert len(arr) == REAL_CS[name]
    df = cs_to_dataframe(arr)
    n_columns = sum(int(np.prod(arr.dtype[f].shape)) for f in arr.dtype.names)
    assert df.shape == (len(arr), n_columns)
    assert df["uid"].dtype == np.uint64 and (df["uid"].to_numpy() == arr["uid"]).all()
    assert_same_array(dataframe_to_cs(df, arr.dtype), arr)
    inferred = dataframe_to_cs(df)  # without the template: same values, same field shapes
    for field in arr.dtype.names:
        np.testing.assert_array_equal(inferred[field], arr[field], err_msg=field)
    write_cs(tmp_path / "out.cs", df.assign(tvaeZ0=np.arange(len(df), dtype=np.float32)), arr.dtype)
    back = np.load(tmp_path / "out.cs")
    assert back.dtype.names == (*arr.dtype.names, "tvaeZ0")
    np.testing.assert_array_equal(back["uid"], arr["uid"])
    np.testing.assert_array_equal(back["tvaeZ0"], np.arange(len(df)))


@needs_data
def test_cs_to_relion_follows_pyem():
    arr = read_cs(DATA / "cryosparc_J2_particles_exported.cs")
    df = cs_to_dataframe(arr)
    apix = arr["blob/psize_A"].astype(np.float64)
    particles, optics = cs_to_relion31(df, apix, 300)
    path = arr["blob/path"][0].decode().removeprefix(">")
    assert particles["rlnImageName"].iloc[1] == f"{arr['blob/idx'][1] + 1:06d}@{path}"
    np.testing.assert_allclose(particles["rlnDefocusU"], arr["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(particles["rlnDefocusV"], arr["ctf/df2_A"], rtol=1e-6)
    np.testing.assert_allclose(
        particles["rlnDefocusAngle"], np.degrees(arr["ctf/df_angle_rad"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        particles["rlnAnglePsi"], np.degrees(arr["alignments2D/pose"]), rtol=1e-6
    )
    shift_A = arr["alignments2D/shift"] * arr["alignments2D/psize_A"][:, None]
    np.testing.assert_allclose(
        particles[["rlnOriginXAngst", "rlnOriginYAngst"]], shift_A, rtol=1e-6
    )
    np.testing.assert_array_equal(particles["rlnClassNumber"], arr["alignments2D/class"] + 1)
    assert len(optics) == 1
    row = optics.iloc[0]
    assert row["rlnVoltage"] == pytest.approx(300) and row[
        "rlnSphericalAberration"
    ] == pytest.approx(2.7)
    assert row["rlnAmplitudeContrast"] == pytest.approx(0.1) and row["rlnImageSize"] == 300
    assert row["rlnImagePixelSize"] == pytest.approx(1.345, rel=1e-6)


@needs_data
def test_empiar_cs_reads_the_same_images_as_the_star():
    from_cs = ParticleStack.open(DATA / "empiar_10076_7.cs")
    from_star = ParticleStack.open(DATA / "empiar_10076_7.star")
    assert from_cs.kind == "cryosparc" and len(from_cs) == 7
    np.testing.assert_array_equal(from_cs.read([6, 0]), from_star.read([6, 0]))
    np.testing.assert_allclose(from_cs.apix, from_star.apix, rtol=1e-6)
    assert "uid" in from_cs.particles and "ctf/df1_A" in from_cs.particles
    particles, optics = from_cs.relion31_tables()
    np.testing.assert_allclose(
        particles["rlnDefocusU"], from_star.particles["rlnDefocusU"], rtol=1e-6
    )
    assert all("/" not in c for c in particles.columns) and "uid" not in particles
    assert optics["rlnVoltage"].iloc[0] == pytest.approx(300)


def _toy_cs(tmp_path: Path, blob_path: str, n: int = 3, box: int = 6) -> Path:
    dtype = [
        ("uid", "<u8"),
        ("blob/path", f"S{len(blob_path)}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
    ]
    arr = np.zeros(n, dtype=dtype)
    arr["uid"] = np.arange(n, dtype=np.uint64) + 2**63
    arr["blob/path"] = blob_path.encode()
    arr["blob/idx"] = np.arange(n)[::-1]
    arr["blob/shape"] = box
    arr["blob/psize_A"] = 2.5
    (tmp_path / "J3").mkdir(exist_ok=True)
    path = tmp_path / "J3" / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, arr)
    return path


def test_cs_paths_with_marker_relative_to_project(tmp_path):
    data = np.random.default_rng(0).normal(size=(3, 6, 6)).astype(np.float32)
    (tmp_path / "J1").mkdir()
    with mrcfile.new(tmp_path / "J1" / "s.mrcs", data=data) as m:
        m.set_image_stack()
    cs = _toy_cs(tmp_path, ">J1/s.mrcs")
    stack = ParticleStack.open(cs)  # found relative to the project folder (the .cs's grandparent)
    np.testing.assert_array_equal(stack.read([0, 1, 2]), data[::-1])
    np.testing.assert_allclose(stack.apix, 2.5)
    assert stack.particles["uid"].iloc[2] == np.uint64(2**63 + 2)


def test_bad_cs_files(tmp_path):
    (tmp_path / "plain.cs").write_bytes(b"not numpy")
    with pytest.raises(UserError, match=r"cannot read cryoSPARC file .*plain\.cs"):
        read_cs(tmp_path / "plain.cs")
    with open(tmp_path / "noblob.cs", "wb") as f:
        np.save(f, np.zeros(2, dtype=[("uid", "<u8")]))
    with pytest.raises(UserError, match=r"noblob\.cs has no blob/path, blob/idx"):
        read_cs(tmp_path / "noblob.cs")
    with pytest.raises(UserError, match="not found"):
        ParticleStack.open(tmp_path / "missing.cs")
    cs = _toy_cs(tmp_path, "J1/none.mrcs")
    with pytest.raises(UserError, match=r"none\.mrcs .*particle 1 .*--datadir"):
        ParticleStack.open(cs)


@needs_data
@pytest.mark.parametrize("name", ["cryosparc_J2_particles_exported.cs", "empiar_10076_7.cs"])
def test_relion31_to_cs_inverts_cs_to_relion31(name):
    """cryoSPARC -> RELION -> cryoSPARC gives back cryoSPARC's blob/* and ctf/* values."""
    arr = read_cs(DATA / name)
    df = cs_to_dataframe(arr)
    box = int(arr["blob/shape"][0, 0])
    particles, optics = cs_to_relion31(df, arr["blob/psize_A"].astype(np.float64), box)
    back = relion31_to_cs(particles, optics, arr["uid"], np.array(["/x.mrcs"] * len(arr)))
    np.testing.assert_array_equal(back["uid"], arr["uid"])
    paths = np.char.lstrip(arr["blob/path"], b">")
    np.testing.assert_array_equal(back["blob/path"], paths)
    renamed = ("blob/path", "blob/import_sig", "ctf/exp_group_id")  # other file, groups from 1
    compared = [f for f in back.dtype.names if f in arr.dtype.names and f not in renamed]
    assert len(compared) >= 20
    for field in compared:
        if back.dtype[field].kind == "f":
            np.testing.assert_allclose(back[field], arr[field], rtol=1e-6, err_msg=field)
        else:
            np.testing.assert_array_equal(back[field], arr[field], err_msg=field)
    assert back.dtype["ctf/df1_A"] == arr.dtype["ctf/df1_A"]


def test_particle_uids_are_stable_and_distinct():
    names = pd.Series(["1@a.mrcs", "2@a.mrcs", "1@a.mrcs", " 2@a.mrcs", "1@b.mrcs"])
    uids = particle_uids(names)
    assert uids.dtype == np.uint64 and len(set(uids)) == 5  # a repeated name gets its own uid
    np.testing.assert_array_equal(particle_uids(names), uids)  # the same every time
    np.testing.assert_array_equal(particle_uids(names[:2]), uids[:2])  # rows do not shift it
    assert uids[0] == sha1_uint64("1@a.mrcs") and uids[2] == sha1_uint64("1@a.mrcs#1")
    digest = hashlib.sha1(b"1@a.mrcs").digest()
    assert int(uids[0]) == int.from_bytes(digest[:8], "little")


def test_relion31_to_cs_refuses_a_bad_scale_factor():
    particles = pd.DataFrame(
        {
            "rlnImageName": ["1@s.mrcs", "2@s.mrcs"],
            "rlnOpticsGroup": [1, 1],
            "rlnDefocusU": [1e4, 1e4],
            "rlnCtfScalefactor": ["1.0", "abc"],
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [1.0],
            "rlnImageSize": [8],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    files = np.array(["/s.mrcs"] * 2)
    with pytest.raises(UserError, match=r"particle 2 of p\.star: rlnCtfScalefactor is abc"):
        relion31_to_cs(particles, optics, np.arange(2, dtype=np.uint64), files, "p.star")
    particles["rlnCtfScalefactor"] = 1.0
    particles["rlnImageName"] = ["s.mrcs", "2@s.mrcs"]  # no "@": the first image
    cs = relion31_to_cs(particles, optics, np.arange(2, dtype=np.uint64), files)
    np.testing.assert_array_equal(cs["blob/idx"], [0, 1])
    np.testing.assert_array_equal(cs["ctf/df2_A"], 1e4)  # RELION: V defaults to U
    with pytest.raises(KeyError, match="no cryoSPARC layout"):
        cs_array({"tvae/z": np.zeros(2)}, 2)
