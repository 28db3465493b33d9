#!/usr/bin/env bash
# End-to-end demo on the embedded example set (examples/data): preprocess -> train -> embed -> generate.
# Usage: bash examples/run_demo.sh [VENV_BIN]   (the Makefile passes .venv/bin)
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=demo_out
rm -rf "$OUT"
"$BIN/tvae-em" preprocess examples/data/particles.star -o "$OUT/prep" --size 32
# The defaults: CTF-aware training (the star has defocus) with the Fourier renderer, where the CTF
# is a product and costs nothing extra; about a minute of training on a laptop CPU.
"$BIN/tvae-em" train "$OUT/prep/particles.star" -o "$OUT/run" --epochs 8 --batch-size 32 \
    --seed 0
"$BIN/tvae-em" embed "$OUT/run" "$OUT/prep/particles.star" -o "$OUT/embedded.star" --classes 3
"$BIN/tvae-em" generate "$OUT/run" -o "$OUT/figs" --embedding "$OUT/embedded.npz" \
    --particles "$OUT/prep/particles.star"
"$BIN/python" examples/score_demo.py "$OUT/embedded.star" examples/data/truth.csv
echo "Demo outputs in $OUT/: prep/ (preprocessed stack), run/ (model), embedded.star, figs/ (PNGs)"
