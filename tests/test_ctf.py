"""The CTF against an independent computation, hand-computed zeros, symmetry, metadata reading."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from tvae_em.ctf import CtfParams, compute_ctf, electron_wavelength_A
from tvae_em.errors import UserError
from tvae_em.fourier import apply_ctf
from tvae_em.io import MrcsStack, cryosparc_ctf_params, relion_ctf_params

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


def _params(dfu, dfv, dfang, volt=300.0, cs=2.7, w=0.1, phase=0.0, bfac=0.0) -> dict:
    vals = dict(
        dfu_A=dfu,
        dfv_A=dfv,
        dfang_deg=dfang,
        volt_kv=volt,
        cs_mm=cs,
        amp_contrast=w,
        phase_shift_deg=phase,
        bfactor=bfac,
    )
    return {k: torch.atleast_1d(torch.as_tensor(v, dtype=torch.float32)) for k, v in vals.items()}


def _reference_ctf(box, apix, dfu, dfv, dfang, volt, cs, w, phase=0.0, bfac=0.0) -> np.ndarray:
    """RELION's CTF::getCTF written out in numpy, float64, with RELION's own constants:
    K1 = pi lambda, K2 = pi/2 Cs lambda^3, K3 = atan(Q0 / sqrt(1 - Q0^2)), K5 = phase shift,
    deltaf = -(mean defocus + half difference * cos(2 (angle - azimuth))), ctf = -sin(argument)."""
    v = volt * 1e3
    lam = 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))
    k1, k2 = math.pi * lam, math.pi / 2 * cs * 1e7 * lam**3
    k3, k5 = math.atan(w / math.sqrt(1 - w * w)), math.radians(phase)
    f = np.fft.fftfreq(box) / apix
    y, x = np.meshgrid(f, f, indexing="ij")  # rows: y frequency, columns: x frequency
    u2 = x**2 + y**2
    deltaf = -(
        0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * np.cos(2 * (np.arctan2(y, x) - math.radians(dfang)))
    )
    argument = k1 * deltaf * u2 + k2 * u2**2 - k5 - k3
    return -np.sin(argument) * np.exp(-bfac / 4 * u2)


@pytest.mark.parametrize("defocus", [5000.0, 12000.0, 25000.0, 40000.0])
def test_matches_independent_relion_formula(defocus):
    box, apix = 65, 1.7  # odd box: no Nyquist line, every frequency has its mirror
    args = (defocus + 300.0, defocus - 250.0, 33.0, 300.0, 2.7, 0.07, 20.0, 50.0)
    ours = compute_ctf(box, apix, _params(*args))[0].double().numpy()
    ref = _reference_ctf(box, apix, *args)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_even_box_matches_off_the_nyquist_lines():
    box, apix = 64, 1.3
    args = (15000.0, 14000.0, -70.0, 200.0, 2.0, 0.1)
    ours = compute_ctf(box, apix, _params(*args))[0].double().numpy()
    ref = _reference_ctf(box, apix, *args)
    inner = np.ones((box, box), bool)
    inner[box // 2, :] = inner[:, box // 2] = False
    np.testing.assert_allclose(ours[inner], ref[inner], atol=2e-4)


def test_sign_convention_relion():
    # RELION: ctf(0) = +w and positive at low frequency for underfocus (white particles stay white)
    c = compute_ctf(128, 1.0, _params(20000.0, 20000.0, 0.0, w=0.1))[0]
    assert c[0, 0].item() == pytest.approx(0.1, abs=1e-6)
    assert c[0, 1].item() > 0.1 and c[1, 0].item() > 0.1


def test_wavelength_300kv():
    # V = 3e5 V: V (1 + 0.978466e-6 V) = 3e5 * 1.2935398 = 388061.94, sqrt = 622.946,
    # lambda = 12.2643247 / 622.946 = 0.019687 Angstrom (the textbook 300 kV value)
    assert electron_wavelength_A(300.0) == pytest.approx(0.019687, abs=1e-6)


def test_first_zero_hand_computed():
    # w = 0, Cs = 0, no astigmatism: ctf = sin(pi df lambda s^2), first zero at
    # s0 = 1/sqrt(df lambda).
    # df = 10000 A, lambda(300 kV) = 0.019687 A -> df lambda = 196.87 A^2, s0 = 0.071270 1/A.
    box, apix = 512, 1.0  # frequency step 1/512 A^-1
    c = compute_ctf(box, apix, _params(10000.0, 10000.0, 0.0, cs=0.0, w=0.0))[0, 0].double()
    s = torch.fft.fftfreq(box, d=apix).double()
    half = c[: box // 2]
    k = int(torch.nonzero(half[1:] <= 0)[0]) + 1  # first sample at or past the zero
    assert half[1:k].min() > 0  # positive lobe before the zero
    s_zero = s[k - 1] + (s[k] - s[k - 1]) * half[k - 1] / (half[k - 1] - half[k])
    assert s_zero.item() == pytest.approx(0.071270, abs=2e-5)


def test_astigmatism_axes_and_rotation():
    box, apix = 63, 1.5  # float32: 2e-4 is the rounding of cos(2 angle) times gamma
    u, v = 20000.0, 12000.0
    c0 = compute_ctf(box, apix, _params(u, v, 0.0))[0]
    # dfang = 0: defocus U along x (columns), V along y (rows)
    cu = compute_ctf(box, apix, _params(u, u, 0.0))[0]
    cv = compute_ctf(box, apix, _params(v, v, 0.0))[0]
    torch.testing.assert_close(c0[0, :], cu[0, :], atol=2e-4, rtol=0)
    torch.testing.assert_close(c0[:, 0], cv[:, 0], atol=2e-4, rtol=0)
    # rotating dfang by 90 degrees swaps the axes
    c90 = compute_ctf(box, apix, _params(u, v, 90.0))[0]
    torch.testing.assert_close(
        c90, compute_ctf(box, apix, _params(v, u, 0.0))[0], atol=2e-4, rtol=0
    )
    # the CTF image rotated by +90 degrees (R acting on (fx, fy)) is the CTF with dfang + 90:
    # rotated[fy, fx] = c0 at R(-90)(fx, fy) = (fy, -fx), i.e. rotated[i, j] = c0[-j, i]
    idx = torch.arange(box)
    rotated = c0[(-idx[None, :]) % box, idx[:, None]]
    torch.testing.assert_close(rotated, c90, atol=2e-4, rtol=0)
    assert (c0 - c90).abs().max() > 0.5  # the astigmatism is visible


@pytest.mark.parametrize("n", [24, 25])
def test_downsampling_consistency(n):
    # box 2n at a A/px and box n at 2a A/px share the frequencies k / (2 n a), |k| < n/2
    p = _params(18000.0, 16500.0, 40.0, phase=10.0, bfac=80.0)
    big = compute_ctf(2 * n, 1.1, p)[0]
    small = compute_ctf(n, 2.2, p)[0]
    k = torch.arange(-((n - 1) // 2), (n - 1) // 2 + 1)
    torch.testing.assert_close(
        small[k % n][:, k % n], big[k % (2 * n)][:, k % (2 * n)], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("box", [7, 8, 33, 64])
def test_hermitian_even_and_odd(box):
    p = _params(
        torch.tensor([15000.0, 9000.0]),
        torch.tensor([13000.0, 9500.0]),
        torch.tensor([25.0, -60.0]),
    )
    c = compute_ctf(box, torch.tensor([1.2, 2.5]), p)
    assert c.shape == (2, box, box)
    neg = (-torch.arange(box)) % box
    assert torch.equal(c, c[:, neg][:, :, neg])
    img = torch.randn(2, box, box)
    spectrum = torch.fft.ifft2(torch.fft.fft2(img) * c)
    assert spectrum.imag.abs().max() < 1e-5
    torch.testing.assert_close(apply_ctf(img, c), spectrum.real)


def test_ctfparams_to_compute_ctf_batch():
    cp = CtfParams(
        dfu_A=np.array([10000.0, 20000.0, 30000.0]),
        dfv_A=np.array([10000.0, 19000.0, 30000.0]),
        dfang_deg=np.zeros(3),
        volt_kv=np.full(3, 300.0),
        cs_mm=np.full(3, 2.7),
        amp_contrast=np.full(3, 0.1),
        phase_shift_deg=np.zeros(3),
        bfactor=np.zeros(3),
    )
    c = compute_ctf(32, 2.0, cp.subset([2, 0]))
    torch.testing.assert_close(c[1], compute_ctf(32, 2.0, _params(10000.0, 10000.0, 0.0))[0])
    assert not torch.allclose(c[0], c[1])
    with pytest.raises(KeyError, match="missing CTF parameter"):
        compute_ctf(32, 2.0, {"dfu_A": torch.tensor([1e4])})


# ------------------------------------------------------------------ reading the metadata


def test_relion30_per_particle_optics_columns():
    particles = pd.DataFrame(
        {
            "rlnDefocusU": [15000.0, 16000.0],
            "rlnDefocusV": [14000.0, 15500.0],
            "rlnDefocusAngle": [10.0, 20.0],
            "rlnVoltage": [300.0, 300.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.07, 0.07],
        }
    )
    p = relion_ctf_params(particles, None, "x.star")
    np.testing.assert_allclose(p.dfv_A, [14000.0, 15500.0])
    np.testing.assert_allclose(p.amp_contrast, [0.07, 0.07])
    np.testing.assert_allclose(p.phase_shift_deg, 0.0)


def test_no_defocus_gives_none_and_missing_optics_is_user_error():
    plain = pd.DataFrame({"rlnImageName": ["1@a.mrcs"]})
    assert relion_ctf_params(plain, None, "x.star") is None
    assert MrcsStack.ctf_params(SimpleNamespace(particles=plain)) is None
    no_volt = pd.DataFrame({"rlnDefocusU": [1e4], "rlnOpticsGroup": [1]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnSphericalAberration": [2.7]})
    with pytest.raises(UserError, match=r"x\.star.*rlnVoltage"):
        relion_ctf_params(no_volt, optics, "x.star")


def test_cryosparc_fields_radians_to_degrees():
    particles = pd.DataFrame(
        {
            "ctf/df1_A": [12000.0],
            "ctf/df2_A": [11000.0],
            "ctf/df_angle_rad": [math.pi / 6],
            "ctf/accel_kv": [300.0],
            "ctf/cs_mm": [2.7],
            "ctf/amp_contrast": [0.1],
            "ctf/phase_shift_rad": [math.pi / 2],
        }
    )
    p = cryosparc_ctf_params(particles, "x.cs")
    assert p.dfang_deg[0] == pytest.approx(30.0) and p.phase_shift_deg[0] == pytest.approx(90.0)
    assert p.dfv_A[0] == 11000.0 and p.bfactor[0] == 0.0


@needs_data
def test_optics_groups_joined_by_group_number():
    blocks = starfile.read(DATA / "relion31.6opticsgroups.star", always_dict=True)
    particles, optics = blocks["particles"], blocks["optics"]
    optics = optics.assign(rlnVoltage=100.0 + 10 * optics["rlnOpticsGroup"])  # distinct per group
    p = relion_ctf_params(particles, optics, "x.star")
    np.testing.assert_allclose(p.volt_kv, 100.0 + 10 * particles["rlnOpticsGroup"].to_numpy())
    np.testing.assert_allclose(p.dfu_A, particles["rlnDefocusU"].to_numpy())


def _open(name: str):
    io = pytest.importorskip("tvae_em.io", reason="tvae_em.io not available")
    if not hasattr(io, "ParticleStack"):
        pytest.skip("tvae_em.io has no ParticleStack yet")
    return io.ParticleStack.open(DATA / name)


@needs_data
def test_reads_relion31_star():
    p = _open("relion31.star").ctf_params()
    assert len(p) == 5
    assert p.dfu_A[0] == pytest.approx(13108.082418)
    assert p.dfv_A[0] == pytest.approx(12845.582418)
    assert p.dfang_deg[0] == pytest.approx(-160.39)
    np.testing.assert_allclose(p.volt_kv, 300.0)
    np.testing.assert_allclose(p.cs_mm, 0.01)
    np.testing.assert_allclose(p.amp_contrast, 0.1)


@needs_data
def test_relion30_star_and_cryosparc_cs_agree():
    star = _open("empiar_10076_7.star").ctf_params()
    cs = _open("empiar_10076_7.cs").ctf_params()
    assert len(star) == len(cs) == 7
    assert star.dfu_A[0] == pytest.approx(15301.1) and star.amp_contrast[0] == pytest.approx(0.07)
    for field in ("dfu_A", "dfv_A", "dfang_deg", "volt_kv", "cs_mm", "amp_contrast"):
        np.testing.assert_allclose(getattr(cs, field), getattr(star, field), rtol=1e-5, atol=1e-3)
    c_star = compute_ctf(64, 5.24, star.subset([0]))
    c_cs = compute_ctf(64, 5.24, cs.subset([0]))
    torch.testing.assert_close(c_star, c_cs, atol=1e-4, rtol=0)
