"""`tvae-em generate`: pictures of what a run learned (traversals, reconstructions, class averages).

The generator is coordinate-based, so images render at any size; at `size` S a pose's shift is
t * S / D pixels for a model of box D. Everything is validated before the first file is written,
and each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import figures
from .class2d import class_averages, flip_function
from .clustering import assign_classes
from .ctf import CtfParams, batch_ctf
from .errors import UserError
from .export import CLASS_PROBABILITY, embedding_columns, particle_star_tables
from .fourier import apply_ctf
from .geometry import relion_pose
from .inference import Embedding
from .io import (
    ParticleStack,
    atomic_folder,
    build_optics,
    check_writable_dir,
    write_stack,
    write_star,
)
from .progress import ProgressFactory, no_progress
from .run import RunFolder, TrainedModel
from .runtime import check_seed, resolve_device

MAX_SIZE = 1024
MAX_STEPS = 33
MAX_DEFAULT_DIMS = 10
RENDER_PIXELS = 2_000_000  # pixels rendered per generator call (bounds memory)
MICROSCOPE = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]


@dataclass
class GenerateOptions:
    """Every option of `tvae-em generate`."""

    run_dir: str | os.PathLike
    out_dir: str | os.PathLike
    embedding: str | os.PathLike | None = None
    particles: str | os.PathLike | None = None
    size: int | None = None
    n_steps: int = 9
    dims: str | None = None
    value_range: float = 2.5
    classes: int | None = None
    n_recon: int = 8
    datadir: str | os.PathLike | None = None
    input_apix: float | None = None
    device: str = "auto"
    checkpoint: str = "last"
    seed: int = 0


@dataclass
class GenerateSummary:
    """Files written and what was skipped (and why)."""

    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One-line summary for the terminal."""
        names = ", ".join(p.name for p in self.outputs)
        folder = self.outputs[0].parent if self.outputs else "."
        return f"wrote {len(self.outputs)} files to {folder}/: {names}"


@dataclass
class LatentAxes:
    """Directions to traverse: centre (Z,), unit axes (K, Z), scales (K,) and their names."""

    centre: np.ndarray
    axes: np.ndarray
    scales: np.ndarray
    names: list[str]
    unit: str  # what one step of `scales` is, for axis labels


# ---------------------------------------------------------------- pure helpers


def parse_dims(spec: str | None, n_axes: int, what: str) -> list[int]:
    """'1,3' -> [0, 2] (1-based in, 0-based out), each in 1..n_axes; default: the first 10."""
    if spec is None or str(spec).strip() == "":
        return list(range(min(n_axes, MAX_DEFAULT_DIMS)))
    try:
        dims = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--dims {spec}: expected comma-separated numbers like 1,2") from None
    bad = [d for d in dims if not 1 <= d <= n_axes]
    if bad or not dims:
        raise UserError(f"--dims {spec}: {what} has {n_axes} dimensions (choose from 1..{n_axes})")
    if len(set(dims)) != len(dims):
        raise UserError(f"--dims {spec}: a dimension is repeated")
    return [d - 1 for d in dims]


def latent_axes(z_dim: int, z_mu: np.ndarray | None = None) -> LatentAxes:
    """The prior's axes (sd 1), or the principal axes of embedded z (n, Z) (sd of each)."""
    if z_mu is None:
        names = [f"z{j + 1}" for j in range(z_dim)]
        return LatentAxes(np.zeros(z_dim), np.eye(z_dim), np.ones(z_dim), names, "prior sd")
    z = np.asarray(z_mu, dtype=np.float64)
    centre = z.mean(0)
    cov = np.atleast_2d(np.cov(z - centre, rowvar=False)) if len(z) > 1 else np.eye(z_dim)
    var, vec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(var)[::-1]
    var, vec = np.clip(var[order], 0.0, None), vec[:, order]
    share = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    names = [f"PC{k + 1} ({100 * share[k]:.0f}%)" for k in range(z_dim)]
    scales = np.where(var > 0, np.sqrt(var), 1.0)
    return LatentAxes(centre, vec.T, scales, names, "sd of embedded z")


def step_values(n_steps: int, value_range: float) -> np.ndarray:
    """(n_steps,) evenly spaced positions in [-range, range] (in units of an axis's scale)."""
    return np.linspace(-value_range, value_range, n_steps)


def traversal_latents(axes: LatentAxes, dims: list[int], steps: np.ndarray) -> np.ndarray:
    """(len(dims), n_steps, Z) latents: centre + s * scale * axis along each chosen axis."""
    offsets = axes.scales[dims, None, None] * steps[None, :, None] * axes.axes[dims, None, :]
    return axes.centre[None, None, :] + offsets


def plane_latents(axes: LatentAxes, dims: list[int], steps: np.ndarray) -> np.ndarray:
    """(n_steps, n_steps, Z) latents over the plane of two axes; row 0: largest second value."""
    a, b = dims
    sa = steps[None, :, None] * axes.scales[a] * axes.axes[a][None, None, :]
    sb = steps[::-1, None, None] * axes.scales[b] * axes.axes[b][None, None, :]
    return axes.centre[None, None, :] + sa + sb


def render(
    model,
    z: np.ndarray,
    size: int,
    theta: np.ndarray | None = None,
    t_px: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Generator means (n, size, size) for latents z (n, Z) at poses (default: canonical).

    t_px is in pixels of `size`. Rendered in chunks of about RENDER_PIXELS pixels.
    """
    n = len(z)
    theta = np.zeros(n) if theta is None else theta
    t_px = np.zeros((n, 2)) if t_px is None else t_px
    chunk = max(1, RENDER_PIXELS // (size * size))
    out = np.empty((n, size, size), np.float32)
    with torch.inference_mode():
        for i in range(0, n, chunk):
            s = slice(i, i + chunk)
            args = [
                torch.as_tensor(a[s], dtype=torch.float32, device=device) for a in (z, theta, t_px)
            ]
            out[s] = model.render(*args, size=size).float().cpu().numpy()
    return out


# ---------------------------------------------------------------- inputs


def open_particles(path, datadir, input_apix, box: int, n_embedded: int | None):
    """ParticleStack of --particles, at the model's box and matching the embedding's length."""
    stack = ParticleStack.open(path, datadir=datadir, apix=input_apix)
    if stack.box != box:
        raise UserError(
            f"--particles {path}: images are {stack.box} px but the model takes {box} px "
            "(give the star that was embedded)"
        )
    if n_embedded is not None and len(stack) != n_embedded:
        raise UserError(
            f"--particles {path}: has {len(stack)} particles but the embedding has {n_embedded} "
            "(give the star that was embedded)"
        )
    return stack


def _class_labels(emb: Embedding, classes: int | None, seed: int) -> np.ndarray:
    """1-based classes (n,) from --classes (k-means) or the embedding (unclassified -> 1)."""
    n = len(emb)
    if classes is not None:
        if not 1 <= classes <= n:
            raise UserError(
                f"--classes {classes}: must be between 1 and the {n} embedded particles"
            )
        return assign_classes(emb.z_mu, classes, seed)
    if emb.labels is None:
        return np.ones(n, np.int64)
    return np.where(emb.labels > 0, emb.labels, 1)


def _check_numbers(size: int, n_steps: int, value_range: float, n_recon: int) -> None:
    if not 8 <= size <= MAX_SIZE:
        raise UserError(f"--size {size}: must be between 8 and {MAX_SIZE} pixels")
    if not 2 <= n_steps <= MAX_STEPS:
        raise UserError(f"--n-steps {n_steps}: must be between 2 and {MAX_STEPS}")
    if not (math.isfinite(value_range) and value_range > 0):
        raise UserError(f"--range {value_range}: must be a positive number of sds")
    if n_recon < 1:
        raise UserError(f"--n-recon {n_recon}: must be at least 1")


# ---------------------------------------------------------------- figures


def traversal_figure(path: Path, model, axes: LatentAxes, dims, steps, size, device) -> None:
    """Rows: generated images along each chosen axis at canonical pose."""
    z = traversal_latents(axes, dims, steps)  # (K, S, Z)
    imgs = render(model, z.reshape(-1, z.shape[-1]), size, device=device)
    grid = imgs.reshape(len(dims), len(steps), size, size)
    figures.image_grid(
        path,
        [list(row) for row in grid],
        f"Latent traversal at canonical pose ({size} px)",
        row_labels=[axes.names[d] for d in dims],
        col_labels=[f"{s:+.2g}" for s in steps],
        xlabel=f"position along the axis ({axes.unit})",
    )


def plane_figure(path: Path, model, axes: LatentAxes, dims, steps, size, device) -> None:
    """The plane of two axes as a grid (x: first axis, y: second, up = larger)."""
    z = plane_latents(axes, dims, steps)  # (S, S, Z)
    imgs = render(model, z.reshape(-1, z.shape[-1]), size, device=device)
    grid = imgs.reshape(len(steps), len(steps), size, size)
    a, b = dims
    figures.image_grid(
        path,
        [list(row) for row in grid],
        f"Latent plane {axes.names[a]} x {axes.names[b]} ({size} px)",
        row_labels=[f"{s:+.2g}" for s in steps[::-1]],
        col_labels=[f"{s:+.2g}" for s in steps],
        xlabel=f"{axes.names[a]} ({axes.unit})",
        ylabel=f"{axes.names[b]} ({axes.unit})",
    )


def reconstruction_figure(
    path: Path, trained: TrainedModel, stack, n_recon, size, ctf: CtfParams | None, device
) -> None:
    """Particles (top) beside the generator at their inferred pose (below; x CTF if trained so)."""
    model = trained.model
    box = stack.box
    idx = np.unique(np.linspace(0, len(stack) - 1, min(n_recon, len(stack))).round().astype(int))
    raw = stack.read(idx)
    stack.check_pixels(idx, raw)
    y = torch.from_numpy(trained.normalisation.apply(raw).astype(np.float32))
    y = y.to(device)
    c = batch_ctf(ctf, stack.apix, idx, box, device) if ctf is not None else None
    with torch.inference_mode():
        out = model.embed(y, ctf=c)
    z, theta = out["z_mu"].cpu().numpy(), out["theta"].cpu().numpy()
    t = out["t"].cpu().numpy() * size / box
    rows = [list(y.cpu().numpy()), list(render(model, z, size, theta, t, device))]
    labels = ["particle", "model"]
    if ctf is not None:
        rows.append(list(_with_ctf(np.stack(rows[1]), stack, ctf, idx, size)))
        labels.append("model x CTF")
    psi, _ = relion_pose(theta, out["t"].cpu().numpy(), stack.apix[idx])
    figures.image_grid(
        path,
        rows,
        f"Reconstructions at the inferred pose ({size} px)",
        row_labels=labels,
        col_labels=[f"#{i + 1} psi {p:+.0f}" for i, p in zip(idx, psi, strict=True)],
        xlabel="particle number and inferred rlnAnglePsi (deg)",
    )


def _with_ctf(images: np.ndarray, stack, ctf: CtfParams, idx: np.ndarray, size: int) -> np.ndarray:
    """Images (n, size, size) multiplied by their particles' CTFs (pixel size scaled to size)."""
    c = batch_ctf(ctf, stack.apix * stack.box / size, idx, size)
    return apply_ctf(torch.from_numpy(images), c).numpy()


def class_average_outputs(folder: Path, averages, counts, stack: ParticleStack) -> list[Path]:
    """class_averages.mrcs, .star (class sizes, the particles' optics) and .png."""
    k, box = len(averages), averages.shape[-1]
    apix = float(np.median(stack.apix))
    mrcs, star, png = (folder / f"class_averages.{ext}" for ext in ("mrcs", "star", "png"))
    write_stack(mrcs, [averages.astype(np.float32)], k, box, apix)
    _, optics = build_optics(microscope(stack), np.array([apix]), box)
    write_star(star, {"optics": optics, "particles": _class_table(counts, mrcs.name)})
    per_row = min(k, 10)
    titles = [f"class {j + 1} (n={c})" for j, c in enumerate(counts)]
    figures.image_grid(
        png,
        [list(averages[i : i + per_row]) for i in range(0, k, per_row)],
        "Aligned class averages",
        panel_titles=[titles[i : i + per_row] for i in range(0, k, per_row)],
    )
    return [mrcs, star, png]


def microscope(stack: ParticleStack) -> pd.DataFrame:
    """One row: the voltage, Cs and amplitude contrast of the particles' largest optics group
    (the columns their optics table has; `build_optics` completes the rest)."""
    particles, optics = stack.relion31_tables()
    columns = [c for c in MICROSCOPE if c in optics]
    if not columns:
        return pd.DataFrame(index=[0])
    row = optics.iloc[:1]
    if "rlnOpticsGroup" in particles and "rlnOpticsGroup" in optics:
        largest = particles["rlnOpticsGroup"].astype(str).value_counts().index[0]
        match = optics[optics["rlnOpticsGroup"].astype(str) == largest]
        row = match if len(match) else row
    return pd.DataFrame({c: [float(row[c].iloc[0])] for c in columns})


def particle_class_outputs(
    folder: Path, emb: Embedding, labels: np.ndarray, stack: ParticleStack | None
) -> list[Path]:
    """particle_classes.csv (particle number, class) and, with the particles, particle_classes.star
    (the embedded star with these classes; image names valid from the working directory)."""
    csv = folder / "particle_classes.csv"
    table = pd.DataFrame({"particle": np.arange(1, len(labels) + 1), "rlnClassNumber": labels})
    table.to_csv(csv, index=False)
    if stack is None:
        return [csv]
    star = folder / "particle_classes.star"
    same = emb.labels is not None and np.array_equal(labels, emb.labels)
    classified = replace(emb, labels=labels, class_log_post=emb.class_log_post if same else None)
    particles, optics, text = particle_star_tables(stack, embedding_columns(classified))
    if not same:  # re-clustered: an embedded star's class posterior is that of other classes
        particles = particles.drop(columns=[CLASS_PROBABILITY], errors="ignore")
    write_star(star, {"optics": optics, "particles": particles}, text=text)
    return [csv, star]


def _class_table(counts: np.ndarray, stack_name: str) -> pd.DataFrame:
    k = len(counts)
    return pd.DataFrame(
        {
            "rlnImageName": [f"{j + 1:06d}@{stack_name}" for j in range(k)],
            "rlnOpticsGroup": 1,
            "rlnClassNumber": np.arange(1, k + 1),
            "rlnClassDistribution": counts / max(counts.sum(), 1),
            "tvaeClassSize": counts.astype(np.int64),
        }
    )


def scatter_figure(path: Path, emb: Embedding, labels: np.ndarray) -> None:
    """Embedded z (z1/z2, first principal axes when Z > 2, z1 vs ELBO when Z = 1) by class."""
    z = np.asarray(emb.z_mu, dtype=np.float64)
    if z.shape[1] == 1:
        y = emb.elbo if emb.has_elbo else emb.confidence
        x, xl, yl = z[:, 0], "z1", "ELBO (nats)" if emb.has_elbo else "pose confidence"
    elif z.shape[1] == 2:
        x, y, xl, yl = z[:, 0], z[:, 1], "z1", "z2"
    else:
        axes = latent_axes(z.shape[1], z)
        proj = (z - axes.centre) @ axes.axes[:2].T
        x, y, xl, yl = proj[:, 0], proj[:, 1], axes.names[0], axes.names[1]
    figures.scatter(path, x, y, labels, "Latent means (tvaeZ) by class", xl, yl)


def histogram_figure(path: Path, emb: Embedding) -> None:
    """Histograms of rlnAnglePsi and of the origins in Angstrom."""
    psi, origin = emb.relion_pose()
    figures.histograms(
        path,
        [
            (psi, "rlnAnglePsi", "degrees"),
            (origin[:, 0], "rlnOriginXAngst", "Angstrom"),
            (origin[:, 1], "rlnOriginYAngst", "Angstrom"),
        ],
        f"Inferred poses of {len(origin)} particles",
    )


# ---------------------------------------------------------------- the command


def generate_figures(
    opts: GenerateOptions, progress: ProgressFactory = no_progress
) -> GenerateSummary:
    """Write the PNGs (and class averages) of a run into ``opts.out_dir``; see docs/outputs.md.

    Every option is checked before the first file is written.
    """
    check_seed(opts.seed)
    dev = resolve_device(opts.device)
    trained = RunFolder(opts.run_dir).load_model(dev, opts.checkpoint)
    model, z_dim, box = trained.model, trained.model.cfg.z_dim, trained.model.cfg.box
    size = box if opts.size is None else opts.size
    _check_numbers(size, opts.n_steps, opts.value_range, opts.n_recon)
    emb = Embedding.load_npz(opts.embedding, z_dim) if opts.embedding else None
    axes = latent_axes(z_dim, emb.z_mu if emb is not None else None)
    what = "the latent space" if emb is None else "the embedded z"
    chosen = parse_dims(opts.dims, z_dim, what)
    n_emb = len(emb) if emb is not None else None
    stack = (
        open_particles(opts.particles, opts.datadir, opts.input_apix, box, n_emb)
        if opts.particles
        else None
    )
    labels = _class_labels(emb, opts.classes, opts.seed) if emb is not None else None
    # the particles' CTFs, parsed once: phase flips (class averages); the model's CTF row too
    # when the run was trained with them
    params = stack.ctf_params() if stack is not None else None
    ctf = params if params is not None and trained.uses_ctf(stack) else None
    out = Path(opts.out_dir)
    try:
        check_writable_dir(out)
    except UserError as e:
        raise UserError(f"-o {opts.out_dir}: {e}") from None

    summary = GenerateSummary()
    with atomic_folder(opts.out_dir) as folder:  # every figure or none, even on Ctrl-C
        steps = step_values(opts.n_steps, opts.value_range)
        summary.outputs.append(folder / "latent_traversal.png")
        traversal_figure(summary.outputs[-1], model, axes, chosen, steps, size, dev)
        if len(chosen) == 2:
            summary.outputs.append(folder / "latent_plane.png")
            plane_figure(summary.outputs[-1], model, axes, chosen, steps, size, dev)
        if stack is not None:
            summary.outputs.append(folder / "reconstructions.png")
            reconstruction_figure(summary.outputs[-1], trained, stack, opts.n_recon, size, ctf, dev)
        else:
            summary.notes.append("reconstructions need --particles")
        if emb is None:
            summary.notes.append(
                "class averages, latent scatter and pose histograms need --embedding"
            )
        else:
            summary.outputs.append(folder / "latent_scatter.png")
            scatter_figure(summary.outputs[-1], emb, labels)
            summary.outputs.append(folder / "pose_histograms.png")
            histogram_figure(summary.outputs[-1], emb)
        if emb is not None and opts.classes is not None:
            summary.outputs += particle_class_outputs(folder, emb, labels, stack)
        if emb is not None and stack is None:
            summary.notes.append("class averages need --particles (the star that was embedded)")
        elif emb is not None:
            k = opts.classes if opts.classes is not None else int(labels.max())
            with progress(len(stack), "class averages") as advance:
                averages, counts = class_averages(
                    stack,
                    trained.normalisation,
                    emb.theta,
                    emb.shift,  # the object centres the written origins put at the box centre
                    labels - 1,
                    k,
                    flip_for=flip_function(stack, params),
                    advance=advance,
                )
            summary.outputs += class_average_outputs(folder, averages, counts, stack)
    summary.outputs = [Path(opts.out_dir) / p.name for p in summary.outputs]
    return summary
