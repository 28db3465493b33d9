"""Priors, KL terms, sampling, read-out, likelihoods and the ELBO against hand computations."""

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from tvae_em.errors import UserError
from tvae_em.fourier import apply_ctf
from tvae_em.model import ModelConfig, TargetVAE, choose_likelihood
from tvae_em.model.posterior import (
    kl_terms,
    log_prior_r,
    log_prior_t,
    posterior_from_maps,
    read_out,
    sample_pose_latent,
)

N, D, Z = 4, 3, 1


def tiny_maps(seed: int = 0, logit_scale: float = 1.0) -> torch.Tensor:
    """Hand-set-style random maps (B=2, 3 + 2Z, N, D, D) for the tiny case N=4, D=3, z_dim=1."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(2, 3 + 2 * Z, N, D, D, generator=g)
    maps[:, 0] *= logit_scale
    return maps


def hand_kl(maps: np.ndarray, t_sd: float, log_pr: np.ndarray) -> np.ndarray:
    """(B, 3) KL terms by explicit loops over cells, independent of the model code."""
    out = np.zeros((maps.shape[0], 3))
    c = D // 2
    pt = np.array(
        [
            [math.exp(-((j - c) ** 2 + (i - c) ** 2) / (2 * t_sd**2)) for j in range(D)]
            for i in range(D)
        ]
    )
    pt /= pt.sum()
    sp = math.pi / N
    for b in range(maps.shape[0]):
        logits = maps[b, 0] + log_pr[:, None, None]
        q = np.exp(logits - logits.max())
        q /= q.sum()
        for r in range(N):
            for i in range(D):
                for j in range(D):
                    qc = q[r, i, j]
                    p = pt[i, j] * math.exp(log_pr[r])
                    out[b, 0] += qc * (math.log(qc) - math.log(p))
                    mu, s = maps[b, 1, r, i, j], math.exp(maps[b, 2, r, i, j])
                    out[b, 1] += qc * (math.log(sp / s) + (s**2 + mu**2) / (2 * sp**2) - 0.5)
                    mz, sz = maps[b, 3, r, i, j], math.exp(maps[b, 4, r, i, j])
                    out[b, 2] += qc * (-math.log(sz) + (sz**2 + mz**2) / 2 - 0.5)
    return out


@pytest.mark.parametrize("r_prior", ["uniform", "gaussian"])
def test_kl_terms_match_hand_computation(r_prior):
    maps = tiny_maps()
    log_pr = log_prior_r(N, r_prior, sd=0.8)
    log_pt = log_prior_t(D, 1.3)
    kl = torch.stack(kl_terms(posterior_from_maps(maps, log_pr), log_pt, log_pr), 1)
    expected = hand_kl(maps.double().numpy(), 1.3, log_pr.double().numpy())
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_priors_are_normalised_and_shaped():
    assert torch.isclose(log_prior_t(7, 1.5).exp().sum(), torch.tensor(1.0))
    pr = log_prior_r(8, "gaussian", sd=0.5).exp()
    assert torch.isclose(pr.sum(), torch.tensor(1.0))
    assert pr.argmax() == 0 and torch.isclose(pr[1], pr[7])  # symmetric around bin 0
    assert torch.allclose(log_prior_r(8).exp(), torch.full((8,), 1 / 8))


def test_extreme_logits_give_finite_kl():
    maps = tiny_maps(logit_scale=1e4)
    maps[:, 2] = 50.0  # log-sds beyond the clamp
    maps[:, 4] = -50.0
    log_pr, log_pt = log_prior_r(N), log_prior_t(D, 1.0)
    post = posterior_from_maps(maps, log_pr)
    kl = torch.stack(kl_terms(post, log_pt, log_pr), 1)
    assert torch.isfinite(kl).all()
    # q is one-hot on the winning cell: KL(q(t,r) || p) = -log p(t*, r*)
    win = post.logits.argmax(1)
    log_p = (log_pr[:, None] + log_pt.reshape(1, -1)).reshape(-1)
    torch.testing.assert_close(kl[:, 0], -log_p[win])
    # gradients are finite too
    maps.requires_grad_(True)
    sum(kl_terms(posterior_from_maps(maps, log_pr), log_pt, log_pr)).sum().backward()
    assert torch.isfinite(maps.grad).all()


def test_read_out_on_hand_set_maps():
    maps = torch.zeros(1, 3 + 2 * Z, N, D, D)
    maps[0, 0, 3, 0, 2] = 20.0  # winning cell: bin 3, row 0, column 2 -> t = (+1, -1)
    maps[0, 1, 3, 0, 2] = 0.1
    maps[0, 3, 3, 0, 2] = 1.5
    maps[0, 4, 3, 0, 2] = math.log(0.3)
    post = posterior_from_maps(maps, log_prior_r(N))
    e = read_out(post, N, D)
    assert int(e["r"]) == 3
    assert math.isclose(float(e["theta"]), 3 * math.pi / 2 + 0.1 - 2 * math.pi, abs_tol=1e-5)
    torch.testing.assert_close(e["t"], torch.tensor([[1.0, -1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(e["z_mu"], torch.tensor([[1.5]]))
    torch.testing.assert_close(e["z_sd"], torch.tensor([[0.3]]))
    assert float(e["confidence"]) > 0.999


def test_sampled_angle_is_a_circular_mean():
    """Mass split between bins 0 and N-1 at one position gives angles near 0, never near pi."""
    maps = torch.zeros(500, 3 + 2 * Z, 8, D, D)
    maps[:, 0] = -1e4
    maps[:, 0, 0, 1, 1] = 0.0
    maps[:, 0, 7, 1, 1] = 0.0
    maps[:, 2] = -10.0  # tiny sd
    post = posterior_from_maps(maps, log_prior_r(8))
    theta, t, z = sample_pose_latent(post, 8, D, tau=1.0)
    assert theta.min() >= -math.pi / 4 - 1e-3 and theta.max() <= 1e-3
    assert theta.std() > 0.1  # the relaxed weights really vary between the two bins
    torch.testing.assert_close(t, torch.zeros(500, 2), atol=1e-5, rtol=0)
    assert z.shape == (500, Z)


def tiny_model(likelihood="gaussian", learn_sigma=False, box=12) -> TargetVAE:
    cfg = ModelConfig(
        box=box,
        z_dim=2,
        rotations=4,
        likelihood=likelihood,
        learn_sigma=learn_sigma,
        encoder_fields=2,
        encoder_hidden_fields=2,
        generator_hidden=16,
        fourier_features=16,
    )
    return TargetVAE(cfg)


class EchoGenerator(nn.Module):
    """Stand-in generator that outputs a stored image (flattened) whatever the coordinates."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values  # (B, P)

    def forward(self, x, z):
        return self.values


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_elbo_of_a_model_that_reproduces_its_input(learn_sigma):
    model = tiny_model(learn_sigma=learn_sigma).eval()
    y = torch.randn(3, 12, 12)
    model.generator = EchoGenerator(y.reshape(3, -1))
    if learn_sigma:
        model.likelihood.log_sigma.data.fill_(-0.7)
    out = model(y)
    s = -0.7 if learn_sigma else 0.0
    expected = -144 * (s + 0.5 * math.log(2 * math.pi))  # the Gaussian normaliser, 144 pixels
    torch.testing.assert_close(out["log_lik"], torch.full((3,), expected))
    kl = out["kl_tr"] + out["kl_theta"] + out["kl_z"]
    torch.testing.assert_close(out["elbo"], out["log_lik"] - kl)
    assert (out["kl_tr"] >= 0).all() and (out["kl_theta"] >= 0).all() and (out["kl_z"] >= 0).all()


