"""Embedding a particle stack with a trained run: the whole of `tvae-em embed` as a library call.

Options (`EmbedOptions`) are checked and every output path planned before any work; inference
(`tvae_em.inference`), classes (`tvae_em.clustering`) and the files (`tvae_em.export`) follow.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .class2d import class2d_result, plan_class2d, written_class2d
from .classification import SplitMove, TemplateEM
from .clustering import assign_classes, number_by_size, size_order
from .ctf import batch_ctf
from .data import BatchDataset, check_num_workers, epoch_batches, make_loader
from .errors import UserError
from .export import (
    check_cs_source,
    cs_table,
    embedding_columns,
    open_original,
    particle_star_tables,
    plan_outputs,
    write_outputs,
)
from .geometry import object_centroid
from .inference import (
    TemplateClasses,
    class_mean_centres,
    classify_with_templates,
    object_centres,
    run_inference,
)
from .io import OpticsDefaults, ParticleStack
from .model.refine import RefineConfig
from .progress import ProgressFactory, no_progress
from .run import RunFolder, TrainedModel
from .runtime import check_seed, resolve_device


@dataclass
class EmbedOptions:
    """Every option of `tvae-em embed`."""

    run_dir: str | os.PathLike
    input: str | os.PathLike
    out_star: str | os.PathLike
    datadir: str | os.PathLike | None = None
    batch_size: int = 64
    device: str = "auto"
    classes: int | None = None
    cs_out: str | os.PathLike | None = None
    npz_out: str | os.PathLike | None = None
    original: str | os.PathLike | None = None
    original_out: str | os.PathLike | None = None
    class2d: str | os.PathLike | None = None
    input_apix: float | None = None
    num_workers: int = 0
    with_elbo: bool = True
    amp: bool = True
    checkpoint: str = "last"
    seed: int = 0
    recentre: str = "class"
    refine: bool = True
    classify: str = "templates"
    class_rounds: int = 2
    class_moves: int = 3
    voltage: float = OpticsDefaults.voltage
    spherical_aberration: float = OpticsDefaults.spherical_aberration
    amplitude_contrast: float = OpticsDefaults.amplitude_contrast


RECENTRE_MODES = ("class", "particle", "none")
CLASSIFY_MODES = ("templates", "kmeans")


@dataclass
class EmbedSummary:
    """What `embed_particles` did: particle count, time, device and files written."""

    n: int
    seconds: float
    device: str
    outputs: list[Path] = field(default_factory=list)
    classes: int | None = None
    moves: list[SplitMove] = field(default_factory=list)

    @property
    def particles_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        """One-line summary for the terminal."""
        files = ", ".join(str(p) for p in self.outputs)
        kept = sum(m.accepted for m in self.moves)
        split = f", split-and-merge moves kept {kept} of {len(self.moves)}" if self.moves else ""
        return (
            f"embedded {self.n} particles in {self.seconds:.1f} s "
            f"({self.particles_per_s:.1f} particles/s, {self.device}{split}) -> {files}"
        )


def embed_particles(opts: EmbedOptions, progress: ProgressFactory = no_progress) -> EmbedSummary:
    """Embed the particles of ``opts.input`` with the model of ``opts.run_dir`` and write the
    star, npz (and cs, and the full-size star of ``opts.original``); see docs/outputs.md."""
    input, run_dir = str(opts.input), str(opts.run_dir)
    check_num_workers(opts.num_workers)
    check_seed(opts.seed)
    dev = resolve_device(opts.device)
    trained = RunFolder(run_dir).load_model(dev, opts.checkpoint)
    optics = OpticsDefaults(opts.voltage, opts.spherical_aberration, opts.amplitude_contrast)
    stack = ParticleStack.open(input, datadir=opts.datadir, apix=opts.input_apix, optics=optics)
    n = len(stack)
    _check_box(stack, trained, input, run_dir)
    if opts.classes is not None and not 1 <= opts.classes <= n:
        raise UserError(
            f"--classes {opts.classes}: must be between 1 and the {n} particles of {input}"
        )
    if opts.recentre not in RECENTRE_MODES:
        raise UserError(f"--recentre {opts.recentre}: must be one of {', '.join(RECENTRE_MODES)}")
    if opts.classify not in CLASSIFY_MODES:
        raise UserError(f"--classify {opts.classify}: must be one of {', '.join(CLASSIFY_MODES)}")
    if opts.class_rounds < 0:
        raise UserError(f"--class-rounds {opts.class_rounds}: must be 0 or more")
    if opts.class_moves < 0:
        raise UserError(f"--class-moves {opts.class_moves}: must be 0 or more")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size}: must be at least 1")
    orig, rows = (
        open_original(str(opts.original), opts.datadir, stack, optics)
        if opts.original
        else (None, None)
    )
    plan = plan_outputs(
        opts.out_star,
        opts.npz_out,
        opts.cs_out,
        opts.original_out,
        orig is not None,
        [input, opts.original],
    )
    if plan.cs is not None:
        check_cs_source(orig if orig is not None else stack)
    taken = [*plan.paths(), input, opts.original]
    c2d = plan_class2d(opts.class2d, opts.classes, taken) if opts.class2d else None
    apix = stack.apix  # (n,) UserError when unknown
    aligned_z = trained.model_config.get("z_source") == "aligned"  # z needs the phase flip
    use_ctf = (opts.with_elbo or opts.refine or aligned_z) and trained.uses_ctf(stack)
    ctf_for = _ctf_function(stack, input, dev) if use_ctf else None
    refine = RefineConfig() if opts.refine else None
    by_templates = bool(opts.classes) and opts.classify == "templates"

    model = trained.model.export_for_inference().to(dev)
    batches = epoch_batches(n, opts.batch_size, 0, 0, shuffle=False)
    loader = make_loader(BatchDataset(stack, trained.normalisation), batches, opts.num_workers)
    with progress(n, "embed") as advance:
        t0 = time.perf_counter()
        per_particle = None if by_templates else refine  # templates: the poses come from there
        emb = run_inference(
            model, loader, n, dev, opts.with_elbo, ctf_for, advance, opts.seed, per_particle,
            amp=opts.amp,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    emb.check_finite(input, f"the model of {run_dir} gives NaN for it (a diverged checkpoint?)")

    emb.apix, emb.box = apix, stack.box
    moves: list[SplitMove] = []
    if opts.classes:
        emb.labels = assign_classes(emb.z_mu, opts.classes, opts.seed)
    if by_templates:
        with progress(n, "classify") as advance:
            t0 = time.perf_counter()
            z_classes = class_latents(emb.z_mu, emb.labels, opts.classes)
            found = classify_with_templates(
                model, loader, n, z_classes, dev, ctf_for, RefineConfig(), advance
            )
            seconds += time.perf_counter() - t0
        em = TemplateEM(
            model, loader, stack, trained.normalisation, opts.classes, dev, ctf_for, opts.seed,
            progress,
        )  # fmt: skip
        result = em.run(found, opts.class_rounds, opts.class_moves)
        seconds += em.seconds
        found, averages, moves = result.found, result.averages, result.moves
        emb.theta, emb.t = found.theta, found.t
        centres = (  # (K, 2): the centre of each class's final template
            object_centres(model, z_classes, dev)
            if averages is None
            else object_centroid(torch.from_numpy(averages)).double().numpy()
        )
        emb.labels, emb.class_log_post = numbered_classes(found, opts.classes)
        emb.centre = None if opts.recentre == "none" else centres[found.labels]
    else:
        emb.centre = _centres(model, emb, opts.recentre, dev)
    new = embedding_columns(emb)
    tables: dict[str, object] = {
        "star": particle_star_tables(stack, new),
        "npz": emb,
    }
    target, target_rows = stack, np.arange(n)
    if orig is not None:
        tables["original_star"] = particle_star_tables(orig, new, rows)
        target, target_rows = orig, rows
    if plan.cs is not None:
        tables["cs"] = cs_table(target, emb, target_rows)
    c2d_result = (
        class2d_result(c2d, stack, trained.normalisation, emb, new, opts.classes, progress)
        if c2d
        else None
    )
    with written_class2d(c2d, c2d_result):  # renamed with the other files: all or none
        write_outputs(plan, tables)
    outputs = plan.paths() + (c2d.paths() if c2d else [])
    return EmbedSummary(n, seconds, str(dev), outputs=outputs, classes=opts.classes, moves=moves)


def numbered_classes(found: TemplateClasses, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The template classes 1-based and numbered by size (class 1 the largest), and their log
    posterior (n, k) with the columns in that numbering (column j - 1 is class j)."""
    return number_by_size(found.labels, k), found.log_post[:, size_order(found.labels, k)]


