"""End to end through the real CLI: simulate -> preprocess -> train -> embed, scored against truth.

A tiny noisy glyph set (3 asymmetric letters, uniform in-plane rotation, Gaussian shifts) is
trained for a few epochs with the default model; the embed output must beat chance clearly on
every metric of the paper (scored by benchmarks/validate.py, the same code as the benchmarks).
Thresholds were set from measurements over seeds 0-2 with a margin (docs/results.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tvae_em.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TVAE_E2E_SEED", "0"))  # the thresholds hold for seeds 0, 1, 2
N, BOX, CLASSES, EPOCHS = 384, 24, 3, 4


def _validate_module():
    """benchmarks/validate.py, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tvae_validate", ROOT / "benchmarks/validate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def run_e2e(tmp: Path, seed: int = SEED) -> dict:
    """The whole pipeline in tmp; the score dict of benchmarks/validate.py."""
    data, prep, run, out = tmp / "data", tmp / "prep", tmp / "run", tmp / "embedded.star"
    _cli("simulate", "glyphs", "-o", data, "--n", N, "--box", BOX, "--views", CLASSES,
         "--snr", 2.0, "--seed", seed)  # fmt: skip
    _cli("preprocess", data / "particles.star", "-o", prep, "--size", BOX)
    _cli("train", prep / "particles.star", "-o", run, "--epochs", EPOCHS, "--batch-size", 32,
         "--seed", seed, "--device", "cpu", "--checkpoint-every", EPOCHS)  # fmt: skip
    _cli("embed", run, prep / "particles.star", "-o", out, "--no-elbo", "--device", "cpu")
    v = _validate_module()
    emb = v.load_npz(out.with_suffix(".npz"))
    truth = pd.read_csv(data / "truth.csv")
    scores = v.score_embedding(emb, truth, CLASSES, restarts=10, seed=seed)
    scores.update(
        v.class_average_scores(
            prep / "particles.star", emb, truth, data / "templates.mrcs", scores["_kmeans_labels"]
        )
    )
    return scores


def test_cli_pipeline_scores_above_chance(tmp_path: Path) -> None:
    s = run_e2e(tmp_path)
    summary = {k: v for k, v in s.items() if not k.startswith("_")}
    # in-plane angle within each class (chance: 0)
    assert s["rot_cc_class_mean"] > 0.5, summary
    assert min(s["rot_cc_class"].values()) > 0.3, summary
    # shifts (chance: 0)
    assert s["shift_r_x"] > 0.5 and s["shift_r_y"] > 0.5, summary
    # classes (chance: 1/3 for 3 balanced classes)
    assert s["acc"] > 0.6, summary
    # aligned class averages are sharper than with random poses
    assert s["tc_true"] > 0.5, summary
    assert np.isfinite(s["tc_oracle"]) and s["tc_true"] <= s["tc_oracle"] + 0.05, summary


if __name__ == "__main__":  # measure over seeds: python tests/test_validation_e2e.py 0 1 2
    import tempfile
    import time

    for sd in map(int, sys.argv[1:] or ["0"]):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            r = run_e2e(Path(d), sd)
            keep = ("rot_cc", "rot_cc_class_mean", "rot_cc_class", "shift_r_x", "shift_r_y",
                    "acc", "acc_mu_sd", "tc_oracle", "tc_true", "tc_kmeans")  # fmt: skip
            print(sd, f"{time.perf_counter() - t0:.0f}s", {k: r.get(k) for k in keep}, flush=True)
