"""Particle preprocessing: Fourier-crop downsampling, low-pass, inversion, normalisation (chunked).

Conventions (docs/preprocess.md):
- Fourier cropping works on the *centred* transform (phase origin at pixel D//2), so the centre
  pixel D//2 of the input lands on pixel n//2 of the output and RELION origins stay valid.
- Intensity scaling: real-space values are kept. A band-limited image (no frequency above the
  new Nyquist) downsampled equals the same continuous function sampled on the coarse grid, so
  the mean pixel value is kept too.
- Normalisation (RELION-style): subtract the mean and divide by the standard deviation of the
  background, the pixels farther than ``mask_radius * D/2`` from the centre pixel.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .ctf import batch_ctf
from .errors import UserError
from .fourier import fourier_crop, lowpass, phase_flip
from .io import (
    PHASE_FLIPPED,
    SOURCE_ROW,
    ParticleStack,
    atomic_folder,
    dataframe_to_cs,
    nonfinite_images,
    nonfinite_kind,
    project_path,
    write_cs,
    write_stack,
    write_star,
)
from .progress import ProgressFactory, no_progress

CHUNK_BYTES = 64 * 2**20  # default chunk: about this much float32 input (peak RAM ~4x this)
MAX_CHUNK = 1000
DEFAULT_MASK_RADIUS = 0.75  # background = outside 75% of the half box (RELION's default)
NORM_MODES = ("background", "image")
_AXES = (-2, -1)


# ---- pure image functions ----------------------------------------------------------------------
def invert(images: np.ndarray) -> np.ndarray:
    """Contrast inversion (dark particles become bright and vice versa)."""
    return -images


def background_mask(box: int, mask_radius: float = DEFAULT_MASK_RADIUS) -> np.ndarray:
    """(D, D) bool: pixels farther than ``mask_radius * D/2`` from the centre pixel (D//2, D//2)."""
    r = np.arange(box) - box // 2
    return np.hypot(r[:, None], r[None, :]) > mask_radius * box / 2


def normalise(
    images: np.ndarray, mask_radius: float = DEFAULT_MASK_RADIUS, mode: str = "background"
) -> np.ndarray:
    """Zero mean, unit standard deviation per image, measured on the background (RELION-style).

    ``mode="image"`` uses every pixel instead. An image whose background is flat (noise-free
    simulations) falls back to the whole-image statistics so it is never divided by ~0.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}")
    x = images.astype(np.float32, copy=False)
    flat = x.reshape(len(x), -1)  # (B, D*D)
    if mode == "image":
        mean, sd = flat.mean(axis=1), flat.std(axis=1)
    else:
        mask = background_mask(x.shape[-1], mask_radius).reshape(-1)
        if not mask.any():
            raise ValueError(f"mask radius {mask_radius} leaves no background pixels")
        bg = flat[:, mask]  # (B, n_background)
        mean, sd = bg.mean(axis=1), bg.std(axis=1)
        del bg
        flat_bg = np.flatnonzero(sd <= 1e-6 * np.abs(flat).max(axis=1))
        if flat_bg.size:
            sd[flat_bg] = flat[flat_bg].std(axis=1)
    sd = np.where(sd > 0, sd, 1.0).astype(np.float32)
    out = x - mean[:, None, None]
    out /= sd[:, None, None]
    return out


def bad_image_reasons(images: np.ndarray) -> list[str | None]:
    """Per image: None if usable, else why not (NaN/Inf pixels, or a constant image)."""
    flat = images.reshape(len(images), -1)  # (B, D*D)
    reasons: list[str | None] = [None] * len(images)
    nonfinite = nonfinite_images(images)
    for i in np.flatnonzero(nonfinite):
        reasons[i] = f"{nonfinite_kind(flat[i])} pixels"
    for i in np.flatnonzero(~nonfinite & (flat.min(axis=1) == flat.max(axis=1))):
        reasons[i] = "a constant image (no signal)"
    return reasons


# ---- sizes -----------------------------------------------------------------------------------
def output_size(
    box: int, apix_in: np.ndarray, size: int | None = None, apix: float | None = None
) -> int:
    """Output box from --size or a target --apix (rounded to an even size); UserError if invalid."""
    if size is not None and apix is not None:
        raise UserError("give --size or --apix, not both")
    if apix is not None:
        values = np.unique(np.round(np.asarray(apix_in, dtype=np.float64), 4))
        if len(values) > 1:
            shown = ", ".join(f"{v:g}" for v in values[:4])
            raise UserError(
                f"--apix needs one input pixel size but the input has {shown} A; use --size"
            )
        if not apix > 0:
            raise UserError(f"--apix must be positive, got {apix}")
        size = 2 * int(round(box * values[0] / apix / 2))
        if size > box:
            raise UserError(
                f"--apix {apix:g} is finer than the input pixel size {values[0]:g} A (box {box}): "
                "preprocess only downsamples"
            )
        if size < 2:
            raise UserError(f"--apix {apix:g} would leave fewer than 2 pixels (input box {box})")
        return size
    if size is None:
        return box
    if size > box:
        raise UserError(f"--size {size} is larger than the input images ({box}x{box})")
    if size < 2 or size % 2:
        raise UserError(f"--size {size} must be a positive even number")
    return size


def auto_chunk_size(box: int) -> int:
    """Particles per chunk so one chunk holds about CHUNK_BYTES of float32 input (1..MAX_CHUNK)."""
    return int(np.clip(CHUNK_BYTES // (4 * box * box), 1, MAX_CHUNK))


# ---- the chunked driver --------------------------------------------------------------------------
@dataclass
class PreprocessSummary:
    """What preprocess_stack did."""

    n_in: int
    n_out: int
    box_in: int
    box_out: int
    apix_in: list[float]
    apix_out: list[float]
    seconds: float
    star: Path
    stack: Path
    cs: Path | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (0-based particle, reason)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def particles_per_s(self) -> float:
        return self.n_in / self.seconds if self.seconds > 0 else float("inf")

    def one_line(self) -> str:
        """Human summary for the end of a CLI run."""
        a_in = "/".join(f"{a:.4g}" for a in self.apix_in)
        a_out = "/".join(f"{a:.4g}" for a in self.apix_out)
        return (
            f"Wrote {self.n_out} particles ({self.n_skipped} skipped), "
            f"{self.box_in}->{self.box_out} px, {a_in}->{a_out} A/px, in {self.seconds:.1f} s "
            f"({self.particles_per_s:.0f} particles/s): {self.star}"
        )


def process_images(
    images: np.ndarray,
    size: int,
    apix_out: np.ndarray,
    invert_contrast: bool = False,
    lowpass_A: float | None = None,
    mask_radius: float = DEFAULT_MASK_RADIUS,
    norm: str = "background",
    ctf: np.ndarray | None = None,
) -> np.ndarray:
    """Crop -> (phase-flip) -> (low-pass) -> (invert) -> normalise a (B, D, D) chunk.

    ctf: (B, size, size) CTFs of the cropped images on the fft2 grid; when given, each image is
    phase-flipped (multiplied by sign(CTF) in Fourier space). Returns (B, size, size).
    """
    x = fourier_crop(images, size)
    if ctf is not None:
        flipped = phase_flip(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(ctf))
        x = flipped.numpy().astype(np.float32)
    if lowpass_A is not None:
        x = lowpass(x, apix_out, lowpass_A)
    if invert_contrast:
        x = invert(x)
    return normalise(x, mask_radius, norm)


def preprocess_stack(
    stack: ParticleStack,
    out_dir: str | Path,
    size: int | None = None,
    apix: float | None = None,
    invert: bool = False,
    lowpass_A: float | None = None,
    skip_bad: bool = False,
    chunk_size: int | None = None,
    progress: ProgressFactory = no_progress,
    mask_radius: float = DEFAULT_MASK_RADIUS,
    norm: str = "background",
    phase_flip: bool = False,
) -> PreprocessSummary:
    """Preprocess every particle into out_dir/particles.mrcs + particles.star (+ .cs for .cs input).

    The star names the new stack as RELION finds it from the working directory (`project_path`),
    keeps every input value it does not change as read, and gives each particle its input row
    (SOURCE_ROW, 1-based) for `embed --original`. Reads, processes and writes ``chunk_size``
    particles at a time (default: ``auto_chunk_size``), so memory is bounded by the chunk
    whatever the stack size. Outputs are written under temporary names and renamed only when
    everything succeeded.
    """
    t0 = time.perf_counter()
    if chunk_size is None:
        chunk_size = auto_chunk_size(stack.box)
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {chunk_size}")
    apix_in = stack.apix
    box_out = output_size(stack.box, apix_in, size, apix)
    scale = stack.box / box_out
    apix_out = apix_in * scale
    nyquist = 2 * float(apix_out.max())
    if lowpass_A is not None and not lowpass_A >= nyquist:
        raise UserError(
            f"--lowpass {lowpass_A:g} A is finer than the output's Nyquist limit {nyquist:.3g} A "
            f"(2 x {nyquist / 2:.3g} A/px)"
        )
    options = dict(invert_contrast=invert, lowpass_A=lowpass_A, mask_radius=mask_radius, norm=norm)
    if phase_flip:
        options["ctf_params"] = _phase_flip_params(stack)
    out_dir = Path(out_dir)
    options["stack_ref"] = project_path(out_dir / "particles.mrcs")  # the final, not the stage
    with atomic_folder(out_dir) as stage:  # complete outputs or none, even on Ctrl-C
        summary = _run(stack, stage, box_out, apix_out, skip_bad, chunk_size, progress, options, t0)
    summary.star, summary.stack = out_dir / summary.star.name, out_dir / summary.stack.name
    summary.cs = out_dir / summary.cs.name if summary.cs is not None else None
    return summary


def _phase_flip_params(stack: ParticleStack):
    """The stack's CTF parameters for --phase-flip, or a UserError when it has none."""
    params = stack.ctf_params()
    if params is None:
        raise UserError(f"--phase-flip: {stack.source} has no defocus columns (no CTF to flip)")
    if params.phase_flipped is not None and (params.phase_flipped > 0.5).any():
        raise UserError(f"--phase-flip: {stack.source} is already phase-flipped")
    return params


def _run(stack, out_dir, box_out, apix_out, skip_bad, chunk_size, progress, options, t0):
    """The chunked read -> process -> write loop of preprocess_stack; outputs renamed at the end."""
    scale = stack.box / box_out
    options = dict(options)
    flip_params = options.pop("ctf_params", None)
    stack_ref = options.pop("stack_ref")
    finals = [out_dir / "particles.mrcs", out_dir / "particles.star"]
    if stack.writes_cs:
        finals.append(out_dir / "particles.cs")
    kept: list[np.ndarray] = []
    skipped: list[tuple[int, str]] = []

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(stack), chunk_size):
            idx = np.arange(start, min(len(stack), start + chunk_size))
            raw = stack.read(idx)  # (B, D, D)
            stack.close()  # unmap: pages of the input stack do not pile up in this process
            reasons = bad_image_reasons(raw)
            good = np.array([r is None for r in reasons])
            _drop_bad(stack, idx, good, reasons, skip_bad, skipped)
            out = np.empty((0, box_out, box_out), np.float32)
            if good.any():  # a chunk of bad particles only is skipped whole
                raw = raw[good] if not good.all() else raw
                ctf = None
                if flip_params is not None:
                    ctf = batch_ctf(flip_params, apix_out, idx[good], box_out).numpy()
                out = process_images(raw, box_out, apix_out[idx[good]], ctf=ctf, **options)
                del raw
                late = bad_image_reasons(out)  # e.g. overflow to Inf in the FFT
                now_bad = np.zeros_like(good)
                for j, r in zip(np.flatnonzero(good), late, strict=True):
                    if r is not None:
                        reasons[j], now_bad[j] = r, True
                _drop_bad(stack, idx, ~now_bad, reasons, skip_bad, skipped)
                out = out[[r is None for r in late]]
                good &= ~now_bad
            kept.append(idx[good])
            yield out
            advance(len(idx))

    with progress(len(stack), "preprocess") as advance:
        n_out = write_stack(finals[0], chunks(), len(stack), box_out, float(apix_out[0]))
    if n_out == 0:
        raise UserError(f"no usable particles in {stack.source}: all {len(stack)} are bad")
    keep = np.concatenate(kept)
    particles, optics = _output_tables(stack, keep, box_out, scale, stack_ref)
    if flip_params is not None:
        particles[PHASE_FLIPPED] = 1
    text = stack.star_text(keep)
    write_star(finals[1], {"optics": optics, "particles": particles}, text=text)
    if stack.writes_cs:
        write_cs(finals[2], _output_cs(stack, keep, box_out, scale, finals[0].name))
    return PreprocessSummary(
        n_in=len(stack),
        n_out=n_out,
        box_in=stack.box,
        box_out=box_out,
        apix_in=sorted(set(np.round(stack.apix, 4).tolist())),
        apix_out=sorted(set(np.round(apix_out, 4).tolist())),
        seconds=time.perf_counter() - t0,
        star=finals[1],
        stack=finals[0],
        cs=finals[2] if len(finals) > 2 else None,
        skipped=sorted(skipped),
    )


