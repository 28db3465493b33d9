"""benchmarks/bench_relion2d.py reads poses back the way they were written and runs RELION's
Class2D with the GUI's defaults (the RELION run itself is not part of the suite)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em.geometry import relion_pose
from tvae_em.io import build_optics, write_star

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    path = ROOT / "benchmarks" / "bench_relion2d.py"
    spec = importlib.util.spec_from_file_location("bench_relion2d", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_poses_from_star_inverts_relion_pose_in_any_row_order(tmp_path):
    rng = np.random.default_rng(0)
    n, apix = 40, 4.0
    theta = rng.uniform(-math.pi, math.pi, n)
    t = rng.normal(0, 2, (n, 2))
    psi, origin = relion_pose(theta, t, apix)
    microscope = pd.DataFrame(
        {"rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]}
    )
    _, optics = build_optics(microscope, np.array([apix]), 32)
    order = rng.permutation(n)  # RELION may write the rows in another order
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in order],
            "rlnOpticsGroup": 1,
            "rlnAnglePsi": psi[order],
            "rlnOriginXAngst": origin[order, 0],
            "rlnOriginYAngst": origin[order, 1],
            "rlnClassNumber": (np.arange(n) % 3 + 1)[order],
        }
    )
    star = tmp_path / "run_it025_data.star"
    write_star(star, {"optics": optics, "particles": parts})
    got = _bench().poses_from_star(star, n)
    np.testing.assert_allclose(np.angle(np.exp(1j * (got["theta"] - theta))), 0, atol=1e-6)
    np.testing.assert_allclose(got["t"], t, atol=1e-6)
    np.testing.assert_array_equal(got["class"], np.arange(n) % 3)


def test_relion_command_is_the_class2d_gui_defaults():
    cmd = _bench().relion_command("p.star", "out/run", 6, 32, 4.0, 2, 0)
    opt = {a: b for a, b in zip(cmd, [*cmd[1:], ""], strict=True) if a.startswith("--")}
    assert cmd[0] == "relion_refine"
    assert opt["--iter"] == "25" and opt["--tau2_fudge"] == "2" and opt["--K"] == "6"
    assert opt["--psi_step"] == "12" and opt["--oversampling"] == "1"  # 6 deg after oversampling
    assert opt["--offset_range"] == "5" and opt["--offset_step"] == "2"  # 1 px after oversampling
    assert {"--ctf", "--flatten_solvent", "--zero_mask", "--norm", "--scale"} <= set(opt)
    assert int(opt["--particle_diameter"]) < 32 * 4.0 and opt["--j"] == "2"
