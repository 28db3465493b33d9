"""RELION round-trip conventions of the stars tvae-em writes: image paths from the project folder
(the working directory), complete optics (RELION's defaults for bare stacks), carried values
written back as read, and `embed --original` matching real RELION stars."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import make_run_folder

from tvae_em.cli import main
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.errors import UserError
from tvae_em.export import match_rows
from tvae_em.io import (
    SOURCE_ROW,
    OpticsDefaults,
    ParticleStack,
    build_optics,
    project_path,
    read_particles_star_text,
    read_star,
    stack_reference,
    write_stack,
    write_star,
)
from tvae_em.preprocess import preprocess_stack

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"shared test data not found at {REAL}")
OPTICS = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]

# A hand-written RELION 3.1 star whose carried values change when parsed as numbers and printed.
CARRIED_STAR = """
# version 30001
# picked by hand

data_general

_rlnReferenceDimensionality 2
_rlnSomeNote "a note"

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnImageDimensionality #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMicrographOriginalPixelSize #9
1 opticsGroup1 2.000000 16 2 300.000000 2.700000 0.100000 1.000000

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
_rlnCoordinateX #3
_rlnCoordinateY #4
_rlnBatch #5
_rlnPrecise #6
_rlnFlag #7
_rlnDefocusU #8
# a comment inside the particle block
000001@s.mrcs 1 3277.000000 983.000000 007 3.14159265358979 True 10000.000000
000002@s.mrcs 1 2826.000000 459.000000 008 2.71828182845905 False 12000.500000
000003@s.mrcs 1 3406.000000 1409.000000 009 1.41421356237310 True 11000.250000
"""


def _carried_set(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_stack(folder / "s.mrcs", [rng.normal(size=(3, 16, 16)).astype(np.float32)], 3, 16, 2.0)
    star = folder / "in.star"
    star.write_text(CARRIED_STAR.lstrip())
    return star


def _rows(star: Path) -> list[list[str]]:
    """Data lines of the particle block, split into tokens (the text as written)."""
    lines = star.read_text().split("data_particles", 1)[1].split("\ndata_")[0].splitlines()
    return [ln.split() for ln in lines if ln.strip() and ln[0] not in "_#l"]


# ---- carried values ------------------------------------------------------------------------
def test_star_text_reads_numbers_and_keeps_the_text(tmp_path):
    particles, optics, kind, text = read_particles_star_text(_carried_set(tmp_path))
    assert kind == "relion31" and particles["rlnBatch"].tolist() == [7, 8, 9]
    assert particles["rlnDefocusU"].dtype == np.float64
    assert text.loops["particles"]["rlnBatch"].tolist() == ["007", "008", "009"]
    assert text.pairs["general"]["rlnSomeNote"] == "a note"
    assert text.comments[""] == ["# picked by hand"]
    assert text.comments["particles"] == ["# a comment inside the particle block"]


def test_write_star_puts_back_unchanged_values_as_read(tmp_path):
    particles, optics, _, text = read_particles_star_text(_carried_set(tmp_path))
    rows = np.array([2, 0])
    out = particles.iloc[rows].reset_index(drop=True)
    out["rlnDefocusU"] = [11000.25, 1.5]  # one value kept, one changed by us
    out["rlnAnglePsi"] = [10.0, 20.0]  # a column of ours
    write_star(
        tmp_path / "o.star",
        {"optics": optics, "particles": out},
        text=text.select("particles", rows),
    )
    got = _rows(tmp_path / "o.star")
    assert got[0][2:8] == [
        "3406.000000",
        "1409.000000",
        "009",
        "1.41421356237310",
        "True",
        "11000.250000",
    ]
    assert got[1][2:8] == ["3277.000000", "983.000000", "007", "3.14159265358979", "True", "1.5"]
    written = (tmp_path / "o.star").read_text()
    assert "# a comment inside the particle block" in written and "# picked by hand" in written
    assert "data_general" in written and '_rlnSomeNote "a note"' in written
    assert "1.000000" in written.split("data_optics", 1)[1].split("data_particles")[0]
    assert read_star(tmp_path / "o.star")["particles"]["rlnBatch"].tolist() == [9, 7]


def test_without_text_values_are_printed_as_numbers(tmp_path):
    """The negative control: the plain writer would change the carried text."""
    particles, optics, _, _ = read_particles_star_text(_carried_set(tmp_path))
    write_star(tmp_path / "o.star", {"optics": optics, "particles": particles})
    assert _rows(tmp_path / "o.star")[0][4:6] == ["7", "3.141592654"]


def test_preprocess_and_embed_carry_every_value_as_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star = _carried_set(tmp_path / "sub")
    summary = preprocess_stack(ParticleStack.open("sub/in.star"), "prep", size=8)
    got = _rows(summary.star)
    assert [r[2:8] for r in got] == [r[2:8] for r in _rows(star)]
    assert "data_general" in summary.star.read_text()
    run = make_run_folder(tmp_path / "run", 8, encoder_kernel=3)
    embed_particles(EmbedOptions(run, "prep/particles.star", "out/e.star", classes=2))
    assert [r[2:8] for r in _rows(Path("out/e.star"))] == [r[2:8] for r in _rows(star)]


# ---- image paths -----------------------------------------------------------------------------
def test_project_path_is_relative_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert project_path(tmp_path / "Extract" / "p.mrcs") == "Extract/p.mrcs"
    assert project_path("Extract/p.mrcs") == "Extract/p.mrcs"
    outside = tmp_path.parent / "elsewhere.mrcs"
    assert project_path(outside) == str(outside)


def test_outputs_name_stacks_from_the_folder_the_command_ran_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _carried_set(tmp_path / "Extract" / "job005")
    prep = preprocess_stack(ParticleStack.open("Extract/job005/in.star"), "tvae/prep", size=8)
    names = read_star(prep.star)["particles"]["rlnImageName"]
    assert names.tolist() == [f"{k:06d}@tvae/prep/particles.mrcs" for k in (1, 2, 3)]
    run = make_run_folder(tmp_path / "run", 8, encoder_kernel=3)
    embed_particles(
        EmbedOptions(
            run, prep.star, "tvae/embed/e.star", original="Extract/job005/in.star", classes=2
        )
    )
    e = read_star("tvae/embed/e.star")["particles"]["rlnImageName"]
    o = read_star("tvae/embed/e_original.star")["particles"]["rlnImageName"]
    assert e.tolist() == names.tolist()
    assert o.tolist() == [f"{k:06d}@Extract/job005/s.mrcs" for k in (1, 2, 3)]
    for star in ("tvae/embed/e.star", "tvae/embed/e_original.star"):  # the readers find them
        assert len(ParticleStack.open(star)) == 3


def test_mrc_stacks_are_named_with_the_mrcs_format_suffix(tmp_path, monkeypatch):
    """RELION refuses "N@x.mrc" (it reserves .mrc for 3D maps) and reads "N@x.mrc:mrcs"."""
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path / "s.mrc", [np.zeros((2, 8, 8), np.float32)], 2, 8, 1.0)
    assert stack_reference("elsewhere/s.mrc", tmp_path / "s.mrc") == "s.mrc:mrcs"
    assert stack_reference("s.mrc:mrcs", tmp_path / "s.mrc") == "s.mrc:mrcs"
    write_stack(tmp_path / "t.mrcs", [np.zeros((2, 8, 8), np.float32)], 2, 8, 1.0)
    assert stack_reference("t.mrcs", tmp_path / "t.mrcs") == "t.mrcs"
    star = tmp_path / "p.star"
    names = pd.DataFrame({"rlnImageName": ["1@s.mrc:mrcs", "2@s.mrc:mrcs"]})
    write_star(star, {"particles": names})
    assert ParticleStack.open(star, apix=1.0).files == [str(tmp_path / "s.mrc")]


def test_old_stars_relative_to_their_folder_still_read(tmp_path, monkeypatch):
    star = _carried_set(tmp_path / "a" / "b")  # names "s.mrcs": relative to the star's folder
    monkeypatch.chdir(tmp_path)
    stack = ParticleStack.open("a/b/in.star")
    assert stack.files == [str(tmp_path / "a" / "b" / "s.mrcs")]
    prep = preprocess_stack(stack, tmp_path / "prep", size=8)
    assert read_star(prep.star)["particles"]["rlnImageName"].iloc[0] == "000001@prep/particles.mrcs"
    assert star.is_file()


# ---- optics ------------------------------------------------------------------------------------
def test_build_optics_fills_relions_defaults():
    group, optics = build_optics(pd.DataFrame(index=range(3)), np.full(3, 1.5), 32)
    row = optics.iloc[0]
    assert (row["rlnVoltage"], row["rlnSphericalAberration"], row["rlnAmplitudeContrast"]) == (
        300.0,
        2.7,
        0.1,
    )
    assert (row["rlnImageSize"], row["rlnImageDimensionality"], row["rlnOpticsGroup"]) == (32, 2, 1)
    assert row["rlnOpticsGroupName"] == "opticsGroup1" and group.tolist() == [1, 1, 1]
    _, optics = build_optics(
        pd.DataFrame({"rlnVoltage": [200.0]}),
        np.ones(1),
        8,
        defaults=OpticsDefaults(300, 0.0, 0.07),
    )
    assert optics.iloc[0][OPTICS].tolist() == [200.0, 0.0, 0.07]  # the input's voltage wins


def _bare(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    write_stack(folder / "p.mrcs", [rng.normal(size=(4, 16, 16)).astype(np.float32)], 4, 16, 1.5)
    return folder / "p.mrcs"


def test_bare_stack_gets_complete_optics_and_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bare(tmp_path / "sub")
    r = CliRunner().invoke(main, ["preprocess", "sub/p.mrcs", "-o", "a", "--size", "8"])
    assert r.exit_code == 0, r.output
    optics = read_star("a/particles.star")["optics"]
    assert optics.iloc[0][OPTICS].tolist() == [300.0, 2.7, 0.1]
    args = ["--voltage", "200", "--spherical-aberration", "0.01", "--amplitude-contrast", "0.07"]
    r = CliRunner().invoke(main, ["preprocess", "sub/p.mrcs", "-o", "b", "--size", "8", *args])
    assert r.exit_code == 0, r.output
    assert read_star("b/particles.star")["optics"].iloc[0][OPTICS].tolist() == [200, 0.01, 0.07]
    # the options never replace values a star has
    r = CliRunner().invoke(main, ["preprocess", "b/particles.star", "-o", "c", *args[:2]])
    assert r.exit_code == 0, r.output
    assert read_star("c/particles.star")["optics"].iloc[0]["rlnVoltage"] == 200


def test_star_without_optics_values_is_completed(tmp_path):
    star = _carried_set(tmp_path)
    star.write_text(star.read_text().replace("_rlnVoltage #6", "_rlnKept #6"))
    tables, _ = ParticleStack.open(star).relion31_tables()[1], None
    assert tables.iloc[0]["rlnVoltage"] == 300.0 and tables.iloc[0]["rlnKept"] == 300.0


@pytest.mark.parametrize(
    "option, value", [("--amplitude-contrast", "1.5"), ("--voltage", "0"), ("--voltage", "nan")]
)
def test_bad_optics_option_exits_2(tmp_path, monkeypatch, option, value):
    monkeypatch.chdir(tmp_path)
    _bare(tmp_path)
    r = CliRunner().invoke(main, ["preprocess", "p.mrcs", "-o", "out", option, value])
    assert r.exit_code == 2 and option in r.output and len(r.output.strip().splitlines()) == 1
    assert not Path("out").exists()


# ---- embed --original -------------------------------------------------------------------------
def test_match_rows_integer_and_float_coordinates():
    orig = pd.DataFrame(
        {
            "rlnMicrographName": ["m", "m", "n"],
            "rlnCoordinateX": [3277.0, 10.5, 3.0],
            "rlnCoordinateY": [983.0, 2.0, 4.0],
        }
    )
    prep = orig.iloc[[2, 0]].reset_index(drop=True)
    prep["rlnCoordinateX"] = prep["rlnCoordinateX"].astype(np.int64)  # "3" and "3277" as read
    prep["rlnCoordinateY"] = prep["rlnCoordinateY"].astype(np.int64)
    np.testing.assert_array_equal(match_rows(orig, prep, "o", "p"), [2, 0])
    same = orig.astype({"rlnCoordinateY": np.int64})
    np.testing.assert_array_equal(
        match_rows(orig, same.assign(rlnCoordinateX=[3277, 10.5, 3]), "o", "p"), [0, 1, 2]
    )


def test_match_rows_prefers_the_source_row_and_checks_it():
    orig = pd.DataFrame(
        {
            "rlnMicrographName": ["m"] * 4,
            "rlnCoordinateX": [1.0, 1.0, 2.0, 3.0],
            "rlnCoordinateY": [5.0, 5.0, 6.0, 7.0],
        }
    )
    prep = orig.iloc[[1, 3]].reset_index(drop=True)  # a duplicated pick: keys cannot tell
    with pytest.raises(UserError, match="cannot match"):
        match_rows(orig, prep, "o", "p")
    np.testing.assert_array_equal(
        match_rows(orig, prep.assign(**{SOURCE_ROW: [2, 4]}), "o", "p"), [1, 3]
    )
    with pytest.raises(UserError, match=r"particle 2 of p came from row 5 .* o has 4 rows"):
        match_rows(orig, prep.assign(**{SOURCE_ROW: [2, 5]}), "o", "p")
    with pytest.raises(UserError, match="particle 1 of p came from row 3 but that row"):
        match_rows(orig, prep.assign(**{SOURCE_ROW: [3, 4]}), "o", "p")


@needs_real
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the real stack's header lacks "MAP "
@pytest.mark.parametrize("skip_bad", [False, True])
def test_embed_original_matches_the_real_relion31_star(tmp_path, monkeypatch, skip_bad):
    """relion31.star (integer coordinates printed as 3277.000000, two particles picked at the
    same place) after preprocess: embed --original finds every particle's row."""
    monkeypatch.chdir(tmp_path)
    Path("sub").mkdir()
    for name in ("relion31.star", "relion31.mrcs"):
        shutil.copy(REAL / name, "sub")
    stack = ParticleStack.open("sub/relion31.star")
    if skip_bad:  # particle 2 unusable: dropped by --skip-bad
        import mrcfile

        with mrcfile.open("sub/relion31.mrcs", "r+", permissive=True) as m:
            m.data[1] = np.nan
    prep = preprocess_stack(stack, "prep", size=32, skip_bad=skip_bad)
    kept = [0, 2, 3, 4] if skip_bad else [0, 1, 2, 3, 4]
    run = make_run_folder(tmp_path / "run", 32, encoder_kernel=5)
    embed_particles(EmbedOptions(run, prep.star, "e.star", original="sub/relion31.star"))
    got = read_star("e_original.star")["particles"]
    want = read_star("sub/relion31.star")["particles"].iloc[kept]
    assert got["rlnImageName"].tolist() == [f"{k + 1:06d}@sub/relion31.mrcs" for k in kept]
    np.testing.assert_array_equal(got["rlnDefocusU"], want["rlnDefocusU"])
    assert _rows(Path("e_original.star"))[0][:2] == ["3277.000000", "983.000000"]
