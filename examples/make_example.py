"""Build the demo data set in examples/data/: 400 simulated particles with known poses and classes.

Projections of a random blob density (tvae_em.synthetic.blob_volume) at 3 views (the classes),
uniform in-plane rotation, shifts with sd 2 px, a per-particle CTF (defocus 1-2.5 um, 300 kV),
Gaussian noise at SNR 1.0; 48x48 at 4 A/px, stored as float16 to stay under 2 MB.
Run from anywhere: python examples/make_example.py
"""

from __future__ import annotations

from pathlib import Path

from tvae_em.synthetic import blob_volume, simulate_particles, spread_views, write_dataset

OUT = Path(__file__).resolve().parent / "data"
N, BOX, APIX, SNR, VIEWS, SEED = 400, 48, 4.0, 1.0, 3, 0


def main() -> None:
    """Simulate the set and write particles.mrcs, particles.star, truth.csv, templates.mrcs."""
    images, truth = simulate_particles(
        blob_volume(BOX, seed=SEED),
        N,
        spread_views(VIEWS),
        box=BOX,
        apix=APIX,
        snr=SNR,
        defocus_range_um=(1.0, 2.5),
        ctf=True,
        t_sd_px=2.0,
        seed=SEED,
    )
    paths = write_dataset(OUT, images, truth, APIX, truth["ctf"], float16=True)
    for what, path in paths.items():
        print(f"{what:>9}: {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
