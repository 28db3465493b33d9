"""Data sets with ground truth: glyphs, the paper's rotated MNIST(N)/(U), simulated particles.

Every generator returns ``(images, truth)``: images (n, D, D) float32 and a dict of numpy arrays
with the true pose of each image in the project's convention (docs/architecture.md): image =
T(t) R(theta) template, theta (n,) radians, t (n, 2) pixels as (x, y), label (n,) 0-based class.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .ctf import CtfParams, batch_ctf
from .errors import UserError
from .fourier import apply_ctf, fourier_resize
from .geometry import relion_pose, transform_images
from .io import atomic_path, build_optics, ensure_writable_dir, write_stack, write_star

_CHUNK = 1024  # images per transform call, to bound memory

# ---------------------------------------------------------------------------------------------
# Glyphs: asymmetric letters drawn from rectangles

# Rectangles (x0, x1, y0, y1) in units of the glyph height, y down (rows), centred near 0.
GLYPHS: dict[str, list[tuple[float, float, float, float]]] = {
    "F": [(-0.3, -0.1, -0.5, 0.5), (-0.3, 0.4, -0.5, -0.3), (-0.3, 0.2, -0.1, 0.1)],
    "L": [(-0.3, -0.1, -0.5, 0.5), (-0.3, 0.4, 0.3, 0.5)],
    "P": [
        (-0.3, -0.1, -0.5, 0.5),
        (-0.3, 0.3, -0.5, -0.3),
        (0.1, 0.3, -0.5, 0.1),
        (-0.3, 0.3, -0.1, 0.1),
    ],
    "T": [(-0.4, 0.4, -0.5, -0.3), (-0.1, 0.1, -0.5, 0.5)],
    "J": [(0.1, 0.3, -0.5, 0.5), (-0.4, 0.3, 0.3, 0.5)],
}


def render_glyph(name: str, box: int, height: float = 0.5) -> np.ndarray:
    """A glyph (box, box) float32 in [0, 1], `height` of the box tall, centre of mass at the centre.

    Pixels hold the exact fraction of their area covered by each rectangle (max over rectangles).
    """
    if name not in GLYPHS:
        raise UserError(f"unknown glyph {name!r}; choose from {', '.join(GLYPHS)}")
    img = _render_rects(GLYPHS[name], box, height * box, (0.0, 0.0))
    r = np.arange(box) - box // 2
    centre = (float((img.sum(0) * r).sum() / img.sum()), float((img.sum(1) * r).sum() / img.sum()))
    return _render_rects(GLYPHS[name], box, height * box, centre)


def _render_rects(rects, box: int, scale: float, centre: tuple[float, float]) -> np.ndarray:
    """Union of rectangles (glyph units * scale, shifted by -centre px) with area coverage."""
    r = np.arange(box, dtype=np.float64) - box // 2
    img = np.zeros((box, box))
    for x0, x1, y0, y1 in rects:
        cx = _coverage(r, x0 * scale - centre[0], x1 * scale - centre[0])  # (box,) over columns
        cy = _coverage(r, y0 * scale - centre[1], y1 * scale - centre[1])  # (box,) over rows
        img = np.maximum(img, cy[:, None] * cx[None, :])
    return img.astype(np.float32)


def _coverage(r: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Length of [lo, hi] inside each unit pixel [r - 0.5, r + 0.5]."""
    return np.clip(np.minimum(r + 0.5, hi) - np.maximum(r - 0.5, lo), 0.0, 1.0)


