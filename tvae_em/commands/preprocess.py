"""`tvae-em preprocess`: downsample and normalise particles into one float32 stack.

tvae-em preprocess Extract/job012/particles.star -o prep/ --size 64
tvae-em preprocess J24_particles.cs -o prep/ --apix 4 --datadir /data/P12 --invert
tvae-em preprocess particles.star -o prep/ --size 64 --phase-flip --skip-bad
"""

from __future__ import annotations

import click

from .options import datadir_option, input_apix_option, optics_options, out_option


@click.command()
@click.argument("input_path", metavar="INPUT")
@out_option(
    "Output folder (created): particles.mrcs, particles.star (+ particles.cs for .cs input).",
    checked=False,
)
@click.option("--size", type=int, help="Output box in pixels (even, at most the input box).")
@click.option("--apix", type=float, help="Target pixel size in Angstrom (sets an even --size).")
@click.option("--invert", is_flag=True, help="Invert the contrast (use when particles are dark).")
@click.option(
    "--lowpass", "lowpass_A", type=float, help="Gaussian low-pass to this resolution (A)."
)
@click.option(
    "--skip-bad", is_flag=True, help="Drop particles with NaN/Inf pixels (and count them)."
)
@click.option(
    "--phase-flip",
    is_flag=True,
    help="Phase-flip each particle with its CTF (needs defocus columns); training then models "
    "|CTF|.",
)
@datadir_option("Extra folder to look for the stacks named in the star/cs.")
@input_apix_option("Input pixel size in A (overrides the files).")
@optics_options()
@click.option(
    "--chunk-size",
    type=int,
    default=None,
    help="Particles per chunk; memory is bounded by it. [default: ~64 MiB of input, <= 1000]",
)
@click.option(
    "--norm",
    type=click.Choice(["background", "image"]),
    default="background",
    show_default=True,
    help="Normalise on the background outside 0.75 x the half box, or on the whole image "
    "(for noise-free simulations).",
)
def preprocess(input_path, out_dir, datadir, input_apix, **kw) -> None:
    """Downsample, normalise (and optionally invert / low-pass) particles into one float32 stack.

    INPUT is a RELION star (3.0 or 3.1+), a cryoSPARC .cs file or a .mrcs/.mrc stack. Writes
    OUT/particles.mrcs and OUT/particles.star (RELION 3.1, every input value kept as read, image
    paths valid from the folder this runs in, as RELION's project folder); nothing is left behind
    if it fails.

    \b
    Example:
      tvae-em preprocess Extract/job012/particles.star -o prep/ --size 64
      tvae-em preprocess J24_particles.cs -o prep/ --apix 4 --datadir /data/P12 --invert
    """
    from ..io import OpticsDefaults, ParticleStack
    from ..preprocess import preprocess_stack
    from ..progress import progress_bar

    optics = OpticsDefaults(
        kw.pop("voltage"), kw.pop("spherical_aberration"), kw.pop("amplitude_contrast")
    )
    stack = ParticleStack.open(input_path, datadir=datadir, apix=input_apix, optics=optics)
    if stack.apix_source == "MRC header":
        click.echo(
            f"Note: pixel size {stack.apix[0]:g} A taken from the MRC header; "
            "use --input-apix if it is wrong.",
            err=True,
        )
    summary = preprocess_stack(stack, out_dir, progress=progress_bar, **kw)
    if summary.skipped:
        shown = ", ".join(f"{i + 1} ({why})" for i, why in summary.skipped[:5])
        click.echo(f"Skipped particles: {shown}{' ...' if summary.n_skipped > 5 else ''}", err=True)
    click.echo(summary.one_line())
