"""`tvae-em train`: train the equivariant VAE on a particle stack, or resume a run.

tvae-em train prep/particles.star -o run/ --z-dim 2 --epochs 50
tvae-em train --resume run/            # continue after a crash or Ctrl-C
tvae-em train --resume run/ --epochs 80
torchrun --nproc_per_node=4 -m tvae_em.cli train prep/particles.star -o run/
"""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from .options import (
    datadir_option,
    device_option,
    input_apix_option,
    num_workers_option,
    renamed_option,
    seed_option,
)


@click.command()
@click.argument("input", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Run folder to create."
)
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--z-dim", type=int, default=2, show_default=True, help="Latent dimensions.")
@click.option("--rotations", type=int, default=8, show_default=True, help="Rotation bins N (C_N).")
@click.option("--epochs", type=int, default=20, show_default=True, help="Total epochs.")
@click.option(
    "--batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Particles per step. 16 learns more per epoch than 64 at the same CPU cost per particle "
    "(docs/training.md); on a GPU larger batches (128-512) use the device better.",
)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--t-sd", help="Shift prior sd: pixels (4, 4px) or Angstrom (12A). [default: 5% of box]"
)
@click.option(
    "--r-prior",
    type=click.Choice(["uniform", "gaussian"]),
    default="uniform",
    show_default=True,
    help="Prior over rotation bins.",
)
@click.option(
    "--r-prior-sd",
    "r_prior_sd_deg",
    type=float,
    default=45.0,
    show_default=True,
    help="Gaussian rotation prior sd (degrees).",
)
@click.option(
    "--likelihood",
    type=click.Choice(["auto", "gaussian", "bernoulli"]),
    default="auto",
    show_default=True,
    help="auto: bernoulli for images in [0, 1], else gaussian.",
)
@click.option(
    "--ctf/--no-ctf",
    "ctf",
    default=None,
    help="Apply each particle's CTF to the generator. [default: on when defocus is known]",
)
@click.option(
    "--tau", type=float, default=1.0, show_default=True, help="Gumbel-softmax temperature."
)
@click.option(
    "--angle-consistency",
    type=float,
    default=0.0,
    show_default=True,
    help="Training penalty (nats) on 1 - cos of the encoder's angle error when the image is "
    "turned within a rotation bin; 0 turns it off.",
)
@click.option(
    "--z-consistency",
    type=float,
    default=0.0,
    show_default=True,
    help="Training penalty (nats per unit^2) on z's change when the image is turned within a "
    "rotation bin (keeps z for the object, not its angle); 0 turns it off.",
)
@click.option(
    "--z-source",
    type=click.Choice(["auto", "cells", "aligned"]),
    default="auto",
    show_default=True,
    help="Where z is read: a linear map of the particle phase-flipped and aligned by its pose "
    "(auto for gaussian data: poses and flexibility apart; docs/model.md), or the encoder's "
    "winning cell (the paper; auto for binary images).",
)
@click.option(
    "--z-turn-penalty",
    type=float,
    default=10.0,
    show_default=True,
    help="With --z-source aligned: training penalty (nats per unit^2) on z's change when the "
    "pose is turned by up to 5 deg (from --pose-search-from on), so z does not correct the "
    "angle; 0 turns it off.",
)
@click.option(
    "--pose-search-from",
    type=int,
    help="From this epoch on, render each particle at the pose a likelihood search around the "
    "encoder's angle finds, and train the encoder to predict it; 0 turns it off. "
    "[default: 2 for gaussian data, 0 for binary images]",
)
@click.option(
    "--pixel-fraction",
    type=float,
    help="Real-space renderer: pixels scored per step (unbiased subsample).",
)
@click.option(
    "--renderer",
    type=click.Choice(["auto", "real", "fourier"]),
    default="auto",
    show_default=True,
    help="Generator on frequencies (fourier: the CTF is a product, exact poses) or on pixels "
    "(real). auto: fourier for the gaussian likelihood, real for bernoulli.",
)
@click.option(
    "--generator-hidden",
    type=int,
    default=512,
    show_default=True,
    help="Width of the generator's hidden layers (its cost grows with the square).",
)
@click.option(
    "--band-start",
    type=float,
    default=0.3,
    show_default=True,
    help="Fourier renderer: the band scored first, as a fraction of Nyquist.",
)
@click.option(
    "--band-epochs",
    type=float,
    help="Fourier renderer: epochs over which the band grows to Nyquist (0: no schedule). "
    "[default: 40% of --epochs]",
)
@seed_option()
@device_option()
@click.option(
    "--amp/--no-amp",
    default=True,
    show_default=True,
    help="bf16 autocast on CUDA and on CPUs with bf16 arithmetic (AVX512-BF16, AMX).",
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (CUDA only).")
@num_workers_option()
@click.option(
    "--checkpoint-every",
    type=int,
    default=1,
    show_default=True,
    help="Epochs between checkpoints (the last and best are always kept).",
)
@datadir_option()
@input_apix_option("Pixel size (A) of the input (a bare .mrcs has none).")
@renamed_option(
    "--apix", "--input-apix", "the pixel size of the input; preprocess --apix is a target"
)
@click.pass_context
def train(ctx: click.Context, input, out_dir, resume, **kw) -> None:
    """Train the equivariant VAE on a particle stack (.star, .cs or .mrcs).

    \b
    Example:
      tvae-em train prep/particles.star -o run/ --z-dim 2 --epochs 50
      tvae-em train --resume run/            # continue after a crash or Ctrl-C
      torchrun --nproc_per_node=4 -m tvae_em.cli train prep/particles.star -o run/
    """
    from ..progress import progress_bar
    from ..run import RunFolder
    from ..training import TrainingDiverged, TrainOptions
    from ..training import train as run_training

    explicit = {
        k for k in kw if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
    }
    kw["compile"] = kw.pop("compile_")
    if "compile_" in explicit:
        explicit = (explicit - {"compile_"}) | {"compile"}
    kw["ctf"] = {None: "auto", True: "on", False: "off"}[kw["ctf"]]
    if resume:
        if input is not None:
            explicit.add("input")
        merged = RunFolder(resume).resume_options({**kw, "input": input}, explicit)
        try:
            opts = TrainOptions(**merged)
        except TypeError:
            raise UserError(
                f"--resume {resume}: the options in its config.json are not those of this "
                "version of tvae-em; resume with the version that wrote it"
            ) from None
    else:
        if input is None or out_dir is None:
            raise UserError("train needs INPUT and -o RUN_FOLDER (or --resume RUN_FOLDER)")
        opts = TrainOptions(input=input, out_dir=out_dir, **kw)
    try:
        res = run_training(
            opts,
            resume=bool(resume),
            explicit=explicit,
            progress=progress_bar,
            log=lambda m: click.echo(m, err=True),
        )
    except TrainingDiverged as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    if res.interrupted:
        if RunFolder(res.run_dir).checkpoint_path("last").exists():
            click.echo(
                f"Interrupted after epoch {res.epochs_done}; resume with: tvae-em train "
                f"--resume {res.run_dir}",
                err=True,
            )
        else:
            click.echo(
                "Interrupted before the first checkpoint: nothing to resume; start the run "
                "again with the same command",
                err=True,
            )
        sys.exit(130)
    click.echo(
        f"Trained {res.epochs_done} epochs in {res.seconds:.0f} s ({res.particles_per_s:.1f} "
        f"particles/s); final loss {res.last_loss:.4g}, best {res.best_loss:.4g}; "
        f"run in {res.run_dir}/"
    )