def glyphs(
    n: int,
    box: int = 40,
    seed: int = 0,
    n_classes: int = 3,
    t_sd_px: float = 2.0,
    height: float = 0.5,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n glyph images (n, box, box): classes F, L, P, T, J (first n_classes), balanced, each
    rotated uniformly and shifted by N(0, t_sd_px^2) per axis. truth: theta, t, label, templates."""
    if not 1 <= n_classes <= len(GLYPHS):
        raise UserError(f"glyphs: --views (classes) must be 1..{len(GLYPHS)}, got {n_classes}")
    rng = np.random.default_rng(seed)
    templates = np.stack([render_glyph(g, box, height) for g in list(GLYPHS)[:n_classes]])
    label = rng.permutation(np.arange(n) % n_classes)
    theta = rng.uniform(-math.pi, math.pi, n)
    t = rng.normal(0.0, t_sd_px, (n, 2))
    images = _pose(templates[label], theta, t)
    return images, {"theta": theta, "t": t, "label": label, "templates": templates}


def _pose(templates: np.ndarray, theta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """T(t) R(theta) applied to each image (n, D, D), in chunks; float32 numpy out."""
    out = np.empty(templates.shape, dtype=np.float32)
    for i in range(0, len(templates), _CHUNK):
        s = slice(i, i + _CHUNK)
        out[s] = transform_images(
            torch.from_numpy(np.ascontiguousarray(templates[s], dtype=np.float32)),
            torch.from_numpy(theta[s]).float(),
            torch.from_numpy(t[s]).float(),
        ).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# MNIST(N) and MNIST(U)


def load_mnist(root: str | Path, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (n, 28, 28) uint8 and labels (n,) int64 from the IDX gzip files in root."""
    root = Path(root)
    images = _read_idx(root / f"{split}-images-idx3-ubyte.gz", magic=2051)
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz", magic=2049)
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} MNIST images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array (big-endian header: magic, then one uint32 per dimension) from a gzip file."""
    if not path.is_file():
        raise UserError(f"MNIST file not found: {path} (give the folder with --mnist-dir)")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if header[0] != magic:
        raise UserError(f"{path}: not an MNIST IDX file (magic {header[0]}, expected {magic})")
    shape = tuple(int(d) for d in header[1:])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def mnist_rotated(
    images: np.ndarray,
    labels: np.ndarray,
    mode: str = "U",
    box: int = 50,
    t_sd_px: float = 2.5,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The paper's MNIST(N) (theta ~ N(0, (pi/4)^2)) or MNIST(U) (uniform) digits: padded to
    box x box, scaled to [0, 1], rotated and shifted by N(0, t_sd_px^2) per axis.

    truth: theta, t, label, and unrotated (n, box, box), the padded digit before its pose.
    """
    if mode not in ("N", "U"):
        raise UserError(f"MNIST mode must be 'N' or 'U', got {mode!r}")
    n, h, w = images.shape
    if box < max(h, w):
        raise UserError(f"box {box} is smaller than the {h}x{w} digits")
    rng = np.random.default_rng(seed)
    padded = np.zeros((n, box, box), dtype=np.float32)
    r0, c0 = box // 2 - h // 2, box // 2 - w // 2  # digit centre pixel -> box centre pixel
    padded[:, r0 : r0 + h, c0 : c0 + w] = images.astype(np.float32) / 255.0
    if mode == "N":
        theta = rng.normal(0.0, math.pi / 4, n)
    else:
        theta = rng.uniform(-math.pi, math.pi, n)
    t = rng.normal(0.0, t_sd_px, (n, 2))
    out = np.clip(_pose(padded, theta, t), 0.0, 1.0)
    truth = {"theta": theta, "t": t, "label": np.asarray(labels), "unrotated": padded}
    return out, truth


# ---------------------------------------------------------------------------------------------
# Simulated particles: projections of a 3D density


def blob_volume(
    size: int = 48, seed: int = 0, n_blobs: int = 14, extent: float = 0.25
) -> np.ndarray:
    """An asymmetric density (size, size, size) float32, axes (z, y, x): a sum of Gaussian blobs
    of random widths and heights within `extent` * size of the centre (so projections fit)."""
    vol = _add_blobs(np.zeros((size,) * 3), np.random.default_rng(seed), n_blobs, extent)
    return (vol / vol.max()).astype(np.float32)


def _add_blobs(vol: np.ndarray, rng: np.random.Generator, n_blobs: int, extent: float):
    """vol (D, D, D) plus n_blobs Gaussian blobs drawn from rng (centre, width, height)."""
    size = vol.shape[-1]
    r = np.arange(size, dtype=np.float64) - size // 2
    zz, yy, xx = np.meshgrid(r, r, r, indexing="ij")
    vol = vol.copy()
    for _ in range(n_blobs):
        c = rng.uniform(-1, 1, 3) * extent * size  # (z, y, x) centre
        sd = rng.uniform(0.04, 0.09) * size
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        vol += rng.uniform(0.5, 1.0) * np.exp(-d2 / (2 * sd**2))
    return vol


