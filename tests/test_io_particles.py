"""ParticleStack: opening RELION/bare stacks lazily, path resolution, reading, validation."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from tvae_em.errors import UserError
from tvae_em.io import (
    ParticleStack,
    read_particles_star,
    write_particles_star,
    write_stack,
    write_star,
)
from tvae_em.io import particles as particles_module

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


def write_mrcs(path: Path, data: np.ndarray, apix: float | None = None) -> Path:
    """A stack written by mrcfile (its mode follows the array dtype)."""
    with mrcfile.new(path, data=data, overwrite=True) as m:
        m.set_image_stack()
        if apix is not None:
            m.voxel_size = apix
    return path


def star30(path: Path, names: list[str], **columns) -> Path:
    """A minimal RELION 3.0-style star (one named block, no optics)."""
    write_star(path, {"images": pd.DataFrame({"rlnImageName": names, **columns})})
    return path


def images(n: int, box: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def _mrc_data(path: Path) -> np.ndarray:
    """Pixel data read directly with mrcfile (quietly: some real headers are sloppy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data)


# ---- real files -------------------------------------------------------------------------------
@needs_data
def test_relion31_reads_the_right_images():
    stack = ParticleStack.open(DATA / "relion31.star")
    truth = _mrc_data(DATA / "relion31.mrcs")
    assert (stack.kind, len(stack), stack.box) == ("relion31", 5, 256)
    np.testing.assert_allclose(stack.apix, 2.806)
    got = stack.read([4, 0, 2])
    assert got.dtype == np.float32 and got.shape == (3, 256, 256)
    np.testing.assert_array_equal(got, truth[[4, 0, 2]])
    assert list(stack.particles.columns) == list(
        read_particles_star(DATA / "relion31.star")[0].columns
    )


@needs_data
def test_relion30_with_broken_mrc_header():
    stack = ParticleStack.open(DATA / "empiar_10076_7.star")
    assert stack.kind == "relion30" and stack.optics is None and stack.box == 320
    np.testing.assert_allclose(stack.apix, 5 * 1e4 / 38168)
    truth = _mrc_data(DATA / "empiar_10076_7.mrc")
    np.testing.assert_array_equal(stack.read(np.arange(7)[::-1]), truth[::-1])


@needs_data
def test_toy_projections_pixel_size_from_header():
    stack = ParticleStack.open(DATA / "toy_projections.star")
    assert len(stack) == 1000 and stack.box == 30 and stack.apix_source == "MRC header"
    np.testing.assert_allclose(stack.apix, 1.0)
    assert stack.read([999]).shape == (1, 30, 30)


@needs_data
def test_bare_broken_stack_needs_input_apix():
    stack = ParticleStack.open(DATA / "empiar_10076_7.mrc")
    assert stack.kind == "mrcs" and len(stack) == 7
    with pytest.raises(UserError, match="--input-apix"):
        _ = stack.apix
    np.testing.assert_allclose(
        ParticleStack.open(DATA / "empiar_10076_7.mrc", apix=1.31).apix, 1.31
    )


@needs_data
def test_star_without_local_stacks_says_where_it_looked():
    with pytest.raises(UserError, match="toy_images_a.mrcs.*--datadir"):
        ParticleStack.open(DATA / "relion5.star")


# ---- laziness and reading ---------------------------------------------------------------------
class _Recorder:
    """Stands in for a memory-mapped array and records which images were asked for."""

    def __init__(self, data: np.ndarray, log: list) -> None:
        self.data, self.log = data, log

    def __getitem__(self, key):
        rows = range(len(self.data))[key] if isinstance(key, slice) else np.asarray(key)
        self.log.append(list(map(int, rows)))
        return self.data[key]


@pytest.fixture
def two_stacks(tmp_path):
    a, b = images(5, 8, seed=1), images(3, 8, seed=2)
    (tmp_path / "Extract").mkdir()
    write_mrcs(tmp_path / "Extract" / "a.mrcs", a, apix=2.0)
    write_mrcs(tmp_path / "Extract" / "b.mrcs", b, apix=2.0)
    names = [
        "2@Extract/b.mrcs",
        "5@Extract/a.mrcs",
        "1@Extract/a.mrcs",
        "3@Extract/b.mrcs",
        "3@Extract/a.mrcs",
    ]
    star = star30(
        tmp_path / "p.star", names, rlnDetectorPixelSize=[5.0] * 5, rlnMagnification=[25000.0] * 5
    )
    return star, np.stack([b[1], a[4], a[0], b[2], a[2]])


