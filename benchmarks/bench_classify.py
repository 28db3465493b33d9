"""Benchmark one classification E-step (`inference.classify_with_templates`): particles/s.

K glyph templates, N particles of them at random poses with per-particle CTFs and noise, box
--box. Three variants on the same particles, timed in turn for --rounds rounds (load from other
jobs hits all alike):
- `per-class refine, full-size global pass`: `refine_poses` against every class, each pose
  polished (the E-step before session 6);
- `full-size global pass`: `classify_with_templates` with `RefineConfig(coarse_box=None)`
  (only the winner polished);
- `default`: the global pass on copies Fourier-cropped to 32 px as well.
It also reports the fraction of particles given their true class by each.

    python benchmarks/bench_classify.py --box 64 --n 192 --classes 6 --threads 1
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd
import torch

from tvae_em.ctf import batch_ctf
from tvae_em.fourier import apply_ctf, shift_images
from tvae_em.inference import classify_with_templates
from tvae_em.model.refine import RefineConfig, refine_poses, rotated_templates
from tvae_em.synthetic import GLYPHS, random_ctf_params, render_glyph


class _Model:
    """What classify_with_templates reads of a model: the shift prior sd, sigma 1."""

    cfg = type("cfg", (), {"t_sd_px": 2.0})()
    likelihood = None


def make_set(n: int, k: int, box: int, snr: float, seed: int):
    """Templates (K, 2D, 2D), particles (N, D, D), CTFs (N, D, D) and the true classes (N,)."""
    rng = np.random.default_rng(seed)
    names = list(GLYPHS)[:k]
    fine = torch.stack([torch.from_numpy(render_glyph(g, 2 * box, 0.5)) for g in names])
    labels = rng.integers(0, k, n)
    theta = torch.from_numpy(rng.uniform(-math.pi, math.pi, n)).float()
    t = torch.from_numpy(rng.normal(0, 2.0, (n, 2))).float()
    clean = shift_images(rotated_templates(fine[labels], theta[:, None], box)[:, 0], t)
    ctf = batch_ctf(random_ctf_params(n, rng), np.full(n, 4.0 * 32 / box), np.arange(n), box)
    ctf = ctf.float()
    signal = apply_ctf(clean, ctf)
    noise = torch.from_numpy(rng.normal(size=(n, box, box))).float()
    y = signal + noise * signal.std() / math.sqrt(snr)
    return fine, y / y.std(), ctf, labels


def per_class_refine(fine, loader, n, k, ctf_all, config):
    """The E-step before session 6: every class's pose refined, the best class kept."""
    scores = np.full((n, k), -np.inf)
    with torch.inference_mode():
        for idx, y in loader:
            i = idx.numpy()
            for c in range(k):
                _, _, value = refine_poses(
                    lambda z, c=c: fine[c][None], y, torch.zeros(len(i), 1),
                    torch.zeros(len(i)), ctf_all[i], 2.0, 1.0, config,
                )  # fmt: skip
                scores[i, c] = value.numpy()
    return scores.argmax(1)


def run(args: argparse.Namespace) -> pd.DataFrame:
    fine, y, ctf, labels = make_set(args.n, args.classes, args.box, args.snr, args.seed)
    batches = [np.arange(s, min(s + 64, args.n)) for s in range(0, args.n, 64)]
    loader = [(torch.from_numpy(b), y[b]) for b in batches]
    images = fine.numpy()

    def classify(config: RefineConfig) -> np.ndarray:
        device = torch.device("cpu")
        found = classify_with_templates(
            _Model(), loader, args.n, None, device, lambda i: ctf[i], config, images=images
        )
        return found.labels

    variants = {
        "per-class refine, full-size global pass": lambda: per_class_refine(
            fine, loader, args.n, args.classes, ctf, RefineConfig(coarse_box=None)
        ),
        "full-size global pass": lambda: classify(RefineConfig(coarse_box=None)),
        "default": lambda: classify(RefineConfig()),
    }
    times = {name: [] for name in variants}
    right = {}
    for _ in range(args.rounds):
        for name, f in variants.items():
            t0 = time.perf_counter()
            got = f()
            times[name].append(time.perf_counter() - t0)
            right[name] = float((got == labels).mean())
    return pd.DataFrame(
        {
            "variant": name,
            "particles/s (best round)": round(args.n / min(times[name]), 1),
            "true class": right[name],
        }
        for name in variants
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=192, help="particles")
    parser.add_argument("--box", type=int, default=64, help="image size (px)")
    parser.add_argument("--classes", type=int, default=5, help="glyph templates (at most 5)")
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, box {args.box}")
    print(run(args).to_string(index=False))


if __name__ == "__main__":
    main()