def _drop_bad(stack, idx, good, reasons, skip_bad: bool, skipped: list) -> None:
    """Record the particles of ``idx`` that are not ``good`` as skipped; without ``skip_bad``
    a UserError names the first of them."""
    for j in np.flatnonzero(~good):
        i = int(idx[j])
        if not skip_bad:
            raise UserError(
                f"{stack.describe(i)} has {reasons[j]}; use --skip-bad to drop such particles"
            )
        skipped.append((i, reasons[j]))


def _output_tables(
    stack: ParticleStack, keep: np.ndarray, box_out: int, scale: float, stack_name: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 tables for the kept particles, pointing at the new stack (``stack_name``, as
    the star names it) and pixel size, with each particle's input row (1-based)."""
    particles, optics = stack.relion31_tables()
    particles = particles.iloc[keep].reset_index(drop=True)
    particles["rlnImageName"] = [f"{k:06d}@{stack_name}" for k in range(1, len(keep) + 1)]
    particles[SOURCE_ROW] = np.asarray(keep, dtype=np.int64) + 1
    optics = optics.copy()
    optics["rlnImagePixelSize"] = optics["rlnImagePixelSize"].to_numpy(np.float64) * scale
    optics["rlnImageSize"] = box_out
    return particles, optics


def _output_cs(
    stack: ParticleStack, keep: np.ndarray, box_out: int, scale: float, stack_name: str
) -> np.ndarray:
    """The input .cs rows that were kept, every field kept, blob/* and 2D/3D shifts updated."""
    df, layout = stack.cs_fields(keep)
    apix_out = stack.apix[keep] * scale
    df["blob/path"] = stack_name
    df["blob/idx"] = np.arange(len(keep), dtype=df["blob/idx"].dtype)
    for c in ("blob/shape[0]", "blob/shape[1]"):
        if c in df:
            df[c] = np.full(len(keep), box_out, dtype=df[c].dtype)
    if "blob/psize_A" in df:
        df["blob/psize_A"] = apix_out.astype(df["blob/psize_A"].dtype)
    for c in df.columns:
        if c.startswith("alignments") and "/shift[" in c:
            df[c] = (df[c].to_numpy(np.float64) / scale).astype(df[c].dtype)
        elif c.startswith("alignments") and c.endswith("/psize_A"):
            df[c] = apix_out.astype(df[c].dtype)
    return dataframe_to_cs(df, layout)