def test_open_reads_no_pixels_and_read_groups_by_file(two_stacks, monkeypatch):
    star, truth = two_stacks
    opened, log = [], []
    real_open = particles_module.open_stack

    def spy(path):
        mrc, data = real_open(path)
        opened.append(Path(path).name)
        return mrc, _Recorder(np.asarray(data), log)

    monkeypatch.setattr(particles_module, "open_stack", spy)
    stack = ParticleStack.open(star)
    assert opened == [] and stack.box == 8
    np.testing.assert_allclose(stack.apix, 2.0)  # 5 um * 1e4 / 25000
    got = stack.read([3, 1, 4, 0])
    np.testing.assert_array_equal(got, truth[[3, 1, 4, 0]])
    assert sorted(opened) == ["a.mrcs", "b.mrcs"]
    assert sorted(log) == [[1, 2], [2, 4]]  # one sorted read per file, only the asked images
    stack.read([2, 4, 2])  # repeats and gaps in one file
    assert len(opened) == 2 and log[-1] == [0, 0, 2]  # maps are cached


def test_pickling_drops_memory_maps(two_stacks):
    star, truth = two_stacks
    stack = ParticleStack.open(star)
    stack.read([0, 1])
    assert stack._maps
    clone = pickle.loads(pickle.dumps(stack))
    assert not clone._maps
    np.testing.assert_array_equal(clone.read(np.arange(5)), truth)


def test_read_rejects_out_of_range(two_stacks):
    stack = ParticleStack.open(two_stacks[0])
    with pytest.raises(IndexError):
        stack.read([5])


@pytest.mark.parametrize("dtype", [np.float16, np.int16, np.int8, np.uint8, np.float32])
def test_stack_dtypes_read_as_float32(tmp_path, dtype):
    raw = (np.random.default_rng(0).uniform(0, 100, size=(4, 6, 6))).astype(dtype)
    write_mrcs(tmp_path / "s.mrcs", raw, apix=1.5)
    stack = ParticleStack.open(tmp_path / "s.mrcs")
    got = stack.read([3, 1])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, raw[[3, 1]].astype(np.float32))
    np.testing.assert_allclose(stack.apix, 1.5)


def test_written_stack_reads_back(tmp_path):
    data = images(10, 6)
    n = write_stack(tmp_path / "w.mrcs", (data[i : i + 4] for i in range(0, 10, 4)), 10, 6, 3.0)
    assert n == 10
    with mrcfile.open(tmp_path / "w.mrcs") as m:
        assert m.header.mode == 2 and m.voxel_size.x == pytest.approx(3.0)
        np.testing.assert_array_equal(m.data, data)
        assert m.header.dmean == pytest.approx(data.mean(), abs=1e-6)
    assert mrcfile.validate(str(tmp_path / "w.mrcs"), print_file=open("/dev/null", "w"))


def test_write_stack_truncates_when_fewer_images(tmp_path):
    data = images(7, 6)
    n = write_stack(tmp_path / "w.mrcs", [data[:3], data[3:5]], 7, 6, 1.0)
    assert n == 5
    with mrcfile.open(tmp_path / "w.mrcs") as m:
        np.testing.assert_array_equal(m.data, data[:5])


def test_write_stack_leaves_nothing_on_error(tmp_path):
    def chunks():
        yield images(2, 6)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_stack(tmp_path / "w.mrcs", chunks(), 4, 6, 1.0)
    assert list(tmp_path.iterdir()) == []


# ---- path resolution ----------------------------------------------------------------------------
def test_datadir_and_cwd_resolution(tmp_path, monkeypatch):
    (tmp_path / "stars").mkdir()
    (tmp_path / "data").mkdir()
    write_mrcs(tmp_path / "data" / "s.mrcs", images(2, 4), apix=1.0)
    star = star30(tmp_path / "stars" / "p.star", ["1@s.mrcs", "2@s.mrcs"])
    with pytest.raises(UserError, match=r"s\.mrcs.*--datadir"):
        ParticleStack.open(star)
    assert len(ParticleStack.open(star, datadir=tmp_path / "data")) == 2
    other = star30(tmp_path / "stars" / "q.star", ["1@elsewhere/s.mrcs"])
    assert ParticleStack.open(other, datadir=tmp_path / "data").files[0].endswith("data/s.mrcs")
    monkeypatch.chdir(tmp_path / "data")
    assert ParticleStack.open(star).files == [str(tmp_path / "data" / "s.mrcs")]


