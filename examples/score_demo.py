"""Score the demo's embedded.star against the example set's ground truth (truth.csv).

Usage: python examples/score_demo.py demo_out/embedded.star examples/data/truth.csv
Prints the rotation circular correlation within each true class (each class has its own canonical
orientation, so angles are compared class by class), the shift correlation per axis and, when the
star has rlnClassNumber, the clustering accuracy (Hungarian-matched).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import starfile

from tvae_em.metrics import circular_correlation, clustering_accuracy, shift_correlation


def main(star_path: str, truth_path: str) -> None:
    star = starfile.read(star_path, always_dict=True)["particles"]
    truth = pd.read_csv(truth_path)
    if len(star) != len(truth):
        sys.exit(f"{star_path}: {len(star)} particles but {truth_path} has {len(truth)}")
    psi = np.deg2rad(star["rlnAnglePsi"].to_numpy())
    true_psi = np.deg2rad(truth["psi_deg"].to_numpy())
    classes = truth["class"].to_numpy()
    ccs = [
        circular_correlation(psi[classes == k], true_psi[classes == k]) for k in np.unique(classes)
    ]
    rx, ry = shift_correlation(
        star[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
        truth[["originX_A", "originY_A"]].to_numpy(),
    )
    line = (
        f"Demo scores: rotation circular correlation within class "
        f"{' / '.join(f'{c:.2f}' for c in ccs)} (mean {np.mean(ccs):.2f}); "
        f"shift r x {rx:.2f}, y {ry:.2f}"
    )
    if "rlnClassNumber" in star:
        acc = clustering_accuracy(star["rlnClassNumber"].to_numpy(), classes)
        line += (
            f"; clustering accuracy {100 * acc:.0f}% (chance {100 / len(np.unique(classes)):.0f}%)"
        )
    print(line)


if __name__ == "__main__":
    main(*sys.argv[1:3])
