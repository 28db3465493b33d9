"""`tvae-em embed`: per-particle pose, shift, latent z, confidence and ELBO -> RELION/cryoSPARC.

    tvae-em embed run/ prep/particles.star -o embedded.star --classes 10
    tvae-em embed run/ prep/particles.star -o embedded.star \\
        --original Extract/job012/particles.star --cs embedded.cs
    tvae-em embed run/ prep/particles.star -o quick.star --no-elbo --checkpoint best
    tvae-em embed run/ prep/particles.star -o embedded.star --classes 10 \\
        --class2d Class2D/run_it000
"""

from __future__ import annotations

import click

from .options import (
    batch_size_option,
    checkpoint_option,
    datadir_option,
    device_option,
    input_apix_option,
    num_workers_option,
    optics_options,
    out_option,
    seed_option,
)


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.argument("input", metavar="INPUT", type=click.Path(dir_okay=False))
@out_option(
    "Output RELION 3.1 star (.star); OUT.npz is written next to it.", file=True, dest="out_star"
)
@click.option("--classes", type=int, help="k-means classes in z space -> rlnClassNumber (1-based).")
@click.option(
    "--original",
    type=click.Path(dir_okay=False),
    help="Full-size star/cs that INPUT was preprocessed from (same particles, same "
    "order): also write its rows with these poses, origins at its pixel size.",
)
@click.option(
    "--original-out",
    type=click.Path(dir_okay=False),
    help="Star for --original. [default: OUT_original.star]",
)
@click.option(
    "--cs",
    "cs_out",
    type=click.Path(dir_okay=False),
    help="Also write a cryoSPARC .cs (of --original when given, else of INPUT): blob/*, ctf/* "
    "(or a .cs input's fields) and alignments2D/*; needs particles with defocus.",
)
@click.option(
    "--class2d",
    metavar="PREFIX",
    help="With --classes: also write PREFIX_data.star, PREFIX_model.star and "
    "PREFIX_classes.mrcs as relion_refine's 2D classification does (e.g. Class2D/run_it000).",
)
@click.option(
    "--npz",
    "npz_out",
    type=click.Path(dir_okay=False),
    help="Arrays for scripting. [default: OUT with .npz]",
)
@click.option(
    "--recentre",
    type=click.Choice(["class", "particle", "none"]),
    default="class",
    show_default=True,
    help="Origins centre each class's object (its particles' mean centre; each particle's own "
    "without --classes), each particle's object, or the model's template origin.",
)
@click.option(
    "--classify",
    type=click.Choice(["templates", "kmeans"]),
    default="templates",
    show_default=True,
    help="With --classes: k-means on z, then each particle to the class whose template (the "
    "model's image of the class's mean z) it fits best after a search of every angle and shift "
    "(templates), or the k-means classes and per-particle poses as they are (kmeans).",
)
@click.option(
    "--class-rounds",
    type=int,
    default=2,
    show_default=True,
    help="With --classify templates: rounds that re-align the particles to their aligned, "
    "phase-flipped class averages (the M-step of a 2D classification) and re-assign classes.",
)
@click.option(
    "--class-moves",
    type=int,
    default=3,
    show_default=True,
    help="With --classify templates: then up to this many split-and-merge moves, each "
    "re-seeding the cheapest class to remove with half of the class whose split explains most, "
    "kept only if the summed log-likelihood rises (recovers a lost class; 0: none).",
)
@click.option(
    "--refine/--no-refine",
    default=True,
    show_default=True,
    help="Refine each pose against the particle's own template (a 5-deg search of the circle, "
    "then 1-deg steps, every shift; sub-step interpolation): continuous angles, no half turns.",
)
@batch_size_option()
@device_option()
@num_workers_option()
@click.option(
    "--elbo/--no-elbo",
    "with_elbo",
    default=True,
    show_default=True,
    help="Per-particle ELBO (renders every particle: about half the time).",
)
@click.option(
    "--amp/--no-amp",
    default=True,
    show_default=True,
    help="bf16 autocast for the encoder and the ELBO on CUDA and on CPUs with bf16 arithmetic.",
)
@checkpoint_option()
@datadir_option()
@input_apix_option("Pixel size in A of INPUT (overrides the files).")
@optics_options()
@seed_option("Seed of k-means and of the ELBO's sample.")
def embed(**kw) -> None:
    """Per-particle in-plane angle, shift, latent z, confidence and ELBO -> RELION/cryoSPARC.

    RUN is a training run folder; INPUT the particles (.star, .cs, .mrcs) at the model's box
    size. The star keeps every input column and optics group; rlnAnglePsi, rlnOriginX/YAngst
    (and rlnClassNumber with --classes) are replaced. See docs/outputs.md.

    \b
    Example:
      tvae-em embed run/ prep/particles.star -o embedded.star --classes 10
      tvae-em embed run/ prep/particles.star -o embedded.star \\
          --original Extract/job012/particles.star --cs embedded.cs
    """
    from ..embed import EmbedOptions, embed_particles
    from ..progress import progress_bar

    click.echo(embed_particles(EmbedOptions(**kw), progress=progress_bar).line())
