"""Compare two particle stars column by column: the check that a change kept results the same.

    python examples/compare_stars.py demo_out/embedded.star old_demo_out/embedded.star
    python examples/compare_stars.py a.star b.star --atol 1e-4

Prints the largest difference of every numeric column (and any text column that differs) and
exits 1 when the tables differ beyond --atol (0: bit-identical as written), else 0.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from tvae_em.io import read_star


def compare(a: pd.DataFrame, b: pd.DataFrame, atol: float) -> list[str]:
    """One line per difference between two tables (same columns, rows in the same order)."""
    problems = []
    if list(a.columns) != list(b.columns):
        problems.append(f"columns differ: {list(a.columns)} vs {list(b.columns)}")
    if len(a) != len(b):
        return [*problems, f"row counts differ: {len(a)} vs {len(b)}"]
    for col in [c for c in a.columns if c in b.columns]:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            diff = float(np.nanmax(np.abs(x.to_numpy(np.float64) - y.to_numpy(np.float64))))
            print(f"{col:>24}: max |difference| {diff:.3g}")
            if diff > atol:
                problems.append(f"{col}: differs by up to {diff:.3g} (> {atol:g})")
        elif not x.astype(str).equals(y.astype(str)):
            problems.append(
                f"{col}: text differs in {int((x.astype(str) != y.astype(str)).sum())} rows"
            )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    a, b = read_star(args.a), read_star(args.b)
    problems = []
    for block in sorted(set(a) | set(b)):
        if block not in a or block not in b:
            problems.append(f"block data_{block} is in only one file")
            continue
        print(f"data_{block}:")
        problems += [f"data_{block} {p}" for p in compare(a[block], b[block], args.atol)]
    for p in problems:
        print(f"DIFFERENT: {p}")
    print("same" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
