"""Benchmark `embed`: particles/s of the whole command (read, normalise, infer, write).

A randomly initialised default model (ModelConfig(box=BOX) defaults) is saved as a run folder and
N synthetic glyph particles as a RELION 3.1 star + stack, in a temporary folder; embed_particles
then runs on each device (cpu, and cuda when present), for each renderer, with and without the
per-particle ELBO (with the CTF: the star has defocus and the run says it was trained with it),
for each encoder cell grid (`--cell-grids window full`: the shift window of the default
`shift_window`, or every pixel of the box as before the window), each generator width
(`--generator-hidden 512 256`) and with bf16 autocast on and off (`--amp on off`; on only where
the device has bf16 arithmetic, `runtime.native_bf16`).
Speed does not depend on the weights, so an untrained model measures what a trained one would.

    python benchmarks/bench_embed.py --n 512 --box 64 --batch-size 64
    python benchmarks/bench_embed.py --renderers fourier --cell-grids window full --no-refine
    python benchmarks/bench_embed.py --renderers fourier --generator-hidden 512 256 --amp on off
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.io import write_stack, write_star
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.run import RunFolder
from tvae_em.runtime import native_bf16
from tvae_em.synthetic import glyphs, random_ctf_params, star_blocks

# ModelConfig overrides of each cell grid: the default window, or (beyond any box) every pixel
CELL_GRIDS = {"window": {}, "full": {"shift_window": 1e6}}


def make_run(
    folder: Path, box: int, renderer: str, grid: str = "window", hidden: int = 512
) -> Path:
    """A run folder holding an untrained default model for `box`, trained "with the CTF"."""
    model = TargetVAE(
        ModelConfig(box=box, renderer=renderer, generator_hidden=hidden, **CELL_GRIDS[grid])
    )
    RunFolder(folder).save_model(model, {"ctf": "on"}, ctf=True)
    return folder


def make_particles(folder: Path, n: int, box: int) -> Path:
    """n glyph particles in folder/p.mrcs with a RELION 3.1 star (with defocus) folder/p.star."""
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = glyphs(n, box=box, seed=0)
    write_stack(folder / "p.mrcs", [images], n, box, 2.0)
    params = random_ctf_params(n, np.random.default_rng(0))
    write_star(folder / "p.star", star_blocks(n, box, 2.0, "p.mrcs", params))
    return folder / "p.star"


def run(args: argparse.Namespace) -> list[dict]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        star = make_particles(root / "data", args.n, args.box)
        runs = {
            (r, g, h): make_run(root / f"run_{r}_{g}_{h}", args.box, r, g, h)
            for r in args.renderers
            for g in args.cell_grids
            for h in args.generator_hidden
        }
        variants = itertools.product(devices, runs, (False, True), args.amp)
        for device, (renderer, grid, hidden), with_elbo, amp in variants:
            run_dir = runs[renderer, grid, hidden]
            out = root / f"out_{device}_{renderer}_{grid}_{hidden}_{with_elbo}_{amp}.star"
            t0 = time.perf_counter()
            opts = EmbedOptions(
                run_dir,
                star,
                out,
                batch_size=args.batch_size,
                device=device,
                with_elbo=with_elbo,
                refine=args.refine,
                amp=amp == "on",
            )
            s = embed_particles(opts)
            total = time.perf_counter() - t0
            rows.append(
                {
                    "device": device,
                    "renderer": renderer,
                    "cells": grid,
                    "hidden": hidden,
                    "bf16": amp == "on" and native_bf16(torch.device(device)),
                    "elbo": with_elbo,
                    "n": s.n,
                    "box": args.box,
                    "batch": args.batch_size,
                    "inference_particles_per_s": round(s.particles_per_s, 1),
                    "command_particles_per_s": round(s.n / total, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="particles")
    parser.add_argument("--box", type=int, default=64, help="image size (px)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--renderers", nargs="+", default=["real", "fourier"])
    parser.add_argument("--cell-grids", nargs="+", default=["window"], choices=list(CELL_GRIDS))
    parser.add_argument("--generator-hidden", nargs="+", type=int, default=[512])
    parser.add_argument("--amp", nargs="+", default=["on"], choices=["on", "off"])
    parser.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="skip the per-particle pose refinement (time the encoder and ELBO only)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(pd.DataFrame(run(args)).to_string(index=False))


if __name__ == "__main__":
    main()