# ---- pixel sizes and optics groups ----------------------------------------------------------
def test_several_optics_groups_optics_after_particles(tmp_path):
    write_mrcs(tmp_path / "s.mrcs", images(4, 8), apix=9.9)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["a", "b"],
            "rlnImagePixelSize": [1.0, 2.0],
        }
    )
    particles = pd.DataFrame(
        {"rlnImageName": [f"{i}@s.mrcs" for i in range(1, 5)], "rlnOpticsGroup": [2, 1, 1, 2]}
    )
    write_star(tmp_path / "p.star", {"particles": particles, "optics": optics})
    stack = ParticleStack.open(tmp_path / "p.star")
    assert stack.kind == "relion31"
    np.testing.assert_allclose(stack.apix, [2.0, 1.0, 1.0, 2.0])
    np.testing.assert_allclose(ParticleStack.open(tmp_path / "p.star", apix=3.0).apix, 3.0)


def test_relion30_to_31_star(tmp_path):
    write_mrcs(tmp_path / "s.mrcs", images(3, 8))
    star = star30(
        tmp_path / "p.star",
        [f"{i}@s.mrcs" for i in (1, 2, 3)],
        rlnDetectorPixelSize=[5.0, 5.0, 10.0],
        rlnMagnification=[10000.0] * 3,
        rlnVoltage=[300.0] * 3,
        rlnSphericalAberration=[2.7] * 3,
        rlnAmplitudeContrast=[0.1] * 3,
        rlnOriginX=[1.0, -2.0, 0.5],
        rlnOriginY=[0.0, 3.0, 1.0],
        rlnDefocusU=[1e4, 2e4, 3e4],
    )
    stack = ParticleStack.open(star)
    particles, optics = stack.relion31_tables()
    assert len(optics) == 2 and sorted(optics["rlnImagePixelSize"]) == [5.0, 10.0]
    assert (optics["rlnImageSize"] == 8).all() and (optics["rlnImageDimensionality"] == 2).all()
    assert (optics["rlnVoltage"] == 300).all()
    np.testing.assert_allclose(particles["rlnOriginXAngst"], [5.0, -10.0, 5.0])
    np.testing.assert_allclose(particles["rlnOriginYAngst"], [0.0, 15.0, 10.0])
    assert "rlnOriginX" not in particles and "rlnMagnification" not in particles
    np.testing.assert_allclose(particles["rlnDefocusU"], [1e4, 2e4, 3e4])
    out = tmp_path / "p31.star"
    write_particles_star(out, stack.particles, None, box=8)
    again = ParticleStack.open(out)
    assert again.kind == "relion31"
    np.testing.assert_allclose(again.apix, [5.0, 5.0, 10.0])


# ---- fingerprint -----------------------------------------------------------------------------
def test_fingerprint_is_stable_and_tracks_the_input(two_stacks, tmp_path):
    star, _ = two_stacks
    a, b = ParticleStack.open(star).fingerprint(), ParticleStack.open(star).fingerprint()
    assert a == b and "5x8" in a
    write_mrcs(tmp_path / "Extract" / "b.mrcs", images(4, 8), apix=2.0)  # stack grew
    assert ParticleStack.open(star).fingerprint() != a


# ---- validation -------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path):
    write_mrcs(tmp_path / "s.mrcs", images(3, 8), apix=1.0)
    write_mrcs(tmp_path / "big.mrcs", images(2, 10), apix=1.0)
    write_mrcs(tmp_path / "rect.mrcs", np.zeros((2, 8, 10), np.float32), apix=1.0)
    cases = {
        "missing.star": (None, "not found"),
        "range.star": (["1@s.mrcs", "4@s.mrcs"], r"particle 2 .* image 4 .*s\.mrcs has only 3"),
        "sizes.star": (["1@s.mrcs", "1@big.mrcs"], r"different sizes.*s\.mrcs.*big\.mrcs"),
        "rect.star": (["1@rect.mrcs"], r"rect\.mrcs are not square"),
        "nostack.star": (["1@gone.mrcs"], r"gone\.mrcs \(particle 1 "),
        "badname.star": (["1@s.mrcs", "x@s.mrcs"], r"particle 2 .*bad rlnImageName 'x@s\.mrcs'"),
    }
    for name, (names, pattern) in cases.items():
        if names is not None:
            star30(tmp_path / name, names)
        with pytest.raises(UserError, match=pattern) as e:
            ParticleStack.open(tmp_path / name)
        assert name in _one_line(e) or "s.mrcs" in _one_line(e)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserError, match=r"unknown input file type '\.txt'") as e:
        ParticleStack.open(tmp_path / "x.txt")
    _one_line(e)


def test_truncated_stack(tmp_path):
    path = write_mrcs(tmp_path / "s.mrcs", images(3, 8))
    with open(path, "r+b") as f:
        f.truncate(1024 + 2 * 64 * 4)
    with pytest.raises(UserError, match="truncated"):
        ParticleStack.open(path)