def blob_family(
    m: int, size: int = 64, seed: int = 0, shared: int = 8, own: int = 6, extent: float = 0.25
) -> np.ndarray:
    """m different globular densities (m, size, size, size) that look alike at low resolution:
    the same `shared` blobs plus `own` blobs each, all scaled to the same mass (sum) and peak 1
    on average. The hard benchmark sets use them (docs/results.md)."""
    if m < 1:
        raise UserError(f"--volumes must be at least 1, got {m}")
    core = _add_blobs(np.zeros((size,) * 3), np.random.default_rng(seed), shared, extent)
    vols = np.stack(
        [_add_blobs(core, np.random.default_rng([seed, j + 1]), own, extent) for j in range(m)]
    )
    vols *= vols.sum(axis=(1, 2, 3)).mean() / vols.sum(axis=(1, 2, 3))[:, None, None, None]
    return (vols / vols.max(axis=(1, 2, 3)).mean()).astype(np.float32)


def load_volume(path: str | Path) -> tuple[np.ndarray, float | None]:
    """A 3D density (D, D, D) float32 from an MRC file and its voxel size (None if unset/1)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"volume file not found: {path}")
    try:
        with mrcfile.open(path, permissive=True) as m:
            vol = np.array(m.data, dtype=np.float32)  # a copy: writable, file closed
            voxel = float(m.voxel_size.x)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: cannot read as MRC ({e})") from e
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise UserError(f"{path}: need a cubic 3D volume, got shape {vol.shape}")
    return vol, (voxel if voxel > 0 and voxel != 1.0 else None)


def euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """Rotation (3, 3) from ZYZ Euler angles in degrees: R = Rz(psi) Ry(tilt) Rz(rot)."""
    return _rz(psi) @ _ry(tilt) @ _rz(rot)


def _rz(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def spread_views(k: int) -> np.ndarray:
    """k rotations (k, 3, 3) whose viewing directions are spread over the sphere (Fibonacci)."""
    i = np.arange(k) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * i / k))
    rot = np.degrees(np.pi * (1 + 5**0.5) * i) % 360
    # R maps the direction (rot, tilt) onto +z, so projecting along z looks along that direction.
    return np.stack([_ry(-tl) @ _rz(-r) for r, tl in zip(rot, tilt, strict=True)])


def project(volume: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Projections (n, D, D) of volume (D, D, D; axes z, y, x) along z after rotating it by each
    rotation (n, 3, 3) acting on (x, y, z): image(x, y) = sum_z volume(R^T (x, y, z)).

    Trilinear sampling about the centre voxel D//2; outside the volume is zero.
    """
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    d = vol.shape[-1]
    r = torch.arange(d, dtype=torch.float32) - d // 2
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    p = torch.stack([xx, yy, zz], -1).reshape(-1, 3)  # (D^3, 3) output (x, y, z)
    out = []
    for rot in np.asarray(rotations, dtype=np.float32).reshape(-1, 3, 3):
        src = p @ torch.from_numpy(rot)  # rows: R^T p
        grid = (2.0 * (src + d // 2) / (d - 1) - 1.0).reshape(1, d, d, d, 3)
        sampled = F.grid_sample(vol, grid, mode="bilinear", align_corners=True)[0, 0]
        out.append(sampled.sum(0))  # sum over z -> (D, D) [y, x]
    return torch.stack(out).numpy()


def _crop_or_pad(images: np.ndarray, box: int) -> np.ndarray:
    """Centre crop or zero-pad images (n, D, D) to (n, box, box), keeping pixel D//2 at box//2."""
    d = images.shape[-1]
    out = np.zeros(images.shape[:-2] + (box, box), dtype=np.float32)
    lo_src, lo_dst = max(d // 2 - box // 2, 0), max(box // 2 - d // 2, 0)
    m = min(d, box)
    out[..., lo_dst : lo_dst + m, lo_dst : lo_dst + m] = images[
        ..., lo_src : lo_src + m, lo_src : lo_src + m
    ]
    return out


def random_ctf_params(
    n: int,
    rng: np.random.Generator,
    defocus_range_um: tuple[float, float] = (1.0, 2.5),
    max_astig_A: float = 500.0,
    volt_kv: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.1,
) -> CtfParams:
    """Per-particle CtfParams: defocus uniform in the range, small random astigmatism."""
    df = rng.uniform(*defocus_range_um, n) * 1e4  # um -> Angstrom
    astig = rng.uniform(0.0, max_astig_A, n)
    full = np.full(n, 1.0)
    return CtfParams(
        dfu_A=df + astig / 2,
        dfv_A=df - astig / 2,
        dfang_deg=rng.uniform(0.0, 180.0, n),
        volt_kv=volt_kv * full,
        cs_mm=cs_mm * full,
        amp_contrast=amp_contrast * full,
        phase_shift_deg=0 * full,
        bfactor=0 * full,
    )


MAX_VIEW_CC = 0.98  # two classes correlating above this are refused (docs/results.md)


def simulate_particles(
    volume: np.ndarray,
    n: int,
    views: np.ndarray | Sequence[Sequence[float]],
    box: int | None = None,
    apix: float = 4.0,
    snr: float = 0.1,
    defocus_range_um: tuple[float, float] = (1.0, 2.5),
    ctf: bool = True,
    t_sd_px: float = 2.0,
    seed: int = 0,
    vol_apix: float | None = None,
    view_volumes: Sequence[int] | None = None,
    max_view_cc: float | None = MAX_VIEW_CC,
    check_res_A: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Particle images (n, box, box): projection of one of the views (the classes, balanced),
    then T(t) R(theta) with uniform theta and t ~ N(0, t_sd_px^2), then the particle's CTF, then
    Gaussian noise at SNR = signal variance / noise variance (signal over the whole box, averaged
    over the set); finally scaled so the images have unit variance overall.

    volume: one density (D, D, D) or several (M, D, D, D); view_volumes: the volume of each view
    (default all 0). views: (K, 3, 3) rotations or (K, 3) ZYZ Euler angles in degrees. vol_apix:
    the volume's voxel size when it differs from apix (projections are Fourier-resampled).
    The set is refused (UserError) when two classes correlate above max_view_cc under any in-plane
    rotation, shift or mirror at check_res_A (`view_correlation`; None: no check).
    truth: theta, t, label, templates (K, box, box) CTF-free projections, ctf (CtfParams or
    None), snr, scale, view_cc (K, K) and views (a table of the classes).
    """
    rng = np.random.default_rng(seed)
    rotations = _as_rotations(views)
    vols = volume[None] if np.ndim(volume) == 3 else np.asarray(volume)
    of_view = np.zeros(len(rotations), int) if view_volumes is None else np.asarray(view_volumes)
    if len(of_view) != len(rotations) or of_view.min() < 0 or of_view.max() >= len(vols):
        raise UserError(f"view_volumes {of_view.tolist()} do not fit {len(vols)} volumes")
    templates = np.concatenate(
        [
            _templates(vols[v], rotations[k : k + 1], box, apix, vol_apix)
            for k, v in enumerate(of_view)
        ]
    )
    k, box = len(templates), templates.shape[-1]
    view_cc = view_correlation(templates, apix, check_res_A)
    if max_view_cc is not None:
        check_distinct_views(view_cc, max_view_cc, check_res_A or 4 * apix)
    label = rng.permutation(np.arange(n) % k)
    theta = rng.uniform(-math.pi, math.pi, n)
    t = rng.normal(0.0, t_sd_px, (n, 2))
    signal = _pose(templates[label], theta, t)  # (n, box, box)
    params = random_ctf_params(n, rng, defocus_range_um) if ctf else None
    if params is not None:
        signal = _apply_ctf_chunked(signal, params, apix)
    images, scale = _add_noise(signal, snr, rng)
    truth = {"theta": theta, "t": t, "label": label, "templates": templates}
    truth.update(ctf=params, snr=snr, scale=scale, view_cc=view_cc)
    truth["views"] = views_table(rotations, of_view, templates, view_cc)
    return images, truth


def view_correlation(templates: np.ndarray, apix: float, res_A: float | None = None) -> np.ndarray:
    """(K, K) best correlation of each pair of templates under in-plane rotation (1 deg steps),
    shift and mirror (metrics.pairwise_view_correlation), after a Gaussian low-pass to res_A
    (default 4 * apix: the Nyquist of the set downsampled twice, what a 32-px copy of a 64-px set
    can carry) and a Fourier crop to that resolution's Nyquist."""
    from .fourier import lowpass
    from .metrics import pairwise_view_correlation

    if len(templates) < 2:
        return np.ones((len(templates), len(templates)))
    res = 4 * apix if res_A is None else res_A
    d = templates.shape[-1]
    small = lowpass(np.asarray(templates, np.float32), apix, res)
    size = min(d, 2 * math.ceil(d * apix / res))  # even, Nyquist 2 * (d * apix / size) ~ res
    if size < d:
        small = fourier_resize(small, size)
    return pairwise_view_correlation(small, n_angles=360)


def check_distinct_views(view_cc: np.ndarray, max_cc: float, res_A: float) -> None:
    """UserError naming the most alike pair of classes when it correlates above max_cc."""
    cc = np.where(np.eye(len(view_cc), dtype=bool), -np.inf, view_cc)
    if len(cc) < 2 or cc.max() <= max_cc:
        return
    i, j = np.unravel_index(int(cc.argmax()), cc.shape)
    raise UserError(
        f"classes {i} and {j} are the same image under an in-plane rotation, shift or mirror "
        f"(correlation {cc[i, j]:.3f} > {max_cc:g} at {res_A:g} A): choose other --views"
    )


def views_table(
    rotations: np.ndarray, of_view: np.ndarray, templates: np.ndarray, view_cc: np.ndarray
) -> pd.DataFrame:
    """One row per class: its volume, viewing direction (unit vector in the volume's frame),
    template mass and radius of gyration (px), its most alike class and their correlation, and
    the correlation with every class (cc_0, cc_1, ...)."""
    k, d = len(templates), templates.shape[-1]
    r = np.arange(d) - d // 2
    r2 = r[None, :] ** 2 + r[:, None] ** 2
    mass = templates.sum(axis=(1, 2))
    rg = np.sqrt((templates * r2).sum(axis=(1, 2)) / np.where(mass != 0, mass, 1))
    direction = np.asarray(rotations)[:, 2, :]  # R maps this direction onto +z (the beam)
    off = np.where(np.eye(k, dtype=bool), -np.inf, view_cc)
    table = pd.DataFrame(
        {
            "class": np.arange(k),
            "volume": of_view,
            "dir_x": direction[:, 0],
            "dir_y": direction[:, 1],
            "dir_z": direction[:, 2],
            "mass": mass,
            "rg_px": rg,
            "most_alike": off.argmax(1) if k > 1 else -1,
            "max_cc": off.max(1) if k > 1 else np.nan,
        }
    )
    for j in range(k):
        table[f"cc_{j}"] = view_cc[:, j]
    return table


def clean_images(
    templates: np.ndarray,
    theta: np.ndarray,
    t: np.ndarray,
    label: np.ndarray,
    box: int | None = None,
) -> np.ndarray:
    """The noise-free, CTF-free particles (n, box, box): T(t) R(theta) template[label] at the
    templates' size, Fourier-cropped to box (as `preprocess --size` crops the real ones)."""
    theta, t = np.array(theta, np.float64), np.array(t, np.float64)  # writable copies for torch
    images = _pose(np.asarray(templates, np.float32)[np.asarray(label)], theta, t)
    if box is not None and box != images.shape[-1]:
        images = np.concatenate(
            [fourier_resize(images[i : i + _CHUNK], box) for i in range(0, len(images), _CHUNK)]
        )
    return images


def _as_rotations(views) -> np.ndarray:
    """(K, 3, 3) rotations from rotations or (K, 3) Euler angles (degrees)."""
    v = np.asarray(views, dtype=np.float64)
    if v.ndim == 3 and v.shape[1:] == (3, 3):
        return v
    if v.ndim == 2 and v.shape[1] == 3:
        return np.stack([euler_matrix(*e) for e in v])
    raise UserError(f"views must be (K, 3, 3) rotations or (K, 3) Euler angles, got {v.shape}")


def _templates(volume, rotations, box, apix, vol_apix) -> np.ndarray:
    """CTF-free projections (K, box, box) at pixel size apix."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise UserError(f"need a cubic 3D volume, got shape {volume.shape}")
    proj = project(volume, rotations)
    d = volume.shape[-1]
    if vol_apix is not None and not math.isclose(vol_apix, apix):
        proj = fourier_resize(proj, max(2, round(d * vol_apix / apix)))
    return _crop_or_pad(proj, box or proj.shape[-1])


def _apply_ctf_chunked(images: np.ndarray, params: CtfParams, apix: float) -> np.ndarray:
    """Each image (n, D, D) multiplied by its CTF in Fourier space."""
    out = np.empty_like(images)
    box = images.shape[-1]
    apix_all = np.full(len(images), float(apix))
    for i in range(0, len(images), _CHUNK):
        idx = np.arange(i, min(i + _CHUNK, len(images)))
        c = batch_ctf(params, apix_all, idx, box)
        out[idx] = apply_ctf(torch.from_numpy(images[idx]), c).numpy()
    return out


def _add_noise(
    signal: np.ndarray, snr: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """signal + N(0, var_s / snr) noise, scaled to unit overall variance: (images, scale)."""
    var_s = float(signal.var(axis=(-2, -1)).mean())
    if snr <= 0:
        raise UserError(f"--snr must be positive (use inf for no noise), got {snr}")
    noise_sd = 0.0 if math.isinf(snr) else math.sqrt(var_s / snr)
    noisy = signal + rng.normal(0.0, 1.0, signal.shape).astype(np.float32) * noise_sd
    scale = 1.0 / math.sqrt(var_s + noise_sd**2) if var_s + noise_sd**2 > 0 else 1.0
    return (noisy * scale).astype(np.float32), scale


# ---------------------------------------------------------------------------------------------
# Writing a data set: stack + RELION 3.1 star + truth.csv


# ---- continuous heterogeneity: a two-domain particle with a hinge ---------------------------
HINGE_AXIS_TILT_DEG = 20.0  # the hinge axis leans this far from the beam: mostly an in-plane swing


def hinge_points(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A two-domain object as 3D Gaussian points in box units (x, y, z in [-0.5, 0.5]): the fixed
    domain (Pa, 3) on the left and the moving one (Pb, 3) on the right of the hinge at the origin.
    Weights are equal; the domains differ in size so the object has no symmetry."""
    rng = np.random.default_rng(seed + 7919)
    fixed = np.array([-0.14, 0.02, 0.0]) + rng.normal(0.0, 0.055, (14, 3))
    moving = np.array([0.15, -0.02, 0.0]) + rng.normal(0.0, 0.04, (8, 3)) * [1.4, 0.8, 0.8]
    return fixed, moving


def hinge_templates(angles_deg: np.ndarray, box: int, seed: int = 0) -> np.ndarray:
    """CTF-free projections (n, box, box) of the hinge object with its moving domain turned by
    angles_deg (n,) about the hinge axis (through the origin, leaning HINGE_AXIS_TILT_DEG from
    the beam), each point a Gaussian of sd box/28 px: exact projections of a sum of 3D Gaussians."""
    fixed, moving = hinge_points(seed)
    tilt = math.radians(HINGE_AXIS_TILT_DEG)
    axis = np.array([0.0, math.sin(tilt), math.cos(tilt)])
    sd = box / 28.0
    grid = np.arange(box) - box // 2  # pixel coordinates (x = column, y = row)
    out = np.zeros((len(angles_deg), box, box), np.float32)
    for i, a in enumerate(np.radians(np.asarray(angles_deg, dtype=np.float64))):
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)  # Rodrigues
        pts = np.concatenate([fixed, moving @ rot.T]) * box  # (P, 3) pixels
        gx = np.exp(-((grid[None, :] - pts[:, :1]) ** 2) / (2 * sd**2))  # (P, box) over x
        gy = np.exp(-((grid[None, :] - pts[:, 1:2]) ** 2) / (2 * sd**2))  # (P, box) over y
        out[i] = np.einsum("py,px->yx", gy, gx)
    return out


def simulate_hinge(
    n: int,
    box: int = 64,
    apix: float = 2.0,
    snr: float = 0.1,
    max_angle_deg: float = 60.0,
    defocus_range_um: tuple[float, float] = (1.0, 2.5),
    ctf: bool = True,
    t_sd_px: float = 2.0,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Particles of one flexible object: the moving domain turned by a per-particle hinge angle
    ~ U(0, max_angle_deg), then T(t) R(theta) (uniform theta), CTF and noise as
    `simulate_particles`. truth: theta, t, label (all 0), hinge_deg, templates (the object at
    the ends and middle of the motion), ctf, snr, scale."""
    if not 0 < max_angle_deg <= 180:
        raise UserError(f"--hinge {max_angle_deg:g}: the largest hinge angle must be in (0, 180]")
    rng = np.random.default_rng(seed)
    hinge = rng.uniform(0.0, max_angle_deg, n)
    theta = rng.uniform(-math.pi, math.pi, n)
    t = rng.normal(0.0, t_sd_px, (n, 2))
    signal = _pose(hinge_templates(hinge, box, seed), theta, t)
    params = random_ctf_params(n, rng, defocus_range_um) if ctf else None
    if params is not None:
        signal = _apply_ctf_chunked(signal, params, apix)
    images, scale = _add_noise(signal, snr, rng)
    ends = hinge_templates(np.array([0.0, max_angle_deg / 2, max_angle_deg]), box, seed)
    truth = {"theta": theta, "t": t, "label": np.zeros(n, np.int64), "hinge_deg": hinge}
    truth.update(templates=ends, ctf=params, snr=snr, scale=scale)
    return images, truth


def truth_table(truth: dict, apix: float) -> pd.DataFrame:
    """The truth as a table: our pose (theta_rad, tx_px, ty_px), class, and the RELION alignment
    that undoes it (psi_deg = -theta, originX/Y_A = -t * apix; docs/architecture.md)."""
    theta, t = np.asarray(truth["theta"]), np.asarray(truth["t"])
    psi, origin = relion_pose(theta, t, apix)
    extra = {"hinge_deg": np.asarray(truth["hinge_deg"])} if "hinge_deg" in truth else {}
    return pd.DataFrame(
        {
            "index": np.arange(len(theta)),
            "class": np.asarray(truth["label"]),
            "theta_rad": theta,
            "tx_px": t[:, 0],
            "ty_px": t[:, 1],
            "psi_deg": psi,
            "originX_A": origin[:, 0],
            "originY_A": origin[:, 1],
            **extra,
        }
    )


def star_blocks(
    n: int, box: int, apix: float, stack_name: str, ctf_params: CtfParams | None = None
) -> dict[str, pd.DataFrame]:
    """RELION 3.1 optics and particles blocks for n images in stack_name (defocus when given)."""
    volt, cs, w = 300.0, 2.7, 0.1
    if ctf_params is not None:
        volt, cs, w = (
            float(x[0]) for x in (ctf_params.volt_kv, ctf_params.cs_mm, ctf_params.amp_contrast)
        )
    microscope = pd.DataFrame(
        {"rlnVoltage": [volt], "rlnSphericalAberration": [cs], "rlnAmplitudeContrast": [w]}
    )
    _, optics = build_optics(microscope, np.array([float(apix)]), box)
    particles = pd.DataFrame(
        {"rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)], "rlnOpticsGroup": 1}
    )
    if ctf_params is not None:
        particles["rlnDefocusU"] = ctf_params.dfu_A
        particles["rlnDefocusV"] = ctf_params.dfv_A
        particles["rlnDefocusAngle"] = ctf_params.dfang_deg
        particles["rlnPhaseShift"] = ctf_params.phase_shift_deg
    return {"optics": optics, "particles": particles}


def write_dataset(
    out_dir: str | Path,
    images: np.ndarray,
    truth: dict,
    apix: float,
    ctf_params: CtfParams | None = None,
    name: str = "particles",
    float16: bool = False,
) -> dict[str, Path]:
    """Write `name`.mrcs, a RELION 3.1 `name`.star (defocus columns when ctf_params is given) and
    truth.csv (plus templates.mrcs and views.csv when the truth has them) into out_dir, each
    atomically.

    The star holds nothing a real data set would not, so tools see it as real input.
    """
    out = ensure_writable_dir(out_dir)
    n, box = images.shape[0], images.shape[-1]
    paths = {
        "stack": out / f"{name}.mrcs",
        "star": out / f"{name}.star",
        "truth": out / "truth.csv",
    }
    _write_images(paths["stack"], images, apix, float16)
    write_star(paths["star"], star_blocks(n, box, apix, paths["stack"].name, ctf_params))
    with atomic_path(paths["truth"]) as tmp:
        truth_table(truth, apix).to_csv(tmp, index=False, float_format="%.8g")
    if truth.get("templates") is not None:
        paths["templates"] = out / "templates.mrcs"
        _write_images(paths["templates"], np.asarray(truth["templates"]), apix, False)
    if truth.get("views") is not None:
        paths["views"] = out / "views.csv"
        with atomic_path(paths["views"]) as tmp:
            truth["views"].to_csv(tmp, index=False, float_format="%.6g")
    return paths


def _write_images(path: Path, images: np.ndarray, apix: float, float16: bool) -> None:
    """An image stack, float32 through io.write_stack or float16 (MRC mode 12) directly."""
    n, box = images.shape[0], images.shape[-1]
    if not float16:
        chunks = (images[i : i + _CHUNK].astype(np.float32) for i in range(0, n, _CHUNK))
        write_stack(path, chunks, n, box, apix)
        return
    with atomic_path(path) as tmp, mrcfile.new(tmp, data=images.astype(np.float16)) as m:
        m.set_image_stack()
        m.voxel_size = apix


# ---------------------------------------------------------------------------------------------
# One call per data set kind (the `tvae-em simulate` command)

KINDS = ("glyphs", "hinge", "mnist-n", "mnist-u", "particles")


HARD = {"volumes": 3, "views": 6, "box": 64, "apix": 2.0}  # `simulate particles --hard`


def build_dataset(
    kind: str,
    out_dir: str | Path,
    n: int | None = None,
    box: int | None = None,
    snr: float | None = None,
    ctf: bool = True,
    volume: str | Path | None = None,
    views: int | None = None,
    mnist_dir: str | Path | None = None,
    seed: int = 0,
    apix: float | None = None,
    t_sd_px: float = 2.0,
    float16: bool = False,
    volumes: int | None = None,
    defocus_um: tuple[float, float] = (1.0, 2.5),
    hard: bool = False,
    hinge_max_deg: float = 60.0,
) -> dict[str, Path]:
    """Generate a data set of the given kind with ground truth and write it (see write_dataset).

    hard (particles): the preset HARD (3 look-alike blob volumes, 6 views, 64 px at 2 A) for
    whatever of volumes, views, box and apix is not given."""
    if kind not in KINDS:
        raise UserError(f"unknown data set {kind!r}; choose from {', '.join(KINDS)}")
    if n is not None and n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if kind != "particles" and (hard or volumes is not None):
        raise UserError("--hard and --volumes apply to particles only")
    if kind == "particles":
        if hard:
            volumes, views = volumes or HARD["volumes"], views or HARD["views"]
            box, apix = box or HARD["box"], apix or HARD["apix"]
        opts = dict(volumes=volumes or 1, defocus_um=defocus_um)
        images, truth, apix = _build_particles(
            n, box, snr, ctf, volume, views or 3, seed, apix, t_sd_px, **opts
        )
    elif kind == "hinge":
        apix = apix or 2.0
        lo, hi = defocus_um
        images, truth = simulate_hinge(
            n or 1000, box or 64, apix, 0.1 if snr is None else snr, hinge_max_deg, (lo, hi),
            ctf, t_sd_px, seed,
        )  # fmt: skip
    elif kind == "glyphs":
        images, truth = glyphs(n or 1000, box or 40, seed, n_classes=views or 3, t_sd_px=t_sd_px)
        if snr is not None:
            images, _ = _add_noise(images, snr, np.random.default_rng(seed + 1))
    else:
        if snr is not None:
            raise UserError("--snr applies to glyphs and particles, not to MNIST")
        if mnist_dir is None:
            raise UserError("MNIST data sets need --mnist-dir (the folder with t10k-*-ubyte.gz)")
        digits, labels = load_mnist(mnist_dir)
        if n is not None and n > len(digits):
            raise UserError(f"--n {n} is more than the {len(digits)} MNIST digits in {mnist_dir}")
        mode = "N" if kind == "mnist-n" else "U"
        images, truth = mnist_rotated(digits[:n], labels[:n], mode, box or 50, t_sd_px, seed)
    return write_dataset(out_dir, images, truth, apix or 1.0, truth.get("ctf"), float16=float16)


def _build_particles(n, box, snr, ctf, volume, views, seed, apix, t_sd_px, volumes, defocus_um):
    """Simulated particles from a volume file (or blob volumes): (images, truth, apix).

    With volumes M > 1 (look-alike blob volumes, `blob_family`), class c is view c of volume
    c mod M, each class at its own direction of `spread_views(views)`."""
    if views < 1:
        raise UserError(f"--views must be at least 1, got {views}")
    if volumes < 1:
        raise UserError(f"--volumes must be at least 1, got {volumes}")
    if volumes > views:
        raise UserError(f"--volumes {volumes} needs at least as many --views, got {views}")
    lo, hi = defocus_um
    if not 0 < lo <= hi:
        raise UserError(f"--defocus must be 0 < MIN <= MAX (um), got {lo:g} {hi:g}")
    if volume is not None and volumes > 1:
        raise UserError("--volumes makes look-alike blob volumes: give it without --volume")
    if volume is not None:
        vol, vol_apix = load_volume(volume)
    elif volumes > 1:
        vol, vol_apix = blob_family(volumes, box or 48, seed), None
    else:
        vol, vol_apix = blob_volume(box or 48, seed), None
    apix = apix or vol_apix or 4.0
    images, truth = simulate_particles(
        vol,
        n or 1000,
        spread_views(views),
        box=box,
        apix=apix,
        snr=0.1 if snr is None else snr,
        defocus_range_um=(lo, hi),
        ctf=ctf,
        t_sd_px=t_sd_px,
        seed=seed,
        vol_apix=vol_apix,
        view_volumes=np.arange(views) % volumes,
    )
    return images, truth, apix