def test_bernoulli_reproducing_model_has_near_zero_log_lik():
    model = tiny_model("bernoulli").eval()
    y = (torch.rand(2, 12, 12) > 0.5).float()
    model.generator = EchoGenerator((y.reshape(2, -1) * 2 - 1) * 40.0)  # confident logits
    assert model(y)["log_lik"].abs().max() < 1e-10 * 144 + 1e-6


def test_pixel_subsampling_is_unbiased():
    torch.manual_seed(0)
    model = tiny_model(box=16)
    k = 4000  # one image, pose and z repeated: each row draws its own pixel subset
    y = torch.randn(1, 16, 16).expand(k, 16, 16)
    theta, t, z = torch.full((k,), 0.3), torch.tensor([[1.0, -2.0]]).expand(k, 2), torch.randn(1, 2)
    with torch.no_grad():
        full = model.log_likelihood(y[:1], theta[:1], t[:1], z)
        draws = model.log_likelihood(y, theta, t, z.expand(k, 2), fraction=0.25)  # (k,)
    assert draws.std() > 1e-3 * full.abs()  # the estimate really is random
    se = draws.std() / math.sqrt(k)
    assert (draws.mean() - full).abs() < 4 * se


def test_training_mode_uses_the_pixel_fraction_and_eval_all_pixels():
    model = tiny_model(box=16)
    model.generator = EchoGenerator(torch.zeros(1, 1))  # broadcasts to any pixel count
    y = torch.ones(1, 16, 16)
    assert math.isclose(
        float(model.eval()(y)["log_lik"]), -256 * (0.5 + 0.5 * math.log(2 * math.pi)), rel_tol=1e-6
    )
    # all pixels equal: the scaled subset sum is exact whatever the subset
    assert math.isclose(
        float(model.train()(y)["log_lik"]), -256 * (0.5 + 0.5 * math.log(2 * math.pi)), rel_tol=1e-6
    )


