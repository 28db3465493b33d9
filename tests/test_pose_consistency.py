"""The pose-consistency penalty (model.consistency) against hand computations, and its wiring."""

import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from tvae_em.cli import main
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.model.consistency import in_bin_turns, pose_consistency, posterior_mean_pose
from tvae_em.model.posterior import CellPosterior

N, CELLS, Z = 4, 9, 2  # rotation bins, cells per bin, z_dim


def posterior(logits: torch.Tensor, theta_mu: torch.Tensor, z_mu: torch.Tensor) -> CellPosterior:
    """A CellPosterior from (B, M) logits, theta offsets and (B, Z, M) latents."""
    return CellPosterior(
        logits=logits,
        log_q=torch.log_softmax(logits, 1),
        theta_mu=theta_mu,
        theta_logsd=torch.zeros_like(theta_mu),
        z_mu=z_mu,
        z_logsd=torch.zeros_like(z_mu),
    )


def test_posterior_mean_pose_by_hand():
    m = N * CELLS
    logits = torch.full((2, m), -1e4)
    logits[0, 1 * CELLS + 4] = 0.0  # image 0: all mass on bin 1, cell 4
    logits[1, 0 * CELLS + 2] = 0.0  # image 1: half on bin 0, half on bin 3
    logits[1, 3 * CELLS + 5] = 0.0
    theta_mu = torch.zeros(2, m)
    theta_mu[0, 1 * CELLS + 4] = 0.1
    z_mu = torch.arange(2 * Z * m, dtype=torch.float32).reshape(2, Z, m)
    theta, z = posterior_mean_pose(posterior(logits, theta_mu, z_mu), N)
    assert theta[0].item() == pytest.approx(math.pi / 2 + 0.1, abs=1e-6)
    # bins 0 (0 rad) and 3 (3 pi / 2 = -pi/2): the circular mean is -pi/4, not 3 pi / 4
    assert theta[1].item() == pytest.approx(-math.pi / 4, abs=1e-6)
    assert torch.allclose(z[0], z_mu[0, :, 1 * CELLS + 4])
    assert torch.allclose(z[1], 0.5 * (z_mu[1, :, 2] + z_mu[1, :, 3 * CELLS + 5]))


def test_penalty_equals_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    m = N * CELLS
    post = posterior(torch.randn(3, m, generator=g) * 3, 0.2 * torch.randn(3, m, generator=g),
                     torch.randn(3, Z, m, generator=g))  # fmt: skip
    offset, dz = torch.tensor([0.3, -0.2, 0.05]), torch.tensor([[0.5, -1.0]])
    turned = posterior(post.logits, post.theta_mu + offset[:, None], post.z_mu + dz[..., None])
    delta = torch.tensor([0.1, 0.1, -0.4])
    y = torch.zeros(3, 8, 8)
    pen = pose_consistency(lambda _: turned, y, post, N, 100.0, 3.0, delta)
    # the angle moves by `offset` for every cell (the circular mean follows), z by dz
    hand = 100.0 * (1 - torch.cos(offset - delta)) + 3.0 * (dz**2).sum()
    assert torch.allclose(pen, hand, atol=1e-4)
    # a perfectly consistent encoder (answers theta + delta, the same z) pays nothing
    exact = posterior(post.logits, post.theta_mu + delta[:, None], post.z_mu)
    assert pose_consistency(lambda _: exact, y, post, N, 100.0, 3.0, delta).abs().max() < 1e-4


def test_turns_stay_inside_a_bin():
    torch.manual_seed(0)
    d = in_bin_turns(10_000, 8)
    edge = math.pi / 8
    assert d.abs().max() <= edge and d.min() < -0.9 * edge and d.max() > 0.9 * edge


def test_the_encoder_sees_the_turned_image():
    """The penalty's second encoding is of y turned by +delta (the pose convention)."""
    y = torch.zeros(1, 16, 16)
    y[0, 8, 12] = 1.0  # a dot at (x, y) = (+4, 0)
    seen = []

    def spy(img):
        seen.append(img)
        return post

    m = N * CELLS
    post = posterior(torch.zeros(1, m), torch.zeros(1, m), torch.zeros(1, Z, m))
    pose_consistency(spy, y, post, N, 1.0, 1.0, torch.tensor([math.pi / 2]))
    row, col = divmod(int(seen[0][0].argmax()), 16)
    assert (col - 8, row - 8) == (0, 4)  # turned +90 deg: (4, 0) -> (0, 4)


def test_training_objective_and_eval():
    cfg = ModelConfig(
        box=16, z_dim=2, renderer="fourier", consistency_theta=50.0, consistency_z=5.0
    )
    model = TargetVAE(cfg).train()
    y = torch.randn(4, 16, 16)
    out = model(y)
    assert (out["consistency"] > 0).all()
    assert torch.allclose(out["objective"], out["elbo"] - out["consistency"])
    out["objective"].mean().backward()  # differentiable
    model.eval()
    with torch.no_grad():
        ev = model(y)
    assert (ev["consistency"] == 0).all() and torch.equal(ev["objective"], ev["elbo"])
    off = TargetVAE(replace(cfg, consistency_theta=0.0, consistency_z=0.0)).train()
    out = off(y)
    assert (out["consistency"] == 0).all() and torch.equal(out["objective"], out["elbo"])


@pytest.mark.parametrize("option", ["--angle-consistency", "--z-consistency"])
def test_negative_weight_is_a_one_line_error(tmp_path, option):
    star = tmp_path / "x.star"
    star.write_text("data_\nloop_\n_rlnImageName\n1@x.mrcs\n")
    res = CliRunner().invoke(main, ["train", str(star), "-o", str(tmp_path / "run"), option, "-1"])
    assert res.exit_code == 2
    assert option in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
