"""The continuous-heterogeneity data set: a two-domain object with a per-particle hinge angle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tvae_em.cli import main
from tvae_em.errors import UserError
from tvae_em.synthetic import hinge_templates, simulate_hinge


def test_the_hinge_moves_only_the_second_domain():
    box = 48
    a, b, c = hinge_templates(np.array([0.0, 30.0, 60.0]), box)
    assert np.allclose(a.sum(), c.sum(), rtol=1e-3)  # same mass: a rigid motion of one domain
    left = np.s_[:, : box // 2 - 4]
    assert np.abs(a[left] - c[left]).max() < 0.05 * a.max()  # the fixed domain stays
    # the further the hinge turns, the more the image changes
    d_ab, d_ac = np.linalg.norm(a - b), np.linalg.norm(a - c)
    assert 0.3 * d_ac < d_ab < d_ac


def test_simulate_hinge_writes_the_hinge_angle(tmp_path):
    res = CliRunner().invoke(
        main, ["simulate", "hinge", "-o", str(tmp_path / "h"), "--n", "40", "--box", "32",
               "--hinge-max", "45", "--seed", "3"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    truth = pd.read_csv(tmp_path / "h" / "truth.csv")
    assert len(truth) == 40 and (truth["class"] == 0).all()
    assert truth["hinge_deg"].between(0, 45).all() and truth["hinge_deg"].std() > 5
    images, again = simulate_hinge(40, 32, seed=3, max_angle_deg=45)
    np.testing.assert_allclose(truth["hinge_deg"], again["hinge_deg"], rtol=1e-6)


def test_bad_hinge_range_is_refused():
    with pytest.raises(UserError, match="--hinge 0"):
        simulate_hinge(10, 32, max_angle_deg=0)


def test_latent_parameter_correlation_finds_the_carrying_coordinate():
    from tvae_em.metrics import latent_parameter_correlation

    rng = np.random.default_rng(0)
    param = rng.uniform(0, 60, 500)
    z = np.stack([rng.normal(size=500), -np.sqrt(param) + 0.01 * rng.normal(size=500)], 1)
    out = latent_parameter_correlation(z, param)
    assert out["rho_best_dim"] == 2 and out["rho_best"] > 0.99  # rank: monotone, sign ignored
    assert out["rho_pc1"] > 0.9  # the widest direction (sd 2.2 against 1) is the motion
    noise = latent_parameter_correlation(rng.normal(size=(500, 2)), param)
    assert noise["rho_best"] < 0.15 and noise["rho_direction"] < 0.15
    # the motion along a diagonal of z and a wide nuisance along the other: each coordinate
    # mixes the two, the best direction finds the motion
    axes = np.stack([param + rng.normal(size=500), 20 * rng.normal(size=500)], 1)
    turned = axes @ (np.array([[1.0, 1.0], [-1.0, 1.0]]) / np.sqrt(2))
    diag = latent_parameter_correlation(turned, param)
    assert diag["rho_direction"] > 0.95 > 0.8 > diag["rho_best"]
