"""`tvae-em select`: a subset of embedded particles, back to RELION (and cryoSPARC).

tvae-em select embedded.star -o class1_3.star --classes 1,3
tvae-em select embedded.star -o good.star --min-confidence 0.5 --elbo-quantile 0.1
tvae-em select embedded.star -o region.star --z 1:-0.5:0.5 --z 2::0
tvae-em select embedded.star -o full.star --classes 2 --original Extract/job012/particles.star
tvae-em select embedded.star -o subset.star --classes 1 --original J42_particles.cs
"""

from __future__ import annotations

import click

from .options import datadir_option, out_option


@click.command()
@click.argument("input", metavar="EMBEDDED", type=click.Path(dir_okay=False))
@out_option("Output RELION 3.1 star of the kept particles (.star).", file=True, dest="out_star")
@click.option("--classes", help="Keep these classes (rlnClassNumber, 1-based), e.g. 1,3.")
@click.option(
    "--min-confidence",
    type=float,
    help="Keep particles whose pose confidence tvaePoseConfidence is at least this (0-1; not "
    "the class posterior rlnMaxValueProbDistribution).",
)
@click.option(
    "--elbo-quantile",
    type=float,
    help="Drop the particles below this quantile of tvaeElbo (0.1 drops the worst 10%).",
)
@click.option(
    "--z",
    multiple=True,
    metavar="DIM:MIN:MAX",
    help="Keep MIN <= tvaeZ<DIM> <= MAX (DIM 1-based; a bound may be empty); repeatable.",
)
@click.option(
    "--original",
    type=click.Path(dir_okay=False),
    help="The full-size star/cs EMBEDDED's particles were preprocessed from: write its rows "
    "(its images and pixel size; origins in Angstrom are the same shifts).",
)
@click.option(
    "--cs",
    "cs_out",
    type=click.Path(dir_okay=False),
    help="Also write a cryoSPARC .cs. [default: OUT with .cs when the particles are a .cs]",
)
@click.option(
    "--npz",
    type=click.Path(dir_okay=False),
    help="The npz embed wrote with EMBEDDED (for the .cs). [default: EMBEDDED with .npz]",
)
@datadir_option()
def select(**kw) -> None:
    """Keep the embedded particles of some classes, confident poses, good ELBO or a z region.

    EMBEDDED is a star written by tvae-em embed. Criteria combine (a particle must pass all);
    none keeps every particle. The output keeps every column of the particles it writes.
    See docs/outputs.md.

    \b
    Example:
      tvae-em select embedded.star -o good.star --classes 1,3 --min-confidence 0.5
      tvae-em select embedded.star -o full.star --elbo-quantile 0.1 --z 1:-0.5:0.5 \\
          --original Extract/job012/particles.star
    """
    from ..select import SelectOptions, select_particles

    click.echo(select_particles(SelectOptions(**kw)).line())
