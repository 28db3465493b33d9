"""bf16 autocast on CPUs with bf16 arithmetic (`runtime.native_bf16`): the model computes the same
ELBO terms as in float32, training and embed use it only where the CPU has it and --amp is on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_particle_set

from tvae_em import runtime
from tvae_em.ctf import batch_ctf
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.model.posterior import kl_terms, read_out
from tvae_em.synthetic import glyphs, random_ctf_params
from tvae_em.training import TrainOptions, train


def test_native_bf16_follows_the_cpu_and_is_on_for_cuda():
    flags = [getattr(torch.cpu, n, lambda: False)() for n in runtime.BF16_CPU_CHECKS]
    assert runtime.native_bf16(torch.device("cpu")) == any(flags)
    assert runtime.native_bf16(torch.device("cuda"))
    assert not runtime.native_bf16(torch.device("meta"))


def test_elbo_terms_under_cpu_bf16_autocast_match_float32():
    # the same weights and batch: the log-likelihood at the read-out pose and z, and the KL terms
    torch.manual_seed(0)
    box, n = 32, 8
    model = TargetVAE(ModelConfig(box=box, renderer="fourier", z_source="aligned")).eval()
    images, _ = glyphs(n, box=box, seed=1)
    y = torch.from_numpy(images).float()
    ctf = batch_ctf(random_ctf_params(n, np.random.default_rng(0)), np.full(n, 4.0),
                    np.arange(n), box).float()  # fmt: skip
    terms = {}
    for amp in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            post = model.posterior(y)
            kl_tr, kl_theta, _ = kl_terms(post, model.log_pt, model.log_pr)
            e = read_out(post, model.cfg.rotations, model.cfg.cell_side)
            z = model.latent_at(y, e["theta"], e["t"], ctf)[0]
            log_lik = model.log_likelihood(y, e["theta"], e["t"], z, ctf)
        terms[amp] = {"log_lik": log_lik, "kl_tr": kl_tr, "kl_theta": kl_theta, "z": z}
    for k, a in terms[False].items():
        b = terms[True][k].float()
        assert torch.isfinite(b).all(), k
        scale = a.abs().max().clamp_min(1.0)
        assert (b - a).abs().max() / scale < 0.02, (k, a, b)
    assert not torch.equal(terms[False]["log_lik"], terms[True]["log_lik"])  # bf16 did run


@pytest.mark.parametrize("native, amp", [(True, True), (True, False), (False, True)])
def test_training_autocasts_only_on_a_bf16_cpu_with_amp(tmp_path, monkeypatch, native, amp):
    from tvae_em.training import setup

    monkeypatch.setattr(setup, "native_bf16", lambda device: native)
    images, _ = glyphs(16, box=16, seed=2, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(tmp_path / "data", images, apix=2.0)
    lines: list[str] = []
    opts = TrainOptions(
        input=str(star), out_dir=str(tmp_path / "run"), epochs=1, batch_size=8, seed=0,
        amp=amp, model_overrides=dict(TINY_MODEL),
    )  # fmt: skip
    result = train(opts, log=lines.append)
    header = next(line for line in lines if "world size" in line)
    assert ("(bf16 autocast)" in header) == (native and amp), header
    assert np.isfinite(result.last_loss)
