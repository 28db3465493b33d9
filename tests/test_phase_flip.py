"""preprocess --phase-flip: images multiplied by sign(CTF); training then models |CTF|."""

from __future__ import annotations

import numpy as np
import starfile
import torch
from click.testing import CliRunner

from tvae_em.cli import main
from tvae_em.ctf import compute_ctf
from tvae_em.fourier import apply_ctf, phase_flip
from tvae_em.io import ParticleStack
from tvae_em.synthetic import build_dataset


def _params(n: int) -> dict[str, torch.Tensor]:
    return {
        "dfu_A": torch.linspace(12000, 22000, n),
        "dfv_A": torch.linspace(11000, 21000, n),
        "dfang_deg": torch.linspace(0, 90, n),
        "volt_kv": torch.full((n,), 300.0),
        "cs_mm": torch.full((n,), 2.7),
        "amp_contrast": torch.full((n,), 0.1),
    }


def test_phase_flip_turns_ctf_into_its_absolute_value():
    rng = np.random.default_rng(0)
    for box in (32, 33):
        img = torch.from_numpy(rng.normal(size=(3, box, box)))
        ctf = compute_ctf(box, 2.0, _params(3)).double()
        flipped = phase_flip(apply_ctf(img, ctf), ctf).numpy()
        expected = apply_ctf(img, ctf.abs()).numpy()
        np.testing.assert_allclose(flipped, expected, atol=1e-4)
        # and it is not a no-op: the CTF does change sign at these defoci
        assert (ctf < 0).any() and np.abs(flipped - apply_ctf(img, ctf).numpy()).max() > 0.1


def test_cli_phase_flip_marks_particles_and_ctf_becomes_absolute(tmp_path):
    paths = build_dataset("particles", tmp_path / "sim", n=6, box=32, snr=1.0, seed=0)
    out = tmp_path / "prep"
    r = CliRunner().invoke(main, ["preprocess", str(paths["star"]), "-o", str(out), "--phase-flip"])
    assert r.exit_code == 0, r.output
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert (particles["tvaePhaseFlipped"] == 1).all()
    stack = ParticleStack.open(out / "particles.star")
    params = stack.ctf_params()
    assert params is not None and (params.phase_flipped == 1).all()
    ctf = compute_ctf(stack.box, torch.as_tensor(stack.apix), params)
    assert (ctf >= 0).all()
    # a second flip is refused, as is a flip without defocus
    r = CliRunner().invoke(
        main,
        ["preprocess", str(out / "particles.star"), "-o", str(tmp_path / "p2"), "--phase-flip"],
    )
    assert r.exit_code == 2 and "already phase-flipped" in r.output
    assert not (tmp_path / "p2").exists()
    nodef = build_dataset("glyphs", tmp_path / "g", n=4, box=16, views=1, seed=0)
    r = CliRunner().invoke(
        main, ["preprocess", str(nodef["star"]), "-o", str(tmp_path / "p3"), "--phase-flip"]
    )
    assert r.exit_code == 2 and "--phase-flip" in r.output and "defocus" in r.output