def test_ctf_is_applied_in_fourier_space():
    model = tiny_model(box=16).eval()
    y = torch.randn(2, 16, 16)
    theta, t, z = torch.zeros(2), torch.zeros(2, 2), torch.randn(2, 2)
    freq = torch.fft.fftfreq(16)
    ctf = torch.cos(40 * (freq[:, None] ** 2 + freq[None] ** 2)).expand(2, 16, 16)
    with torch.no_grad():
        img = model.render(z, theta, t)
        filtered = torch.fft.ifft2(torch.fft.fft2(img) * ctf).real
        expected = (-0.5 * (y - filtered) ** 2 - 0.5 * math.log(2 * math.pi)).sum((1, 2))
        got = model.log_likelihood(y, theta, t, z, ctf=ctf)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(apply_ctf(img, torch.ones_like(ctf)), img, atol=1e-5, rtol=0)


def test_ctf_with_bernoulli_is_a_user_error():
    model = tiny_model("bernoulli", box=16).eval()
    with pytest.raises(UserError, match="gaussian"):
        model(torch.rand(1, 16, 16), ctf=torch.ones(1, 16, 16))


def test_forward_and_embed_outputs():
    model = tiny_model()
    y = torch.randn(5, 12, 12)
    out = model(y)
    assert set(out) == {
        "elbo", "log_lik", "kl_tr", "kl_theta", "kl_z", "pose_nll", "consistency", "objective"
    }  # fmt: skip
    assert all(v.shape == (5,) and torch.isfinite(v).all() for v in out.values())
    out["elbo"].mean().backward()
    e = model.eval().embed(y, with_elbo=True)
    shapes = {k: tuple(v.shape) for k, v in e.items()}
    assert shapes == {
        "theta": (5,),
        "t": (5, 2),
        "z_mu": (5, 2),
        "z_sd": (5, 2),
        "confidence": (5,),
        "r": (5,),
        "elbo": (5,),
    }
    assert (e["theta"] >= -math.pi).all() and (e["theta"] < math.pi).all()
    with pytest.raises(UserError, match="box 12"):
        model(torch.randn(1, 14, 14))


def test_choose_likelihood():
    assert choose_likelihood(np.random.rand(4, 8, 8)) == "bernoulli"
    assert choose_likelihood(torch.randn(4, 8, 8)) == "gaussian"
    assert choose_likelihood(np.array([[0.0, 1.0001]])) == "gaussian"


