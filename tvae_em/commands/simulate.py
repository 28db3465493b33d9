"""`tvae-em simulate`: a data set with known poses and classes, to check tvae-em on it.

tvae-em simulate particles -o sim/ --n 2000 --box 64 --snr 0.1 --volume map.mrc
tvae-em simulate particles -o hard/ --hard --n 3000 --snr 0.05
tvae-em simulate glyphs -o glyphs/ --n 500 --views 3
tvae-em simulate mnist-u -o mnist_u/ --mnist-dir data/mnist
"""

from __future__ import annotations

import click

from .options import out_option, seed_option


@click.command()
@click.argument("kind", type=click.Choice(["glyphs", "hinge", "mnist-n", "mnist-u", "particles"]))
@out_option("Output folder (created): particles.star, particles.mrcs, truth.csv.")
@click.option(
    "--n",
    type=int,
    default=None,
    help="Number of images [particles/glyphs: 1000; MNIST: all 10,000].",
)
@click.option(
    "--box",
    type=int,
    default=None,
    help="Image size in pixels [glyphs 40, MNIST 50, particles: the volume's, 48].",
)
@click.option(
    "--snr",
    type=float,
    default=None,
    help="Signal-to-noise ratio (signal/noise variance) [particles 0.1; glyphs: none].",
)
@click.option("--no-ctf", is_flag=True, help="Particles: no CTF (and no defocus columns).")
@click.option(
    "--volume",
    type=click.Path(dir_okay=False),
    help="Particles: project this MRC density instead of a random blob volume.",
)
@click.option(
    "--views",
    type=int,
    default=None,
    help="Number of classes: projection directions (particles) or glyph shapes (1-5) [3].",
)
@click.option(
    "--volumes",
    type=int,
    default=None,
    help="Particles: this many look-alike blob volumes; class c is a view of volume c mod M [1].",
)
@click.option(
    "--hard",
    is_flag=True,
    help="Particles: the hard preset, 3 look-alike volumes x 2 views, 64 px at 2 A "
    "(for what --volumes/--views/--box/--apix leave unset).",
)
@click.option(
    "--defocus",
    type=(float, float),
    default=(1.0, 2.5),
    show_default=True,
    metavar="MIN MAX",
    help="Particles: defocus range in um (uniform; plus up to 500 A astigmatism).",
)
@click.option(
    "--apix",
    type=float,
    default=None,
    help="Particles: pixel size in Angstrom [the volume header's, else 4.0].",
)
@click.option(
    "--shift-sd",
    type=float,
    default=2.0,
    show_default=True,
    help="Standard deviation of the random shifts, in pixels.",
)
@click.option(
    "--mnist-dir",
    type=click.Path(file_okay=False),
    help="MNIST: folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.",
)
@click.option(
    "--hinge-max",
    type=float,
    default=60.0,
    show_default=True,
    help="Hinge: the largest angle (degrees) the moving domain turns by (uniform from 0).",
)
@click.option("--float16", is_flag=True, help="Write the stack as float16 (half the size).")
@seed_option("Random seed.")
def simulate(
    kind,
    out_dir,
    n,
    box,
    snr,
    no_ctf,
    volume,
    views,
    volumes,
    hard,
    defocus,
    apix,
    shift_sd,
    mnist_dir,
    hinge_max,
    float16,
    seed,
) -> None:
    """Make a data set with known poses and classes, to check tvae-em on it.

    \b
    KIND: glyphs (letters F, L, P, ...), mnist-n / mnist-u (the paper's rotated digits:
    normal sd pi/4 or uniform angles, 50x50), particles (projections of a 3D density at
    --views directions, uniform in-plane rotation, CTF, noise at --snr), hinge (one flexible
    two-domain object whose second domain turns about a hinge by a per-particle angle from 0
    to --hinge-max degrees, written to truth.csv as hinge_deg; CTF and noise as particles).
    The truth (angle, shift, class, and the RELION psi/origins that undo them) is in truth.csv;
    particles also write templates.mrcs and views.csv (each class's best correlation with every
    other under in-plane rotation, shift and mirror). A set where two classes correlate above
    0.98 is refused: they would be one view.

    \b
    Example:
      tvae-em simulate particles -o sim/ --n 2000 --box 64 --snr 0.1 --volume map.mrc
      tvae-em simulate particles -o hard/ --hard --n 3000 --snr 0.05
      tvae-em simulate hinge -o hinge/ --n 3000 --snr 0.1
      tvae-em simulate mnist-u -o mnist_u/ --mnist-dir data/mnist
    """
    from ..synthetic import build_dataset

    paths = build_dataset(
        kind,
        out_dir,
        n=n,
        box=box,
        snr=snr,
        ctf=not no_ctf,
        volume=volume,
        views=views,
        volumes=volumes,
        defocus_um=defocus,
        hard=hard,
        mnist_dir=mnist_dir,
        hinge_max_deg=hinge_max,
        seed=seed,
        apix=apix,
        t_sd_px=shift_sd,
        float16=float16,
    )
    for what, path in paths.items():
        click.echo(f"{what:>9}: {path}")
