"""The `tvae-em` command line: registers the commands of `tvae_em.commands` on one click group.

A UserError anywhere below becomes a one-line message and exit code 2. To add a command, write
`tvae_em/commands/<name>.py` (examples in its docstring, one click command calling the library)
and add it to COMMANDS.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .commands.embed import embed
from .commands.generate import generate
from .commands.preprocess import preprocess
from .commands.select import select
from .commands.simulate import simulate
from .commands.train import train
from .errors import UserError

COMMANDS = [simulate, preprocess, train, embed, select, generate]


class _Group(click.Group):
    """A click group that turns UserError into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tvae-em")
def main() -> None:
    """tvae-em: unsupervised in-plane pose, shift and latent identity of cryo-EM particles.

    \b
    Typical use:
      tvae-em preprocess particles.star -o prep/ --size 64
      tvae-em train prep/particles.star -o run/
      tvae-em embed run/ prep/particles.star -o embedded.star
      tvae-em select embedded.star -o good.star --classes 1,3 --min-confidence 0.5
      tvae-em generate run/ -o figs/ --embedding embedded.npz
    """


for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
