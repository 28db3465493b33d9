"""Training loop: outputs, resume to the same result, Ctrl-C, NaN guard, bad input, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, write_particle_set

from tvae_em.cli import main
from tvae_em.run import read_checkpoint as load_checkpoint
from tvae_em.synthetic import glyphs
from tvae_em.training import TrainingDiverged, TrainOptions, train

BOX = 16


@pytest.fixture(scope="module")
def glyph_star(tmp_path_factory) -> Path:
    images, _ = glyphs(48, box=BOX, seed=1, n_classes=2, t_sd_px=1.0)
    return write_particle_set(tmp_path_factory.mktemp("glyphs"), images, apix=2.0)


def tiny_options(star: Path, out: Path, **kw) -> TrainOptions:
    base = dict(input=str(star), out_dir=str(out), epochs=2, batch_size=16, seed=3)
    base.update(kw)
    return TrainOptions(**base, model_overrides=dict(TINY_MODEL))


def state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_train_writes_run_folder(glyph_star, tmp_path):
    opts = tiny_options(glyph_star, tmp_path / "run", angle_consistency=50.0, z_consistency=5.0)
    res = train(opts, log=lambda m: None)
    run = tmp_path / "run"
    assert res.epochs_done == 2 and not res.interrupted
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["z_dim"] == 2 and cfg["model_config"]["box"] == BOX
    assert cfg["model_config"]["consistency_theta"] == 50.0
    assert cfg["model_config"]["likelihood"] == "bernoulli"  # glyphs lie in [0, 1]
    assert cfg["version"] and cfg["command"] and cfg["fingerprint"]
    m = pd.read_csv(run / "metrics.csv")
    assert list(m["epoch"]) == [1, 2]
    assert {"loss", "log_lik", "kl_tr", "kl_theta", "kl_z", "lr", "particles_per_s"} <= set(m)
    assert np.isfinite(m[["loss", "log_lik", "kl_tr", "kl_theta", "kl_z"]].to_numpy()).all()
    # loss = -(log_lik - KL) + pose-consistency penalty per image, averaged over the epoch
    kl = m["kl_tr"] + m["kl_theta"] + m["kl_z"]
    assert (m["consistency"] > 0).all()  # asked for
    np.testing.assert_allclose(m["loss"], -(m["log_lik"] - kl) + m["consistency"], rtol=1e-4)
    assert (run / "checkpoints" / "best.pt").exists()
    assert "epoch 2/2" in (run / "train.log").read_text()


def test_resume_matches_uninterrupted_run(glyph_star, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_options(glyph_star, full, epochs=3), log=lambda m: None)
    train(tiny_options(glyph_star, part, epochs=1), log=lambda m: None)
    train(
        tiny_options(glyph_star, part, epochs=3),
        resume=True,
        explicit={"epochs"},
        log=lambda m: None,
    )
    a, b = state(full), state(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ma, mb = pd.read_csv(full / "metrics.csv"), pd.read_csv(part / "metrics.csv")
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


def test_interrupt_keeps_last_checkpoint_and_resumes(glyph_star, tmp_path, monkeypatch):
    import tvae_em.training.loop as tr

    run = tmp_path / "run"
    original = tr._run_epoch

    def interrupted(*args, **kw):
        if args[2] == 2:  # epoch 2
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(tr, "_run_epoch", interrupted)
    res = train(tiny_options(glyph_star, run, epochs=3), log=lambda m: None)
    assert res.interrupted and res.epochs_done == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(tr, "_run_epoch", original)
    train(tiny_options(glyph_star, run, epochs=3), resume=True, log=lambda m: None)
    ref = tmp_path / "ref"
    train(tiny_options(glyph_star, ref, epochs=3), log=lambda m: None)
    for k, v in state(ref).items():
        torch.testing.assert_close(v, state(run)[k], rtol=0, atol=0, msg=k)


def test_nan_loss_stops_with_epoch_and_step(glyph_star, tmp_path, monkeypatch):
    from tvae_em.model import TargetVAE

    original = TargetVAE.forward
    calls = {"n": 0}

    def poisoned(self, y, ctf=None, **kw):
        out = original(self, y, ctf, **kw)
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2 (3 steps per epoch), step 2
            out["objective"] = out["objective"] * float("nan")
        return out

    monkeypatch.setattr(TargetVAE, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="epoch 2, step 2"):
        train(tiny_options(glyph_star, run, epochs=3), log=lambda m: None)
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def _cli(args):
    return CliRunner().invoke(main, args)


def test_cli_train_and_resume(glyph_star, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        str(glyph_star),
        "-o",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "24",
        "--rotations",
        "4",
    ]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    assert "Trained 1 epochs" in r.output
    r = _cli(["train", "--resume", str(run), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["epochs"] == 2 and cfg["options"]["rotations"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "1000"], "--batch-size 1000"),
        (["--rotations", "6"], "--rotations"),
        (["--t-sd", "abc"], "--t-sd abc"),
        (["--device", "tpu"], "--device tpu"),
        (["--epochs", "0"], "--epochs 0"),
    ],
)
def test_cli_train_bad_options(glyph_star, tmp_path, extra, message):
    r = _cli(["train", str(glyph_star), "-o", str(tmp_path / "run"), "--batch-size", "16", *extra])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output


def test_cli_train_bad_input_and_resume_mismatch(glyph_star, tmp_path):
    r = _cli(["train", str(tmp_path / "missing.star"), "-o", str(tmp_path / "run")])
    assert r.exit_code == 2 and "missing.star" in r.output
    run = tmp_path / "run2"
    r = _cli(
        [
            "train",
            str(glyph_star),
            "-o",
            str(run),
            "--epochs",
            "1",
            "--rotations",
            "4",
            "--batch-size",
            "16",
        ]
    )
    assert r.exit_code == 0, r.output
    r = _cli(["train", "--resume", str(run), "--z-dim", "3"])
    assert r.exit_code == 2 and "z_dim" in r.output
    r = _cli(
        ["train", str(glyph_star), "-o", str(run), "--batch-size", "16"]
    )  # would overwrite a trained run
    assert r.exit_code == 2 and "--resume" in r.output
    r = _cli(["train", "--resume", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "nowhere" in r.output


def test_two_process_gloo_run(glyph_star, tmp_path):
    """torchrun --nproc_per_node=2 on CPU: DDP with gloo, rank 0 writes, loss finite."""
    run = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port, so parallel runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "tvae_em.cli",
        "train",
        str(glyph_star),
        "-o",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--rotations",
        "4",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:  # never leave worker processes behind, even on a timeout
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    m = pd.read_csv(run / "metrics.csv")
    assert len(m) == 1 and np.isfinite(m["loss"]).all()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    assert stderr.count("epoch 1/1") == 1  # only rank 0 logs


def test_ctf_is_on_by_default_for_stars_with_defocus(tmp_path):
    from tvae_em.synthetic import build_dataset

    paths = build_dataset("particles", tmp_path / "sim", n=16, box=16, snr=1.0, seed=0)
    on = train(tiny_options(paths["star"], tmp_path / "on", epochs=1), log=lambda m: None)
    off = train(
        tiny_options(paths["star"], tmp_path / "off", epochs=1, ctf="off"), log=lambda m: None
    )
    assert json.loads((on.run_dir / "config.json").read_text())["ctf"] is True
    assert json.loads((off.run_dir / "config.json").read_text())["ctf"] is False
    with pytest.raises(Exception, match="no defocus"):
        train(
            tiny_options(glyph_star_path(tmp_path), tmp_path / "x", epochs=1, ctf="on"),
            log=lambda m: None,
        )


def glyph_star_path(tmp_path: Path) -> Path:
    images, _ = glyphs(16, box=BOX, seed=2, n_classes=1, t_sd_px=1.0)
    return write_particle_set(tmp_path / "g", images, apix=2.0)


def test_worker_processes_stream_the_same_batches(glyph_star, tmp_path):
    """num_workers > 0 (ParticleStack pickled into workers) trains to the same weights as 0."""
    a = train(tiny_options(glyph_star, tmp_path / "w0", epochs=1), log=lambda m: None)
    b = train(
        tiny_options(glyph_star, tmp_path / "w2", epochs=1, num_workers=2), log=lambda m: None
    )
    for k, v in state(a.run_dir).items():
        torch.testing.assert_close(v, state(b.run_dir)[k], rtol=0, atol=0, msg=k)
