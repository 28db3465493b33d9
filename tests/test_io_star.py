"""RELION STAR reading (real RELION 3.0/3.1/5 files) and atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from tvae_em.errors import UserError
from tvae_em.io import read_particles_star, read_star, write_star
from tvae_em.io import star as star_module

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")

# file -> (particles, optics groups or None, kind)
REAL_STARS = {
    "relion31.star": (5, 1, "relion31"),
    "relion31.v2.star": (5, 1, "relion31"),
    "relion31.6opticsgroups.star": (139, 6, "relion31"),
    "relion5.star": (17, 1, "relion31"),
    "FinalRefinement-OriginalParticles-PfCRT.star": (5, None, "relion30"),
    "empiar_10076_7.star": (7, None, "relion30"),
    "toy_projections.star": (1000, None, "relion30"),
}


@needs_data
@pytest.mark.parametrize("name", sorted(REAL_STARS))
def test_real_stars_parse(name):
    n, n_optics, kind = REAL_STARS[name]
    particles, optics, got_kind = read_particles_star(DATA / name)
    assert len(particles) == n and got_kind == kind
    assert (optics is None) if n_optics is None else len(optics) == n_optics
    names = particles["rlnImageName"]
    assert names.map(type).eq(str).all() and names.str.contains("@").all()


@needs_data
def test_name_columns_stay_strings_with_leading_zeros():
    particles, _, _ = read_particles_star(DATA / "relion31.star")
    assert particles["rlnImageName"].iloc[0] == "000001@relion31.mrcs"
    particles, _, _ = read_particles_star(DATA / "empiar_10076_7.star")
    assert particles["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]


@needs_data
def test_optics_block_after_particles_reads_the_same():
    a = read_particles_star(DATA / "relion31.star")
    b = read_particles_star(DATA / "relion31.v2.star")
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


def _blocks() -> dict[str, pd.DataFrame]:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["g1", "g2"],
            "rlnImagePixelSize": [1.5, 2.25],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": ["000001@a b.mrcs", "000002@x.mrcs", "000003@x.mrcs"],
            "rlnMicrographName": ["01", "", "mic 3"],
            "rlnDefocusU": [10000.123456, 2.5e-7, 123456789.25],
            "rlnOpticsGroup": [1, 2, 2],
            "tvaeZ0": [0.1, -3.0, 1e-5],
        }
    )
    return {"optics": optics, "particles": particles}


def test_write_star_round_trip_with_starfile(tmp_path):
    path = tmp_path / "out.star"
    blocks = _blocks()
    write_star(path, blocks)
    assert path.read_text().splitlines()[0] == "# version 30001"
    back = starfile.read(path, always_dict=True, parse_as_string=star_module.NAME_COLUMNS)
    assert list(back) == ["optics", "particles"]
    for name, df in blocks.items():
        pd.testing.assert_frame_equal(back[name], df, check_dtype=False, rtol=1e-9)
    assert read_star(path)["particles"]["rlnMicrographName"].tolist() == ["01", "", "mic 3"]


def test_write_star_refuses_unnamed_block(tmp_path):
    with pytest.raises(ValueError, match="named"):
        write_star(tmp_path / "x.star", {"": pd.DataFrame({"rlnImageName": ["1@a.mrcs"]})})


def test_write_star_is_atomic_on_interrupt(tmp_path, monkeypatch):
    path = tmp_path / "out.star"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(star_module, "_write_loop", boom)
    with pytest.raises(KeyboardInterrupt):
        write_star(path, _blocks())
    assert list(tmp_path.iterdir()) == []


def test_write_star_replaces_existing_file_only_when_complete(tmp_path):
    path = tmp_path / "out.star"
    path.write_text("old")
    write_star(path, _blocks())
    assert len(read_star(path)["particles"]) == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no particle block"),
        ("data_particles\n\nloop_\n_rlnImageName #1\n", "no particles"),
        ("data_\n\nloop_\n_rlnDefocusU #1\n1.0\n2.0\n", "no rlnImageName"),
    ],
)
def test_bad_particle_stars(tmp_path, text, message):
    path = tmp_path / "bad.star"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        read_particles_star(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_star(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_star(tmp_path / "nope.star")


def test_float_precision_is_kept(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "v": [np.pi * 1e4]})
    write_star(tmp_path / "p.star", {"particles": df})
    back = read_star(tmp_path / "p.star")["particles"]["v"].iloc[0]
    assert back == pytest.approx(np.pi * 1e4, rel=1e-9)
