"""Click options shared by several commands (one definition each), and their checks."""

from __future__ import annotations

import click

from ..errors import UserError


def out_option(help: str, file: bool = False, checked: bool = True, dest: str = "out_dir"):
    """-o/--out (required): an output folder, or with ``file`` an output file; ``checked=False``
    leaves every check to the library (its messages name the folder)."""
    kind = click.Path(dir_okay=False) if file else click.Path(file_okay=False)
    return click.option(
        "-o", "--out", dest, required=True, type=kind if checked else None, help=help
    )


def device_option():
    return click.option(
        "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K."
    )


def datadir_option(help: str = "Folder to find stacks in."):
    return click.option("--datadir", type=click.Path(file_okay=False), help=help)


def input_apix_option(help: str = "Pixel size in A of the input (overrides the files)."):
    return click.option("--input-apix", type=float, help=help)


def seed_option(help: str = "Random seed (fixes everything)."):
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def batch_size_option(default: int = 64):
    return click.option(
        "--batch-size", type=int, default=default, show_default=True, help="Particles per batch."
    )


def num_workers_option():
    return click.option(
        "--num-workers",
        type=int,
        default=0,
        show_default=True,
        help="Data-loading worker processes.",
    )


def checkpoint_option():
    return click.option(
        "--checkpoint",
        type=click.Choice(["last", "best"]),
        default="last",
        show_default=True,
        help="Which checkpoint of RUN to use.",
    )


def renamed_option(old: str, new: str, why: str):
    """A hidden option that refuses an old spelling with a one-line pointer to the new one."""

    def refuse(ctx: click.Context, param: click.Parameter, value) -> None:
        if value is not None:
            raise UserError(f"{old} was renamed {new} in this command ({why})")

    return click.option(old, hidden=True, expose_value=False, callback=refuse, help=why)


def optics_options():
    """--voltage, --spherical-aberration, --amplitude-contrast: the optics written for inputs
    that lack them (a bare .mrcs, a star without them); RELION's defaults."""
    from ..io import OpticsDefaults

    d = OpticsDefaults()
    where = "for inputs that have none (a bare .mrcs); never replaces the input's"
    options = [
        click.option(
            "--voltage",
            type=float,
            default=d.voltage,
            show_default=True,
            help=f"Microscope voltage in kV {where}.",
        ),
        click.option(
            "--spherical-aberration",
            type=float,
            default=d.spherical_aberration,
            show_default=True,
            help=f"Spherical aberration Cs in mm {where}.",
        ),
        click.option(
            "--amplitude-contrast",
            type=float,
            default=d.amplitude_contrast,
            show_default=True,
            help=f"Amplitude contrast (fraction) {where}.",
        ),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate
