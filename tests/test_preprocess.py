"""Preprocessing: Fourier crop against analytic images, filters, normalisation, chunked driver."""

from __future__ import annotations

import contextlib
import tracemalloc
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from tvae_em.errors import UserError
from tvae_em.fourier import fourier_crop, lowpass
from tvae_em.io import ParticleStack, read_star, write_star
from tvae_em.preprocess import (
    background_mask,
    bad_image_reasons,
    invert,
    normalise,
    output_size,
    preprocess_stack,
    process_images,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
pytestmark = pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")


# ---- Fourier crop -------------------------------------------------------------------------
def cosines(x: np.ndarray, y: np.ndarray, period: int, comps) -> np.ndarray:
    """Sum of a * cos(2 pi (kx x + ky y) / period + phase): band-limited, periodic on the grid."""
    return sum(a * np.cos(2 * np.pi * (kx * x + ky * y) / period + ph) for a, kx, ky, ph in comps)


@pytest.mark.parametrize("d, n", [(64, 32), (65, 32), (64, 33), (63, 21), (30, 16), (31, 30)])
def test_fourier_crop_samples_band_limited_images_exactly(d, n):
    rng = np.random.default_rng(d * 100 + n)
    top = n // 2 if n % 2 == 0 else (n - 1) // 2  # highest frequency the output can hold
    freqs = [
        (0, 0),
        (3, -2),
        (top - 1, 1),
        (-2, top - 1),
        (top, 0),
        (0, top),
        (top, top),
        (top, -3),
    ]
    comps = [(rng.normal(), kx, ky, rng.uniform(0, 2 * np.pi)) for kx, ky in freqs]
    r = np.arange(d) - d // 2  # old pixels relative to the centre pixel d//2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    image = cosines(xx, yy, d, comps).astype(np.float32)[None]
    rn = (np.arange(n) - n // 2) * d / n  # the coarse grid, in old pixels
    yn, xn = np.meshgrid(rn, rn, indexing="ij")
    want = cosines(xn, yn, d, comps)
    got = fourier_crop(image, n)[0]
    assert got.shape == (n, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=5e-6 * np.abs(want).max())


def test_fourier_crop_keeps_the_mean_and_the_centre():
    img = np.zeros((1, 64, 64), np.float32)
    r = np.arange(64) - 32
    img[0] = 3.0 + np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 4.0**2))
    out = fourier_crop(img, 32)[0]
    assert out.mean() == pytest.approx(img.mean(), rel=1e-5)
    assert np.unravel_index(np.argmax(out), out.shape) == (16, 16)


def test_fourier_crop_identity_and_refuses_to_enlarge():
    x = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(fourier_crop(x, 8), x)
    with pytest.raises(ValueError):
        fourier_crop(x, 10)


# ---- filters and normalisation ------------------------------------------------------------
def _wave(d: int, k: int) -> np.ndarray:
    return np.cos(2 * np.pi * k * np.arange(d) / d)[None, None, :].repeat(d, 1).astype(np.float32)


def test_gaussian_lowpass_halves_at_the_resolution():
    d, apix = 64, 2.0
    k = 8  # frequency k/d cycles/px = 1/16 px = 1/32 A
    out = lowpass(_wave(d, k), apix, resolution_A=d * apix / k)
    np.testing.assert_allclose(out, 0.5 * _wave(d, k), atol=1e-5)
    per_image = lowpass(np.concatenate([_wave(d, k)] * 2), np.array([apix, 2 * apix]), d * apix / k)
    assert per_image[1].max() == pytest.approx(0.5 ** (1 / 4), rel=1e-4)  # half the frequency


def test_hard_lowpass_keeps_below_and_removes_above():
    d = 32
    x = _wave(d, 3) + _wave(d, 10)
    out = lowpass(x, 1.0, resolution_A=d / 5, kind="hard")
    np.testing.assert_allclose(out, _wave(d, 3), atol=1e-5)


def test_normalise_background_zero_mean_unit_sd():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, size=(4, 40, 40)).astype(np.float32)
    x[:, 15:25, 15:25] += 50.0  # a bright particle inside the mask
    out = normalise(x)
    mask = background_mask(40)
    assert not mask[20, 20] and mask[0, 0] and mask[20, 1]
    bg = out[:, mask]
    np.testing.assert_allclose(bg.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(bg.std(axis=1), 1.0, rtol=1e-5)
    whole = normalise(x, mode="image").reshape(4, -1)
    np.testing.assert_allclose(whole.std(axis=1), 1.0, rtol=1e-5)


def test_normalise_flat_background_falls_back_to_image_sd():
    x = np.zeros((1, 20, 20), np.float32)
    x[0, 8:12, 8:12] = 4.0
    out = normalise(x)
    assert np.isfinite(out).all() and out.std() == pytest.approx(1.0, rel=1e-5)


def test_invert_and_bad_images():
    x = np.ones((4, 4, 4), np.float32)
    x[1, 0, 0] = 2
    x[2, 1, 1] = np.nan
    x[3, 2, 2] = np.inf
    np.testing.assert_array_equal(invert(x[:2]), -x[:2])
    assert bad_image_reasons(x) == [
        "a constant image (no signal)",
        None,
        "NaN pixels",
        "Inf pixels",
    ]


def test_output_size_rules():
    apix = np.full(3, 1.0)
    assert output_size(128, apix) == 128
    assert output_size(128, apix, size=64) == 64
    assert output_size(128, apix, apix=2.1) == 60  # 128 / 2.1 = 61 -> nearest even
    for kwargs, message in [
        (dict(size=130), "--size 130 is larger"),
        (dict(size=63), "--size 63 must be a positive even"),
        (dict(apix=0.5), "--apix 0.5 is finer"),
        (dict(size=64, apix=2.0), "not both"),
    ]:
        with pytest.raises(UserError, match=message):
            output_size(128, apix, **kwargs)
    with pytest.raises(UserError, match="one input pixel size"):
        output_size(128, np.array([1.0, 1.2]), apix=2.0)


# ---- the driver ---------------------------------------------------------------------------
def make_star(tmp_path: Path, data: np.ndarray, apix: float = 2.0, **columns) -> Path:
    with mrcfile.new(tmp_path / "in.mrcs", data=data, overwrite=True) as m:
        m.set_image_stack()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [data.shape[-1]],
            "rlnImageDimensionality": [2],
        }
    )
    n = len(data)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@in.mrcs" for i in range(1, n + 1)],
            "rlnOpticsGroup": 1,
            "rlnOriginXAngst": np.linspace(-3, 3, n),
            "rlnOriginYAngst": np.linspace(2, -2, n),
            "tag": np.arange(n),
            **columns,
        }
    )
    write_star(tmp_path / "in.star", {"optics": optics, "particles": particles})
    return tmp_path / "in.star"