def test_config_round_trip_and_validation():
    cfg = ModelConfig(box=50)
    assert cfg.encoder_kernel % 2 == 1 and cfg.encoder_kernel <= 50
    assert cfg.t_sd_px == pytest.approx(2.5)
    again = ModelConfig.from_dict(asdict(cfg))
    assert again == cfg
    with pytest.raises(UserError, match="rotations"):
        ModelConfig(box=50, rotations=6)
    with pytest.raises(UserError, match="receptive field"):
        ModelConfig(box=20, encoder_kernel=25)
    with pytest.raises(UserError, match="too small"):
        ModelConfig(box=5)
    with pytest.raises(UserError, match="pixel_fraction"):
        ModelConfig(box=32, pixel_fraction=0.0)
    with pytest.raises(UserError, match="unknown"):
        ModelConfig.from_dict({**asdict(cfg), "bogus": 1})


def test_state_dict_round_trip_and_no_derived_buffers():
    a, b = tiny_model(), tiny_model()
    for p in b.parameters():
        p.data.normal_()
    b.load_state_dict(a.state_dict())
    y = torch.randn(2, 12, 12)
    a.eval(), b.eval()
    torch.testing.assert_close(a.encoder(y), b.encoder(y))
    assert not any("sampled_basis" in k or k.endswith("filter") for k in a.state_dict())


def test_bf16_autocast_keeps_pose_maths_in_float32():
    """Under autocast (bf16 on CUDA; tested here on CPU) the pose read-out matches float32."""
    model = tiny_model(box=16).eval()
    y = torch.randn(4, 16, 16)
    with torch.no_grad():
        ref = model.embed(y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.embed(y)
            out = model.train()(y)
    assert all(v.dtype == torch.float32 for v in out.values())
    assert all(torch.isfinite(v).all() for v in out.values())
    assert low["t"].dtype == torch.float32 and low["theta"].dtype == torch.float32
    torch.testing.assert_close(low["t"], ref["t"], atol=0.05, rtol=0)
    torch.testing.assert_close(low["z_mu"], ref["z_mu"], atol=0.05, rtol=0.05)


def window_model(box: int = 32, **kw) -> TargetVAE:
    """A small default-prior model at `box` (cells on the shift window unless kw says otherwise)."""
    cfg = dict(box=box, z_dim=2, rotations=8, encoder_fields=4, encoder_hidden_fields=4)
    return TargetVAE(ModelConfig(**cfg, generator_hidden=16, fourier_features=16, **kw)).eval()


def window_of(x: torch.Tensor, side: int) -> torch.Tensor:
    """The centred side x side window (centre pixel D//2) of (..., D, D)."""
    o = x.shape[-1] // 2 - side // 2
    return x[..., o : o + side, o : o + side]


def test_windowed_posterior_is_the_full_posterior_restricted_and_renormalised():
    win, full = window_model(), window_model(shift_window=1000.0)
    full.load_state_dict(win.state_dict())
    s, n, b = win.cfg.cell_side, 8, 3
    assert (s, full.cfg.cell_side) == (15, 32)
    y = torch.randn(b, 32, 32)
    with torch.no_grad():
        pw, pf = win.posterior(y), full.posterior(y)
    assert pw.log_q.shape == (b, n * s * s)

    def restrict(v: torch.Tensor) -> torch.Tensor:  # (B, [Z,] N*D*D) -> (B, [Z,] N*S*S)
        return window_of(v.reshape(*v.shape[:-1], n, 32, 32), s).reshape(*v.shape[:-1], -1)

    torch.testing.assert_close(pw.log_q, torch.log_softmax(restrict(pf.log_q), 1))
    for name in ("logits", "theta_mu", "theta_logsd", "z_mu", "z_logsd"):
        torch.testing.assert_close(getattr(pw, name), restrict(getattr(pf, name)))
    # the shift prior: the full one restricted and renormalised; the mass it drops is tiny
    torch.testing.assert_close(win.log_pt.exp(), (p := window_of(full.log_pt.exp(), s)) / p.sum())
    assert 0 < 1 - float(p.sum()) < 2e-4


def test_cell_side_and_config_round_trip_with_and_without_the_window():
    cfg = ModelConfig(box=32)
    assert cfg.shift_window == 4.0 and cfg.to_dict()["shift_window"] == 4.0
    assert cfg.cell_side == 15  # R = ceil(4 x 1.6 px) = 7
    assert ModelConfig(box=64).cell_side == 27 and ModelConfig(box=40).cell_side == 17
    assert ModelConfig(box=32, shift_window=2.5).cell_side == 9  # ceil(4.0) = 4, not 5
    assert ModelConfig(box=32, t_sd_px=4.0).cell_side == 32  # 33 > 32: the full grid
    assert ModelConfig(box=33, t_sd_px=4.0).cell_side == 33
    assert ModelConfig(box=31, t_sd_px=3.5).cell_side == 29
    again = ModelConfig.from_dict(ModelConfig(box=32, shift_window=2.5).to_dict())
    assert again.shift_window == 2.5 and again.cell_side == 9
    old = {k: v for k, v in cfg.to_dict().items() if k != "shift_window"}  # an older config
    assert ModelConfig.from_dict(old) == cfg
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(UserError, match="shift_window"):
            ModelConfig(box=32, shift_window=bad)


def test_checkpoint_without_shift_window_loads_on_the_window(tmp_path):
    from tvae_em.run import RunFolder

    model = window_model(shift_window=1000.0)  # trained "on the full grid"
    run = RunFolder(tmp_path / "run")
    run.save_model(model, {})
    payload = run.load_checkpoint()
    del payload["model_config"]["shift_window"]  # as written before the window existed
    run.save_checkpoint("last", payload)
    loaded = run.load_model().model
    assert loaded.cfg.shift_window == 4.0 and loaded.cfg.cell_side == 15
    y = torch.randn(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(y), window_of(model.encoder(y), 15))


def matched_filter(model: TargetVAE, sd: float = 2.0, scale: float = 1000.0) -> TargetVAE:
    """The exported model with a hand-set encoder: every template is a Gaussian blob of sd `sd`,
    the 1x1 layers pass it on, and the attention is `scale` x that correlation in every bin (so
    q(t, r) peaks where a blob sits); every other field is 0."""
    out = model.export_for_inference()
    enc = out.encoder
    k = enc.lift.filt.shape[-1]
    r = torch.arange(k, dtype=torch.float32) - k // 2
    blob = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sd**2))
    with torch.no_grad():
        enc.lift.filt.copy_((blob / blob.sum()).expand_as(enc.lift.filt))
        enc.lift.bias.zero_()
        for lin in enc.hidden:
            lin.weight.copy_(torch.eye(*lin.weight.shape))
            lin.bias.zero_()
        enc.head.weight.zero_()
        enc.head.bias.zero_()
        enc.head.weight[: model.cfg.rotations] = scale / enc.head.weight.shape[1]
    return out


