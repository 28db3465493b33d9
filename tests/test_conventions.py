"""Shared homes of the architecture: Fourier resampling, pose exports, head layout, run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tvae_em.cli import main
from tvae_em.data import Normalisation
from tvae_em.fourier import fourier_crop, fourier_pad, fourier_resize
from tvae_em.geometry import cryosparc_pose, relion_from_cryosparc, relion_pose, wrap_degrees
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.model.layout import HeadLayout
from tvae_em.run import RunFolder
from tvae_em.training.loop import checkpoints_due


@pytest.mark.parametrize(("d", "n"), [(8, 12), (8, 13), (9, 12), (9, 16), (16, 21)])
def test_fourier_pad_is_undone_by_fourier_crop_and_keeps_the_centre(d, n):
    x = np.random.default_rng(d * n).normal(size=(3, d, d)).astype(np.float32)
    up = fourier_pad(x, n)
    assert up.shape == (3, n, n)
    np.testing.assert_allclose(fourier_crop(up, d), x, atol=2e-6)
    np.testing.assert_allclose(up[:, n // 2, n // 2], x[:, d // 2, d // 2], atol=2e-6)
    np.testing.assert_allclose(up.mean((1, 2)), x.mean((1, 2)), atol=1e-5)  # values are kept


@pytest.mark.parametrize(("d", "n"), [(12, 8), (13, 8), (16, 9), (21, 16)])
def test_fourier_crop_of_a_tensor_equals_the_array_path(d, n):
    # the pose search crops tensors on their device; preprocessing crops numpy stacks
    x = np.random.default_rng(d + n).normal(size=(2, 3, d, d))
    want = fourier_crop(x.reshape(6, d, d), n).reshape(2, 3, n, n)
    got = fourier_crop(torch.from_numpy(x), n)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_fourier_pad_samples_a_band_limited_cosine_exactly():
    d, n, k = 16, 24, 3  # a cosine of 3 cycles per box, sampled on 16 and on 24 pixels
    r16, r24 = np.arange(d) - d // 2, np.arange(n) - n // 2
    img = np.cos(2 * np.pi * k * r16 / d)[None, :].repeat(d, 0)[None]
    want = np.cos(2 * np.pi * k * r24 / n)[None, :].repeat(n, 0)[None]
    np.testing.assert_allclose(fourier_resize(img.astype(np.float32), n), want, atol=1e-5)
    with pytest.raises(ValueError, match="cannot shrink"):
        fourier_pad(img, 8)


def test_relion_and_cryosparc_pose_conversions_invert_each_other():
    rng = np.random.default_rng(0)
    theta, t, apix = rng.uniform(-np.pi, np.pi, 20), rng.normal(0, 3, (20, 2)), 1.7
    psi, origin = relion_pose(theta, t, apix)
    assert (psi > -180).all() and (psi <= 180).all()
    np.testing.assert_allclose(np.cos(np.radians(psi) + theta), 1.0, atol=1e-12)
    np.testing.assert_allclose(origin, -t * apix)
    pose, shift = cryosparc_pose(psi, origin, apix)
    psi2, origin2 = relion_from_cryosparc(pose, shift, apix)
    assert ((pose >= 0) & (pose < 2 * np.pi)).all()  # cryoSPARC's range; the same angles
    np.testing.assert_allclose(wrap_degrees(psi2), psi, atol=1e-9)
    np.testing.assert_allclose(origin2, origin, atol=1e-9)


def test_head_layout_names_every_field_once():
    lay = HeadLayout(3)
    fields = [lay.attention, lay.theta_mu, lay.theta_logsd]
    fields += list(range(lay.n_fields))[lay.z_mu] + list(range(lay.n_fields))[lay.z_logsd]
    assert sorted(fields) == list(range(lay.n_fields)) == list(range(9))
    assert HeadLayout.from_fields(9) == lay
    with pytest.raises(ValueError):
        HeadLayout.from_fields(8)
    cfg = ModelConfig(box=16, z_dim=3, rotations=4)
    maps = TargetVAE(cfg).encoder(torch.zeros(1, 16, 16))
    assert maps.shape[1] == lay.n_fields


def test_checkpoint_policy():
    assert checkpoints_due(3, 10, 3, False) == (True, False)
    assert checkpoints_due(4, 10, 3, True) == (False, True)
    assert checkpoints_due(10, 10, 3, False) == (True, False)  # the last epoch always


def test_run_folder_round_trip(tmp_path):
    model = TargetVAE(ModelConfig(box=16, rotations=4))
    run = RunFolder(tmp_path / "run")
    run.save_model(model, {"ctf": "on", "apix": 1.5}, Normalisation(0.5, 2.0), ctf=True, epoch=3)
    assert json.loads(run.config_path.read_text())["ctf"] is True
    trained = run.load_model()
    assert trained.epoch == 3 and trained.normalisation == Normalisation(0.5, 2.0)
    assert trained.uses_ctf(None)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(trained.model.state_dict()[k], v, rtol=0, atol=0)
    assert run.saved_options()["input_apix"] == 1.5  # the old name of the option, renamed
    direct = RunFolder(run.checkpoint_path("last"))  # a checkpoint given by its file
    assert direct.path == run.path and direct.find_checkpoint() == run.checkpoint_path("last")


def test_train_refuses_the_old_apix_spelling(tmp_path):
    r = CliRunner().invoke(main, ["train", "x.star", "-o", str(tmp_path / "r"), "--apix", "2"])
    assert r.exit_code == 2 and "--input-apix" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()