def class_latents(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, Z) mean latent of each 1-based class (the mean of all z for an empty class)."""
    return np.stack([z[labels == c].mean(0) if (labels == c).any() else z.mean(0)
                     for c in range(1, k + 1)])  # fmt: skip


def _centres(model, emb, mode: str, device) -> np.ndarray | None:
    """Object centres in the template frame (n, 2) for `mode` (docs/outputs.md, re-centring):
    per class (its particles' mean; per particle without classes), per particle, or none."""
    if mode == "none":
        return None
    centres = object_centres(model, emb.z_mu, device)
    if mode == "class" and emb.labels is not None:
        return class_mean_centres(centres, emb.labels)
    return centres


def _check_box(stack, trained: TrainedModel, input_path: str, run_dir: str) -> None:
    """UserError with the fix when the images are not the size the model was trained on."""
    box = int(trained.model_config["box"])
    if stack.box != box:
        raise UserError(
            f"{input_path}: images are {stack.box} px but the model of {run_dir} takes {box} px; "
            f"downsample first (tvae-em preprocess {input_path} -o prep/ --size {box}), embed "
            f"prep/particles.star and pass --original {input_path} to get poses for this stack"
        )


def _ctf_function(stack: ParticleStack, input_path: str, device):
    """idx -> (B, D, D) CTF of those particles, as in training (UserError if no defocus)."""
    params = stack.ctf_params()
    if params is None:
        raise UserError(
            f"{input_path}: the run was trained with the CTF but these particles have no defocus "
            "columns (use the star the run was trained on, or --no-elbo --no-refine)"
        )
    apix = stack.apix
    return lambda idx: batch_ctf(params, apix, idx, stack.box, device)