def blob_at(box: int, shifts: list[tuple[int, int]], sd: float = 2.0) -> torch.Tensor:
    """(B, box, box) Gaussian blobs centred at shifts (x, y) px from the centre pixel."""
    r = torch.arange(box, dtype=torch.float32) - box // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack(
        [torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sd**2)) for x, y in shifts]
    )


def test_embedding_recovers_a_known_shift_on_the_window():
    """A blob at a known shift inside the window: embed's t and the ELBO's cell are that shift
    (the KL of the cells is -log p(t) of that cell); beyond the window t stops at its edge."""
    win = matched_filter(window_model())
    full = matched_filter(window_model(shift_window=1000.0))
    inside = [(3, -5), (-6, 6), (0, 0), (7, -7)]
    y = blob_at(32, inside + [(10, 0)])
    with torch.no_grad():
        e, ef, out = win.embed(y), full.embed(y), win(y)
    expected = torch.tensor(inside + [(7, 0)], dtype=torch.float32)  # R = 7: the window's edge
    torch.testing.assert_close(e["t"], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ef["t"][:-1], expected[:-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(ef["t"][-1], torch.tensor([10.0, 0.0]), atol=1e-4, rtol=0)
    # q is uniform over the 8 bins at the winning position: KL(q(t, r) || p) = -log p(t)
    idx = expected.long() + 7  # (x, y) -> window column j, row i
    torch.testing.assert_close(out["kl_tr"], -win.log_pt[idx[:, 1], idx[:, 0]], atol=1e-4, rtol=0)
