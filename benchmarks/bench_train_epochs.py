"""Wall time of whole trainings side by side: today's default against the code path before issue 10.

    python benchmarks/bench_train_epochs.py STAR --epochs 5
    python benchmarks/bench_train_epochs.py STAR --epochs 5 --variants default fp32 old

Each variant is `tvae_em.training.train` on STAR in its own process with one torch thread, all
started together, so the machine's load hits them alike. `old` is the default path for stars with
defocus before issue 10 (real-space generator on every pixel with the CTF by an FFT pair, every
pixel a translation cell, batch 64, float32, no pose search, the paper's z head); it runs one
epoch (it takes as long as the others' five), and its time for --epochs is that epoch's time x
--epochs (its epochs all cost the same). `fp32` is the default with bf16 autocast off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "default": {},
    "fp32": {"amp": False},
    "hidden256": {"generator_hidden": 256},
    "old": {
        "renderer": "real",
        "batch_size": 64,
        "amp": False,
        "pose_search_from": 0,
        "z_source": "cells",
        "z_turn_penalty": 0.0,
        "model_overrides": {"shift_window": 1e6},
    },
}
CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from tvae_em.training import TrainOptions, train
star, out, epochs, kw = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
t0, marks = time.time(), []
opts = TrainOptions(input=star, out_dir=out, epochs=epochs, checkpoint_every=epochs, **kw)
train(opts, log=lambda m: marks.append(round(time.time() - t0, 1)) if m.startswith("epoch") else 0)
print(json.dumps({"seconds": round(time.time() - t0, 1), "epoch_ends_s": marks}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("star", help="particles (.star with defocus for the CTF path)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["default", "old"], choices=list(VARIANTS))
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name in args.variants:
            epochs = 1 if name == "old" else args.epochs
            cmd = [sys.executable, "-c", CHILD, args.star, str(Path(tmp) / name), str(epochs),
                   json.dumps(VARIANTS[name])]  # fmt: skip
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        started = time.time()
        rows = {}
        for name, proc in procs.items():
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{name}: training failed (exit {proc.returncode})")
            rows[name] = json.loads(out.strip().splitlines()[-1])
    for name, row in rows.items():
        row["variant"] = name
        row["epochs_s"] = row["seconds"] * (args.epochs if name == "old" else 1)
        if "old" in rows:
            row["speed_vs_old"] = round(rows["old"]["seconds"] * args.epochs / row["epochs_s"], 2)
        print(json.dumps(row))
    print(json.dumps({"wall_s": round(time.time() - started, 1), "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
