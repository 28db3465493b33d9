"""The `tvae-em` command line: thin click commands that parse options, call the library, print."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import UserError


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
      tvae-em generate run/ -o figs/ --embedding embedded.npz
    """


@main.command()
@click.argument("kind", type=click.Choice(["glyphs", "mnist-n", "mnist-u", "particles"]))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (created): particles.star, particles.mrcs, truth.csv.",
)
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
    default=3,
    show_default=True,
    help="Number of classes: projection directions (particles) or glyph shapes (1-5).",
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
@click.option("--float16", is_flag=True, help="Write the stack as float16 (half the size).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
def simulate(
    kind, out_dir, n, box, snr, no_ctf, volume, views, apix, shift_sd, mnist_dir, float16, seed
) -> None:
    """Make a data set with known poses and classes, to check tvae-em on it.

    \b
    KIND: glyphs (letters F, L, P, ...), mnist-n / mnist-u (the paper's rotated digits:
    normal sd pi/4 or uniform angles, 50x50), particles (projections of a 3D density at
    --views directions, uniform in-plane rotation, CTF, noise at --snr).
    The truth (angle, shift, class, and the RELION psi/origins that undo them) is in truth.csv.

    \b
    Example:
      tvae-em simulate particles -o sim/ --n 2000 --box 64 --snr 0.1 --volume map.mrc
      tvae-em simulate mnist-u -o mnist_u/ --mnist-dir data/mnist
    """
    from .synthetic import build_dataset

    paths = build_dataset(
        kind,
        out_dir,
        n=n,
        box=box,
        snr=snr,
        ctf=not no_ctf,
        volume=volume,
        views=views,
        mnist_dir=mnist_dir,
        seed=seed,
        apix=apix,
        t_sd_px=shift_sd,
        float16=float16,
    )
    for what, path in paths.items():
        click.echo(f"{what:>9}: {path}")


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    help="Output folder (created): particles.mrcs, particles.star (+ particles.cs for .cs input).",
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
@click.option("--datadir", help="Extra folder to look for the stacks named in the star/cs.")
@click.option("--input-apix", type=float, help="Input pixel size in A (overrides the files).")
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
def preprocess(
    input_path,
    out_dir,
    size,
    apix,
    invert,
    lowpass_A,
    skip_bad,
    datadir,
    input_apix,
    chunk_size,
    norm,
    phase_flip,
) -> None:
    """Downsample, normalise (and optionally invert / low-pass) particles into one float32 stack.

    INPUT is a RELION star (3.0 or 3.1+), a cryoSPARC .cs file or a .mrcs/.mrc stack. Writes
    OUT/particles.mrcs and OUT/particles.star (RELION 3.1, every input column kept); nothing is
    left behind if it fails.

    \b
    Example:
      tvae-em preprocess Extract/job012/particles.star -o prep/ --size 64
      tvae-em preprocess J24_particles.cs -o prep/ --apix 4 --datadir /data/P12 --invert
    """
    from .io import ParticleStack
    from .preprocess import preprocess_stack
    from .progress import progress_bar

    stack = ParticleStack.open(input_path, datadir=datadir, apix=input_apix)
    if stack.apix_source == "MRC header":
        click.echo(
            f"Note: pixel size {stack.apix[0]:g} A taken from the MRC header; "
            "use --input-apix if it is wrong.",
            err=True,
        )
    with progress_bar(len(stack), "preprocess") as advance:
        summary = preprocess_stack(
            stack,
            out_dir,
            size=size,
            apix=apix,
            invert=invert,
            lowpass_A=lowpass_A,
            skip_bad=skip_bad,
            chunk_size=chunk_size,
            progress=advance,
            norm=norm,
            phase_flip=phase_flip,
        )
    if summary.skipped:
        shown = ", ".join(f"{i + 1} ({why})" for i, why in summary.skipped[:5])
        click.echo(f"Skipped particles: {shown}{' ...' if summary.n_skipped > 5 else ''}", err=True)
    click.echo(summary.one_line())


@main.command()
@click.argument("input", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Run folder to create."
)
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--z-dim", type=int, default=2, show_default=True, help="Latent dimensions.")
@click.option("--rotations", type=int, default=8, show_default=True, help="Rotation bins N (C_N).")
@click.option("--epochs", type=int, default=20, show_default=True, help="Total epochs.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Particles per step.")
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
@click.option("--pixel-fraction", type=float, help="Pixels scored per step (unbiased subsample).")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Random seed (fixes everything)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (CUDA only).")
@click.option(
    "--num-workers", type=int, default=0, show_default=True, help="Data-loading worker processes."
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=1,
    show_default=True,
    help="Epochs between checkpoints (the last and best are always kept).",
)
@click.option("--datadir", type=click.Path(file_okay=False), help="Folder to find stacks in.")
@click.option("--apix", type=float, help="Pixel size (A) of a bare .mrcs input.")
@click.pass_context
def train(ctx: click.Context, input, out_dir, resume, **kw) -> None:
    """Train the equivariant VAE on a particle stack (.star, .cs or .mrcs).

    \b
    Example:
      tvae-em train prep/particles.star -o run/ --z-dim 2 --epochs 50
      tvae-em train --resume run/            # continue after a crash or Ctrl-C
      torchrun --nproc_per_node=4 -m tvae_em.cli train prep/particles.star -o run/
    """
    from .progress import progress_bar
    from .train import TrainingDiverged, TrainOptions, options_from_run
    from .train import train as run_training

    explicit = {
        k for k in kw if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
    }
    kw["compile"] = kw.pop("compile_")
    if "compile_" in explicit:
        explicit = (explicit - {"compile_"}) | {"compile"}
    kw["ctf"] = {None: "auto", True: "on", False: "off"}[kw["ctf"]]
    if resume:
        saved = options_from_run(resume)
        if input is not None:
            explicit.add("input")
        merged = {**saved, **{k: kw[k] for k in explicit if k in kw}}
        merged.update(input=input or saved["input"], out_dir=resume)
        opts = TrainOptions(**merged)
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
        click.echo(
            f"Interrupted after epoch {res.epochs_done}; resume with: tvae-em train "
            f"--resume {res.run_dir}",
            err=True,
        )
        sys.exit(130)
    click.echo(
        f"Trained {res.epochs_done} epochs in {res.seconds:.0f} s ({res.particles_per_s:.1f} "
        f"particles/s); final loss {res.last_loss:.4g}, best {res.best_loss:.4g}; "
        f"run in {res.run_dir}/"
    )


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    "out_star",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output RELION 3.1 star (.star); OUT.npz is written next to it.",
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
    help="Also write a cryoSPARC .cs (of --original when given, else of INPUT).",
)
@click.option(
    "--npz",
    "npz_out",
    type=click.Path(dir_okay=False),
    help="Arrays for scripting. [default: OUT with .npz]",
)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Particles per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option(
    "--num-workers", type=int, default=0, show_default=True, help="Data-loading worker processes."
)
@click.option(
    "--elbo/--no-elbo",
    "with_elbo",
    default=True,
    show_default=True,
    help="Per-particle ELBO (renders every particle: about half the time).",
)
@click.option(
    "--checkpoint",
    type=click.Choice(["last", "best"]),
    default="last",
    show_default=True,
    help="Which checkpoint of RUN to use.",
)
@click.option("--datadir", type=click.Path(file_okay=False), help="Folder to find stacks in.")
@click.option("--input-apix", type=float, help="Pixel size in A of INPUT (overrides the files).")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of k-means and of the ELBO's sample.",
)
def embed(run_dir, input_path, out_star, **kw) -> None:
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
    from contextlib import ExitStack

    from .embed import embed_particles
    from .progress import progress_bar

    with ExitStack() as bars:
        advance = {}

        def on_start(n: int) -> None:
            advance["f"] = bars.enter_context(progress_bar(n, "embed"))

        summary = embed_particles(
            run_dir,
            input_path,
            out_star,
            on_start=on_start,
            progress=lambda k: advance["f"](k),
            **kw,
        )
    click.echo(summary.line())


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the figures (created).",
)
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
@click.option("--classes", type=int, help="Re-cluster the embedding into K k-means classes.")
@click.option("--n-recon", type=int, default=8, show_default=True, help="Particles to reconstruct.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option(
    "--checkpoint",
    type=click.Choice(["last", "best"]),
    default="last",
    show_default=True,
    help="Which checkpoint of RUN to use.",
)
@click.option("--datadir", type=click.Path(file_okay=False), help="Folder to find stacks in.")
@click.option("--input-apix", type=float, help="Pixel size in A of --particles.")
def generate(run_dir, out_dir, **kw) -> None:
    """PNGs of what a run learned: latent traversals, the latent plane (2 dims), reconstructions,
    aligned class averages (+ class_averages.mrcs/.star), latent scatter, pose histograms.

    \b
    Example:
      tvae-em generate run/ -o figs/
      tvae-em generate run/ -o figs/ --embedding embedded.npz \\
          --particles prep/particles.star --size 128
    """
    from contextlib import ExitStack

    from .generate import generate_figures
    from .progress import progress_bar

    with ExitStack() as bars:
        advance = {}

        def on_start(n: int) -> None:
            advance["f"] = bars.enter_context(progress_bar(n, "class averages"))

        summary = generate_figures(
            run_dir, out_dir, on_start=on_start, progress=lambda k: advance["f"](k), **kw
        )
    for note in summary.notes:
        click.echo(f"Note: {note}", err=True)
    click.echo(summary.line())


if __name__ == "__main__":
    main()
