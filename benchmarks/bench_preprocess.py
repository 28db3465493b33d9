"""Benchmark `preprocess`: throughput and peak memory on a synthetic stack larger than the chunk.

Writes a RELION 3.1 star + float32 stack of N x BOX x BOX particles to a temporary folder, then
preprocesses it to SIZE in a child process per chunk size and reports particles/s and memory:
peak anonymous RSS (heap: what the chunk bounds) and peak total RSS (VmHWM, which also counts
shared libraries and mapped file pages). The child's VmHWM is used, not ru_maxrss: on Linux
ru_maxrss of an exec'd child keeps the RSS of the parent at fork time. Linux only (/proc).

    python benchmarks/bench_preprocess.py --n 20000 --box 128 --size 64 --chunk-size 100 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em.io import write_stack, write_star

CHILD = """
import json, sys, time
from tvae_em.io import ParticleStack
from tvae_em.preprocess import preprocess_stack
star, out, size, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
s = preprocess_stack(ParticleStack.open(star), out, size=size, chunk_size=chunk)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "n": s.n_out, "peak_rss_mb": int(hwm) / 1024}))
"""


def make_input(folder: Path, n: int, box: int, apix: float = 1.0, chunk: int = 1000) -> Path:
    """A noisy-blob float32 stack and its RELION 3.1 star, written chunk by chunk."""
    rng = np.random.default_rng(0)
    r = np.arange(box) - box // 2
    blob = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (box / 8) ** 2)).astype(np.float32)

    def chunks():
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            yield (blob + rng.normal(size=(b, box, box))).astype(np.float32)

    write_stack(folder / "in.mrcs", chunks(), n, box, apix)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@in.mrcs" for i in range(1, n + 1)],
            "rlnOpticsGroup": 1,
            "rlnDefocusU": rng.uniform(1e4, 3e4, n),
        }
    )
    write_star(folder / "in.star", {"optics": optics, "particles": particles})
    return folder / "in.star"


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(star: Path, out: Path, size: int, chunk: int) -> dict:
    """Preprocess in a fresh process; sample its anonymous RSS every 20 ms."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(star), str(out), str(size), str(chunk)],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak_anon = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak_anon[0] = max(peak_anon[0], _status_kb(proc.pid, "RssAnon"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess child failed with code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_anon_rss_mb"] = peak_anon[0] / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write (default: tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        star = make_input(folder, args.n, args.box)
        input_mb = args.n * args.box**2 * 4 / 2**20
        print(
            f"input: {args.n} x {args.box}^2 float32 = {input_mb:.0f} MiB, written in "
            f"{time.perf_counter() - t0:.1f} s; output {args.size}^2"
        )
        for chunk in args.chunk_size:
            r = run_child(star, folder / f"out{chunk}", args.size, chunk)
            chunk_mb = chunk * args.box**2 * 4 / 2**20
            rate = r["n"] / r["seconds"]
            print(
                f"chunk {chunk:>6} ({chunk_mb:6.1f} MiB raw): {rate:8.0f} particles/s "
                f"({r['seconds']:.1f} s), peak anonymous RSS {r['peak_anon_rss_mb']:6.0f} MiB, "
                f"peak total RSS {r['peak_rss_mb']:6.0f} MiB"
            )


if __name__ == "__main__":
    main()
