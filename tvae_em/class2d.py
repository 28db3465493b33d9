"""Aligned per-class averages, and RELION Class2D-shaped outputs of an embedding.

`class_averages` is the one home of the averages (used by `embed --class2d` and `generate`):
particles phase-flipped where they have a CTF, aligned with their pose, averaged per class.
`embed --classes K --class2d PREFIX` writes what `relion_refine` writes for a 2D run, so RELION's
Subset selection (a Select job on `PREFIX_model.star`) and `relion_refine --ref` open it:

    tvae-em embed run/ prep/particles.star -o embedded.star --classes 10 --class2d Class2D/run_it000
    relion_star_handler --i Class2D/run_it000_data.star --o class1.star \\
        --select rlnClassNumber --minval 1 --maxval 1
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .ctf import batch_ctf
from .data import BatchDataset, Normalisation, make_loader
from .errors import UserError
from .export import CLASS_PROBABILITY, CONFIDENCE, ELBO, particle_star_tables
from .fourier import phase_flip
from .geometry import align_images
from .inference import Embedding
from .io import (
    ParticleStack,
    atomic_paths,
    check_writable_dir,
    ensure_writable_dir,
    project_path,
    write_stack,
    write_star,
)
from .progress import Advance, ProgressFactory, no_progress

# RELION's value for "not estimated" (MlModel initialises accuracies and resolutions with it).
NOT_ESTIMATED = 999.0


def flip_function(stack: ParticleStack, params=None) -> Callable[[np.ndarray], torch.Tensor] | None:
    """idx -> (B, D, D) CTFs whose signs phase-flip those particles; None without defocus.

    Already phase-flipped particles carry |CTF| (`ctf.batch_ctf`), so flipping leaves them alone.
    """
    params = stack.ctf_params() if params is None else params
    if params is None:
        return None
    apix = stack.apix
    return lambda idx: batch_ctf(params, apix, idx, stack.box)


def aligned_batches(
    stack,
    norm: Normalisation,
    theta: np.ndarray,
    t_px: np.ndarray,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    flip_for: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(idx (B,), aligned (B, D, D)) over `indices` (all particles by default): each particle
    normalised, phase-flipped where `flip_for(idx)` gives its CTF, and turned and shifted back
    by its pose (theta (n,) rad, t_px (n, 2)), so that every particle lies in its template's frame.
    """
    indices = np.arange(len(stack)) if indices is None else np.asarray(indices, dtype=np.int64)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for idx, y in make_loader(BatchDataset(stack, norm), batches, 0):
        i = idx.numpy()
        if flip_for is not None:
            y = phase_flip(y, flip_for(i))
        th = torch.as_tensor(theta[i], dtype=torch.float32)
        yield i, align_images(y, th, torch.as_tensor(t_px[i], dtype=torch.float32))


