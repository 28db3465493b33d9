"""`tvae-em generate`: PNGs of what a run learned (traversals, reconstructions, class averages).

tvae-em generate run/ -o figs/
tvae-em generate run/ -o figs/ --embedding embedded.npz --particles prep/particles.star
tvae-em generate run/ -o figs/ --embedding embedded.npz --dims 1,2 --size 128 --n-steps 11
"""

from __future__ import annotations

import click

from .options import checkpoint_option, datadir_option, device_option, out_option


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@out_option("Folder for the figures (created).")
@click.option(
    "--embedding",
    type=click.Path(dir_okay=False),
    help="The .npz of tvae-em embed: traverse its principal axes; class averages, "
    "latent scatter, pose histograms.",
)
@click.option(
    "--particles",
    type=click.Path(dir_okay=False),
    help="The particles that were embedded: reconstructions and class averages.",
)
@click.option("--size", type=int, help="Render generated images at this size (px). [default: box]")
@click.option("--n-steps", type=int, default=9, show_default=True, help="Images per traversal.")
@click.option(
    "--dims",
    help="Latent dimensions (or principal axes) to traverse, e.g. 1,2 "
    "(1-based). [default: all, up to 10]",
)
@click.option(
    "--range",
    "value_range",
    type=float,
    default=2.5,
    show_default=True,
    help="Traverse from -RANGE to +RANGE sds.",
)
@click.option(
    "--classes",
    type=int,
    help="Re-cluster the embedding into K k-means classes (and write them per particle: "
    "particle_classes.csv/.star). [default: the embedding's classes]",
)
@click.option("--n-recon", type=int, default=8, show_default=True, help="Particles to reconstruct.")
@device_option()
@checkpoint_option()
@datadir_option()
@click.option("--input-apix", type=float, help="Pixel size in A of --particles.")
def generate(**kw) -> None:
    """PNGs of what a run learned: latent traversals, the latent plane (2 dims), reconstructions,
    aligned class averages (+ class_averages.mrcs/.star), latent scatter, pose histograms.

    \b
    Example:
      tvae-em generate run/ -o figs/
      tvae-em generate run/ -o figs/ --embedding embedded.npz \\
          --particles prep/particles.star --size 128
      tvae-em generate run/ -o figs/ --embedding embedded.npz \\
          --particles prep/particles.star --classes 4
    """
    from ..generate import GenerateOptions, generate_figures
    from ..progress import progress_bar

    summary = generate_figures(GenerateOptions(**kw), progress=progress_bar)
    for note in summary.notes:
        click.echo(f"Note: {note}", err=True)
    click.echo(summary.line())