def noisy(n: int, box: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def test_driver_writes_stack_and_relion31_star(tmp_path):
    data = noisy(25, 32)
    stack = ParticleStack.open(make_star(tmp_path, data))
    done = []
    summary = preprocess_stack(
        stack,
        tmp_path / "out",
        size=16,
        invert=True,
        lowpass_A=10.0,
        chunk_size=7,
        progress=lambda total, description: contextlib.nullcontext(done.append),
    )
    assert (summary.n_in, summary.n_out, summary.box_out, summary.n_skipped) == (25, 25, 16, 0)
    assert done == [7, 7, 7, 4]
    with mrcfile.open(summary.stack) as m:
        assert m.data.shape == (25, 16, 16) and m.data.dtype == np.float32
        assert m.voxel_size.x == pytest.approx(4.0)
        want = process_images(data, 16, np.full(25, 4.0), invert_contrast=True, lowpass_A=10.0)
        np.testing.assert_allclose(m.data, want, atol=1e-6)
    out = starfile.read(summary.star, always_dict=True)
    assert open(summary.star).readline().strip() == "# version 30001"
    assert out["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(4.0)
    assert out["optics"]["rlnImageSize"].iloc[0] == 16
    p = out["particles"]
    stack = tmp_path / "out" / "particles.mrcs"  # not under the working directory: absolute
    assert p["rlnImageName"].tolist() == [f"{k:06d}@{stack}" for k in range(1, 26)]
    np.testing.assert_allclose(p["rlnOriginXAngst"], np.linspace(-3, 3, 25))
    np.testing.assert_array_equal(p["tag"], np.arange(25))
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == [
        "particles.mrcs",
        "particles.star",
    ]
    again = ParticleStack.open(summary.star)
    np.testing.assert_allclose(again.read([3]), want[[3]], atol=1e-6)


def test_driver_reads_at_most_one_chunk_at_a_time(tmp_path, monkeypatch):
    stack = ParticleStack.open(make_star(tmp_path, noisy(50, 16)))
    sizes = []
    real_read = stack.read
    monkeypatch.setattr(stack, "read", lambda idx: sizes.append(len(idx)) or real_read(idx))
    preprocess_stack(stack, tmp_path / "out", size=8, chunk_size=12)
    assert max(sizes) == 12 and sum(sizes) == 50


def test_memory_is_bounded_by_the_chunk(tmp_path):
    n, box, chunk = 2000, 64, 50  # a 32 MB stack, 0.8 MB chunks
    stack = ParticleStack.open(make_star(tmp_path, noisy(n, box)))
    tracemalloc.start()
    try:
        preprocess_stack(stack, tmp_path / "out", size=32, chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stack_bytes = n * box * box * 4
    assert peak < stack_bytes / 4, (
        f"peak {peak / 1e6:.1f} MB for a {stack_bytes / 1e6:.0f} MB stack"
    )


def _with_bad(tmp_path: Path) -> Path:
    data = noisy(10, 16)
    data[3, 2, 2] = np.nan
    data[7, 5, 5] = np.inf
    return make_star(tmp_path, data)


def test_bad_particles_skipped_with_count(tmp_path):
    stack = ParticleStack.open(_with_bad(tmp_path))
    summary = preprocess_stack(stack, tmp_path / "out", skip_bad=True, chunk_size=4)
    assert summary.n_out == 8 and summary.skipped == [(3, "NaN pixels"), (7, "Inf pixels")]
    p = read_star(summary.star)["particles"]
    assert p["tag"].tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    with mrcfile.open(summary.stack) as m:
        assert m.data.shape == (8, 16, 16) and np.isfinite(m.data).all()


def test_bad_particle_is_an_error_and_leaves_no_output(tmp_path):
    stack = ParticleStack.open(_with_bad(tmp_path))
    with pytest.raises(
        UserError, match=r"particle 4 \(image 4 of .*in\.mrcs\) has NaN pixels.*--skip-bad"
    ):
        preprocess_stack(stack, tmp_path / "out", chunk_size=2)
    assert not (tmp_path / "out").exists()  # not even the folder it created


def test_interrupt_leaves_no_output(tmp_path):
    stack = ParticleStack.open(make_star(tmp_path, noisy(20, 16)))

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_stack(
            stack,
            tmp_path / "out",
            chunk_size=5,
            progress=lambda total, description: contextlib.nullcontext(interrupt),
        )
    assert not (tmp_path / "out").exists()  # not even the folder it created


def test_relion30_pixel_origins_become_angstrom(tmp_path):
    data = noisy(3, 16)
    with mrcfile.new(tmp_path / "s.mrcs", data=data) as m:
        m.set_image_stack()
    particles = pd.DataFrame(
        {
            "rlnImageName": ["1@s.mrcs", "2@s.mrcs", "3@s.mrcs"],
            "rlnDetectorPixelSize": 15.0,
            "rlnMagnification": 50000.0,  # 3 A/px
            "rlnVoltage": 300.0,
            "rlnOriginX": [1.0, -2.0, 0.0],
            "rlnOriginY": [0.5, 0.0, 4.0],
        }
    )
    write_star(tmp_path / "p.star", {"images": particles})
    summary = preprocess_stack(ParticleStack.open(tmp_path / "p.star"), tmp_path / "out", size=8)
    out = read_star(summary.star)
    assert out["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(6.0)
    p = out["particles"]
    np.testing.assert_allclose(p["rlnOriginXAngst"], [3.0, -6.0, 0.0])
    np.testing.assert_allclose(p["rlnOriginYAngst"], [1.5, 0.0, 12.0])
    assert "rlnOriginX" not in p and (p["rlnVoltage"] == 300).all()


def test_lowpass_beyond_nyquist_is_refused(tmp_path):
    stack = ParticleStack.open(make_star(tmp_path, noisy(2, 16)))
    with pytest.raises(UserError, match="--lowpass 3 A is finer than the output's Nyquist"):
        preprocess_stack(stack, tmp_path / "out", size=8, lowpass_A=3.0)


# ---- real files end to end ------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize(
    "name, kwargs, box_out",
    [
        ("relion31.star", dict(size=64), 64),
        ("empiar_10076_7.star", dict(apix=5.0), 84),
        ("empiar_10076_7.cs", dict(size=64), 64),
        ("empiar_10076_7.mrc", dict(size=32), 32),
        ("toy_projections.star", dict(size=16), 16),
    ],
)
def test_real_files_end_to_end(tmp_path, name, kwargs, box_out):
    apix = 1.31 if name.endswith(".mrc") else None
    stack = ParticleStack.open(DATA / name, apix=apix)
    summary = preprocess_stack(stack, tmp_path, **kwargs)
    assert summary.n_out == len(stack) and summary.box_out == box_out
    result = ParticleStack.open(summary.star)
    assert result.kind == "relion31" and len(result) == len(stack) and result.box == box_out
    np.testing.assert_allclose(result.apix, stack.apix * stack.box / box_out, rtol=1e-6)
    assert np.isfinite(result.read(np.arange(len(result)))).all()
    out_particles = result.particles
    if stack.kind in ("relion31", "relion30"):
        kept = set(stack.particles.columns) - {"rlnMagnification", "rlnDetectorPixelSize"}
        assert kept <= set(out_particles.columns)
        same = [c for c in kept if c != "rlnImageName"]
        pd.testing.assert_frame_equal(
            out_particles[same], stack.particles[same], check_dtype=False, rtol=1e-9
        )
    if stack.kind == "cryosparc":
        cs = np.load(summary.cs)
        original = np.load(DATA / name)
        assert cs.dtype.names == original.dtype.names
        np.testing.assert_array_equal(cs["uid"], original["uid"])
        assert (cs["blob/path"] == b"particles.mrcs").all() and (cs["blob/shape"] == box_out).all()
        np.testing.assert_array_equal(cs["blob/idx"], np.arange(len(cs)))
        np.testing.assert_array_equal(cs["ctf/df1_A"], original["ctf/df1_A"])