def class_averages(
    stack,
    norm: Normalisation,
    theta: np.ndarray,
    t_px: np.ndarray,
    labels: np.ndarray,
    k: int,
    batch_size: int = 256,
    flip_for: Callable[[np.ndarray], torch.Tensor] | None = None,
    advance: Advance | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (k, D, D) of particles aligned with their pose, and class sizes (k,).

    labels (n,) are 0-based. Particles are streamed; `flip_for(idx)` gives CTFs to phase-flip by.
    """
    d = stack.box
    sums = torch.zeros(k, d, d, dtype=torch.float64)
    counts = np.bincount(labels, minlength=k)
    for i, aligned in aligned_batches(stack, norm, theta, t_px, None, batch_size, flip_for):
        sums.index_add_(0, torch.as_tensor(labels[i]), aligned.double())
        if advance is not None:
            advance(len(i))
    means = sums / torch.as_tensor(np.maximum(counts, 1), dtype=torch.float64)[:, None, None]
    return means.float().numpy(), counts


# ---------------------------------------------------------------- Class2D-shaped outputs


@dataclass
class Class2DPlan:
    """The three files of `--class2d PREFIX`, named as relion_refine names them."""

    data: Path
    model: Path
    classes: Path

    def paths(self) -> list[Path]:
        return [self.data, self.model, self.classes]


def plan_class2d(prefix: str | os.PathLike, classes: int | None, taken: list) -> Class2DPlan:
    """PREFIX_data.star, PREFIX_model.star, PREFIX_classes.mrcs, checked before any work."""
    if classes is None:
        raise UserError(f"--class2d {prefix}: needs --classes K (the classes to average)")
    prefix = Path(prefix)
    if prefix.name in ("", ".", "..") or prefix.is_dir():
        raise UserError(f"--class2d {prefix}: is a folder; give a prefix such as {prefix}/run")
    base = str(prefix).removesuffix("_model.star").removesuffix("_data.star")
    plan = Class2DPlan(
        *(Path(base + end) for end in ("_data.star", "_model.star", "_classes.mrcs"))
    )
    seen = {os.path.abspath(p) for p in taken if p is not None}
    for path in plan.paths():
        if os.path.abspath(path) in seen or path.is_dir():
            raise UserError(f"--class2d {prefix}: {path} would overwrite an input or output")
    try:
        check_writable_dir(plan.data.parent)
    except UserError as e:
        raise UserError(f"--class2d {prefix}: {e}") from None
    return plan


@dataclass
class Class2DResult:
    """What the three files hold: data star tables, model star blocks, averages (K, D, D)."""

    data: tuple  # (particles, optics, text) of `export.particle_star_tables`
    model: dict[str, pd.DataFrame]
    averages: np.ndarray
    apix: float


def class2d_result(
    plan: Class2DPlan,
    stack: ParticleStack,
    norm: Normalisation,
    emb: Embedding,
    new: pd.DataFrame,
    k: int,
    progress: ProgressFactory = no_progress,
) -> Class2DResult:
    """Averages of the embedded classes and the star tables relion_refine writes for them.

    `new` are the columns embed adds (`export.embedding_columns`); emb.labels are 1-based.
    """
    labels = np.asarray(emb.labels, dtype=np.int64)
    with progress(len(stack), "class averages") as advance:
        averages, counts = class_averages(
            stack,
            norm,
            emb.theta,
            emb.shift,
            labels - 1,
            k,
            flip_for=flip_function(stack),
            advance=advance,
        )
    apix = float(np.median(stack.apix))
    data = particle_star_tables(stack, _relion2d_columns(new))
    model = model_blocks(plan.classes, counts, emb, apix, stack.box)
    return Class2DResult(data, model, averages, apix)


def _relion2d_columns(new: pd.DataFrame) -> pd.DataFrame:
    """Embed's columns plus the per-particle columns of a relion_refine 2D data star;
    rlnMaxValueProbDistribution is the class posterior embed wrote, else the pose confidence."""
    out = new.copy()
    out["rlnNormCorrection"] = 1.0
    if ELBO in new:
        out["rlnLogLikeliContribution"] = new[ELBO].to_numpy(np.float64)
    if CLASS_PROBABILITY not in new:
        out[CLASS_PROBABILITY] = new[CONFIDENCE].to_numpy(np.float64)
    out["rlnNrOfSignificantSamples"] = 1
    return out


def model_blocks(
    classes_file: Path, counts: np.ndarray, emb: Embedding, apix: float, box: int
) -> dict[str, pd.DataFrame]:
    """data_model_general, data_model_classes as relion_refine 3.1 writes them (2D)."""
    n, k = int(counts.sum()), len(counts)
    _, origin = emb.relion_pose()
    elbo = float(np.nansum(emb.elbo)) if emb.has_elbo else 0.0
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": int(box),
        "rlnCurrentResolution": 2.0 * apix,
        "rlnCurrentImageSize": int(box),
        "rlnPaddingFactor": 1.0,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": apix,
        "rlnNrClasses": k,
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
        "rlnTau2FudgeFactor": 1.0,
        "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": float(np.sqrt(np.mean(origin**2))),
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": elbo,
        "rlnAveragePmax": float(np.mean(_max_probability(emb))),
    }
    name = project_path(classes_file)
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": [f"{j + 1:06d}@{name}" for j in range(k)],
            "rlnClassDistribution": counts / max(n, 1),
            "rlnAccuracyRotations": NOT_ESTIMATED,
            "rlnAccuracyTranslationsAngst": NOT_ESTIMATED,
            "rlnEstimatedResolution": NOT_ESTIMATED,
            "rlnOverallFourierCompleteness": 1.0,
            "rlnClassPriorOffsetX": 0.0,
            "rlnClassPriorOffsetY": 0.0,
            "tvaeClassSize": counts.astype(np.int64),
        }
    )
    return {"model_general": pd.DataFrame([general]), "model_classes": classes}


def _max_probability(emb: Embedding) -> np.ndarray:
    """(n,) what the data star's rlnMaxValueProbDistribution holds (`_relion2d_columns`)."""
    own = emb.class_probability()
    return own if own is not None else emb.confidence


@contextmanager
def written_class2d(plan: Class2DPlan | None, result: Class2DResult | None) -> Iterator[None]:
    """Write the Class2D files under temporary names, run the block (embed's other files), then
    rename them: all or none. A no-op when `plan` is None."""
    if plan is None:
        yield
        return
    ensure_writable_dir(plan.data.parent)
    with atomic_paths(plan.paths()) as (data, model, classes):
        particles, optics, text = result.data
        write_star(data, {"optics": optics, "particles": particles}, text=text)
        write_star(model, result.model)
        k, box = result.averages.shape[0], result.averages.shape[-1]
        write_stack(classes, [result.averages.astype(np.float32)], k, box, result.apix)
        yield
