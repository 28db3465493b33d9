"""The renderers side by side in one run: training-step time with and without the CTF.

    python benchmarks/bench_renderers.py                       # boxes 32 64 100, batch 64, CPU
    python benchmarks/bench_renderers.py --box 64 --rounds 5 --device cuda --amp
    python benchmarks/bench_renderers.py --box 32 64 --rounds 2 \
        --only "fourier, CTF, band at Nyquist" "fourier, CTF, Nyquist, full cell grid"

Each round times one step (forward, backward, Adam, and the batch's CTF as the training loop
computes it) of every variant in turn, so load from other jobs hits all variants alike; the
minimum over rounds is reported, with the ratio to the code path that was the default for stars
with defocus before issue 10 (real-space generator on every pixel + FFT CTF, every pixel a cell).
Random images stand in for data (the cost does not depend on the pixel values). Variants marked
"bf16" run under bf16 autocast whatever --amp says (on the CPU: the default where it has bf16
arithmetic, `runtime.native_bf16`), those marked "search" render at searched poses (the default
from epoch 2 for gaussian data); `--schedule` times the band ramp both ways.

    python benchmarks/bench_renderers.py --box 32 64 --batch 16 --rounds 4 --schedule --only \
        "fourier, CTF, band at Nyquist" "fourier, CTF, band at Nyquist, bf16" \
        "fourier, CTF, Nyquist, search" "fourier, CTF, Nyquist, search, bf16"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from tvae_em.ctf import batch_ctf
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.synthetic import random_ctf_params

VARIANTS = {
    # the default path for stars with defocus before issue 10: real-space generator on every pixel,
    # CTF by an FFT pair, every pixel a translation cell
    "real, CTF, full cell grid (old default)": (
        dict(renderer="real", shift_window=1e6),
        True,
        None,
    ),
    "real, CTF": (dict(renderer="real"), True, None),
    "real, no CTF, 25% pixels": (dict(renderer="real"), False, None),
    "fourier, CTF, band at Nyquist": (dict(renderer="fourier"), True, None),
    "fourier, CTF, band 0.3 x Nyquist": (dict(renderer="fourier"), True, 0.15),
    "fourier, no CTF, band at Nyquist": (dict(renderer="fourier"), False, None),
    "fourier, CTF, Nyquist, full cell grid": (
        dict(renderer="fourier", shift_window=1e6),  # every pixel a cell, as before the window
        True,
        None,
    ),
    "fourier, CTF, Nyquist, hidden 256": (
        dict(renderer="fourier", generator_hidden=256),
        True,
        None,
    ),
    "fourier, CTF, band at Nyquist, bf16": (dict(renderer="fourier", amp=True), True, None),
    "fourier, CTF, Nyquist, hidden 256, bf16": (
        dict(renderer="fourier", generator_hidden=256, amp=True),
        True,
        None,
    ),
    # today's default model for gaussian data, from epoch 2 (the pose search; z from the aligned
    # particle and its turn penalty)
    "fourier, CTF, Nyquist, search": (
        dict(renderer="fourier", z_source="aligned", z_turn_penalty=10.0, search=True),
        True,
        None,
    ),
    "fourier, CTF, Nyquist, search, bf16": (
        dict(renderer="fourier", z_source="aligned", z_turn_penalty=10.0, search=True, amp=True),
        True,
        None,
    ),
}
BASELINE = "real, CTF, full cell grid (old default)"
# the default schedule's bands (fractions of Nyquist) across its ramp: 0.3 -> 1 over 40% of a run
RAMP = (0.3, 0.475, 0.65, 0.825)
REFERENCE_LIKE = dict(
    renderer="real",
    encoder_fields=128,
    encoder_hidden_fields=16,
    encoder_layers=1,
    fourier_features=1024,
    pixel_fraction=1.0,
)


def make_step(box: int, args, overrides: dict, with_ctf: bool, k_max):
    device = torch.device(args.device)
    overrides = dict(overrides)
    use_amp, search = overrides.pop("amp", args.amp), overrides.pop("search", False)
    cfg = ModelConfig(box=box, z_dim=args.z_dim, rotations=args.rotations, **overrides)
    model = TargetVAE(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    y = torch.randn(args.batch, box, box, device=device)
    params = random_ctf_params(args.batch, np.random.default_rng(0))
    apix, idx = np.full(args.batch, 4.0), np.arange(args.batch)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    def step() -> None:
        ctf = batch_ctf(params, apix, idx, box, device) if with_ctf else None
        with amp:
            loss = -model(y, ctf=ctf, k_max=k_max, search=search)["objective"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--box", type=int, nargs="+", default=[32, 64, 100])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rotations", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for every variant")
    p.add_argument("--only", nargs="*", help="variants to run (names as printed)")
    p.add_argument(
        "--schedule",
        action="store_true",
        help="also time the default band schedule's ramp: the speed of a whole default run",
    )
    p.add_argument(
        "--reference-like",
        action="store_true",
        help="also time the published model's sizes (real renderer, no CTF, every pixel)",
    )
    args = p.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "load_avg": os.getloadavg()}))  # fmt: skip
    variants = {n: v for n, v in VARIANTS.items() if not args.only or n in args.only}
    variants[BASELINE] = VARIANTS[BASELINE]
    if args.schedule:
        for f in RAMP:
            for tag, extra in (("", {}), (", bf16", {"amp": True})):
                variants[f"fourier, CTF, band {f:g} x Nyquist{tag}"] = (
                    dict(renderer="fourier", **extra),
                    True,
                    f / 2,
                )
    if args.reference_like:
        variants["published sizes (reference-like), no CTF"] = (REFERENCE_LIKE, False, None)
    names = list(variants)
    for box in args.box:
        steps = {n: make_step(box, args, *variants[n]) for n in names}
        times = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                t0 = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t0)
        base = min(times[BASELINE])
        for n in names:
            best = min(times[n])
            row = {"box": box, "variant": n, "step_s_min": round(best, 3),
                   "particles_per_s": round(args.batch / best, 1),
                   "speed_vs_old_default": round(base / best, 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
        for tag in ("", ", bf16") if args.schedule else ():
            # 40% of the run on the ramp (mean of its bands), 60% at Nyquist
            ramp = np.mean([min(times[f"fourier, CTF, band {f:g} x Nyquist{tag}"]) for f in RAMP])
            nyquist = times.get(f"fourier, CTF, band at Nyquist{tag}")
            if not nyquist:
                continue
            run = 0.4 * ramp + 0.6 * min(nyquist)
            row = {
                "box": box,
                "variant": f"default run (schedule + Nyquist){tag}",
                "step_s_mean": round(run, 3),
                "speed_vs_old_default": round(base / run, 2),
            }
            print(json.dumps(row), flush=True)
    print(json.dumps({"load_avg_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
