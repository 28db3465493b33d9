"""GPU check in one command: correctness of the CUDA path, then its speed and memory.

    python benchmarks/gpu_check.py                     # on a GPU machine, a few minutes
    python benchmarks/gpu_check.py --toy --device cpu  # the same checks at toy size (CI runs this)

Checks, each printed as one JSON line (and all together with --out FILE):
1. agreement: the ELBO terms of the same weights and batch (fixed sampling noise) on the device and
   on the CPU, for both renderers, with and without the CTF (relative difference);
2. bf16: a few hundred training steps with bf16 autocast against the same steps in fp32 (no NaN,
   final losses close);
3. training throughput (particles/s) at 64/100/128 px with batch 128-512, Fourier renderer with
   the CTF (the default for real data), with and without torch.compile, and peak memory;
4. embed throughput (with the per-particle ELBO) and its peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np
import torch

from tvae_em.ctf import batch_ctf
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.synthetic import random_ctf_params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _batch(box: int, n: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, box, box, generator=gen)
    params = random_ctf_params(n, np.random.default_rng(seed))
    ctf = batch_ctf(params, np.full(n, 4.0), np.arange(n), box)
    return y.to(device), ctf.to(device)


def _terms(model, y, ctf, with_ctf: bool, dev):
    """The ELBO's terms without sampling noise: the KLs, and the log-likelihood at the read-out
    pose and latent (so both devices compute exactly the same function)."""
    from tvae_em.model.posterior import kl_terms, read_out

    y = y.to(dev)
    with torch.no_grad():
        post = model.posterior(y)
        kl_tr, kl_theta, kl_z = kl_terms(post, model.log_pt, model.log_pr)
        e = read_out(post, model.cfg.rotations, model.cfg.cell_side)
        c = ctf.to(dev) if with_ctf else None
        log_lik = model.log_likelihood(y, e["theta"], e["t"], e["z_mu"], c)
    return {"log_lik": log_lik, "kl_tr": kl_tr, "kl_theta": kl_theta, "kl_z": kl_z}.items()


def agreement(box: int, batch: int, device: torch.device) -> list[dict]:
    """ELBO terms on `device` vs the CPU, same weights and batch (no sampling noise)."""
    rows = []
    for renderer in ("real", "fourier"):
        cfg = ModelConfig(box=box, rotations=8, renderer=renderer)
        cpu_model = TargetVAE(cfg).eval()
        dev_model = TargetVAE(cfg).to(device).eval()
        dev_model.load_state_dict(cpu_model.state_dict())
        y, ctf = _batch(box, batch, torch.device("cpu"))
        for with_ctf in (False, True):
            out = {}
            for name, model, dev in (("cpu", cpu_model, "cpu"), ("device", dev_model, device)):
                out[name] = {k: v.double().cpu() for k, v in _terms(model, y, ctf, with_ctf, dev)}
            rel = {
                k: float(((out["device"][k] - out["cpu"][k]).abs() / out["cpu"][k].abs().clamp(1))
                         .max())
                for k in out["cpu"]
            }  # fmt: skip
            rows.append({"check": "agreement", "renderer": renderer, "ctf": with_ctf,
                         "max_rel_diff": rel, "ok": max(rel.values()) < 1e-3})  # fmt: skip
    return rows


def bf16_training(box: int, batch: int, steps: int, device: torch.device) -> dict:
    """The same training steps in fp32 and with bf16 autocast: finite, and close at the end."""
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = TargetVAE(ModelConfig(box=box, rotations=8, renderer="fourier")).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        y, ctf = _batch(box, batch, device, seed=1)
        trace = []
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = -model(y, ctf=ctf)["objective"].float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses["bf16" if amp else "fp32"] = trace
    finite = all(math.isfinite(v) for t in losses.values() for v in t)
    last = {k: float(np.mean(v[-10:])) for k, v in losses.items()}
    rel = abs(last["bf16"] - last["fp32"]) / abs(last["fp32"])
    return {"check": "bf16", "steps": steps, "final_loss": last, "rel_diff": rel,
            "finite": finite, "ok": finite and rel < 0.05}  # fmt: skip


def train_throughput(
    box: int, batch: int, steps: int, device: torch.device, amp: bool, compile_: bool
) -> dict:
    """Particles/s of training steps (Fourier renderer, CTF on) and peak memory."""
    model = TargetVAE(ModelConfig(box=box, rotations=8, renderer="fourier")).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compile_ else model
    y, ctf = _batch(box, batch, device)
    _reset_peak(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = -step_model(y, ctf=ctf)["objective"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    return {"check": "train", "box": box, "batch": batch, "amp": amp, "compile": compile_,
            "first_step_s": round(first, 2), "step_s": round(dt, 4),
            "particles_per_s": round(batch / dt, 1), "peak_mb": _peak_mb(device)}  # fmt: skip


def embed_throughput(box: int, batch: int, batches: int, device: torch.device) -> dict:
    """Particles/s of `model.embed` with the per-particle ELBO (as `tvae-em embed`)."""
    model = TargetVAE(ModelConfig(box=box, rotations=8, renderer="fourier")).to(device)
    model = model.export_for_inference()
    y, ctf = _batch(box, batch, device)
    _reset_peak(device)
    amp = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model.embed(y, with_elbo=True, ctf=ctf)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.embed(y, with_elbo=True, ctf=ctf)
        _sync(device)
    dt = (time.perf_counter() - t0) / batches
    return {"check": "embed", "box": box, "batch": batch, "particles_per_s": round(batch / dt, 1),
            "peak_mb": _peak_mb(device)}  # fmt: skip


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--toy", action="store_true", help="tiny sizes: checks the script itself")
    p.add_argument("--out", help="also write every result to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.toy:
        boxes, batches, steps, bf16_steps, compile_opts = [16], [8], 2, 4, [False]
    else:
        boxes, batches, steps, bf16_steps = [64, 100, 128], [128, 512], 10, 300
        compile_opts = [False, True] if device.type == "cuda" else [False]
    amp = device.type == "cuda"
    rows: list[dict] = [{"check": "machine", "device": str(device), "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                         else None, "host": platform.node()}]  # fmt: skip

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit(rows[0])
    for row in agreement(boxes[0] if args.toy else 64, 8 if args.toy else 64, device):
        emit(row)
    if device.type == "cuda" or args.toy:
        emit(
            bf16_training(boxes[0] if args.toy else 64, 8 if args.toy else 128, bf16_steps, device)
        )
    for box in boxes:
        for batch in batches:
            for compile_ in compile_opts:
                emit(train_throughput(box, batch, steps, device, amp, compile_))
        emit(embed_throughput(box, batches[-1], steps, device))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    run()
