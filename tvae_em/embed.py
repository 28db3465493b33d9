"""`tvae-em embed`: per-particle pose and latent from a trained run, exported for RELION/cryoSPARC.

Inference is batched, without gradients, on the exported (plain torch) model, with bf16 autocast on
CUDA; images are streamed batch by batch and normalised exactly as in training, and results go into
preallocated arrays, so memory does not grow with the stack beyond one row of numbers per particle.

Pose export (docs/architecture.md): a particle at pose (theta, t) is T(t) R(theta) template, so
rlnAnglePsi = -degrees(theta) wrapped to (-180, 180] and rlnOriginX/YAngst = -t * pixel size.
Every output file is written under a temporary name and renamed only when all of them are complete.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoint import TrainedModel, load_trained
from .data import BatchDataset, Normalisation, epoch_batches, make_loader
from .errors import UserError

Z_PREFIX = "tvaeZ"
Z_SD_PREFIX = "tvaeZsd"
CONFIDENCE = "tvaePoseConfidence"
ELBO = "tvaeElbo"
POSE_COLUMNS = ["rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst"]
CS_ALIGN = "alignments2D/"
Progress = Callable[[int], object]  # advance(n particles done)


@dataclass
class Embedding:
    """The model's per-particle results, rows in input order, in the model stack's pixels."""

    z_mu: np.ndarray  # (n, Z) latent mean at the winning cell
    z_sd: np.ndarray  # (n, Z) latent sd at the winning cell
    theta: np.ndarray  # (n,) radians, our convention (particle = T(t) R(theta) template)
    t: np.ndarray  # (n, 2) pixels (x, y) of the stack the model read
    confidence: np.ndarray  # (n,) posterior probability of the winning cell
    elbo: np.ndarray  # (n,) one-sample ELBO estimate (nats); NaN when not computed

    @classmethod
    def empty(cls, n: int, z_dim: int) -> Embedding:
        """Preallocated arrays for n particles (ELBO NaN until filled)."""
        f = np.float32
        return cls(
            z_mu=np.zeros((n, z_dim), f),
            z_sd=np.zeros((n, z_dim), f),
            theta=np.zeros(n, np.float64),
            t=np.zeros((n, 2), np.float64),
            confidence=np.zeros(n, f),
            elbo=np.full(n, np.nan, f),
        )

    def store(self, idx: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        """Copy one batch of `TargetVAE.embed` outputs into rows `idx`."""
        self.z_mu[idx] = out["z_mu"].float().cpu().numpy()
        self.z_sd[idx] = out["z_sd"].float().cpu().numpy()
        self.theta[idx] = out["theta"].double().cpu().numpy()
        self.t[idx] = out["t"].double().cpu().numpy()
        self.confidence[idx] = out["confidence"].float().cpu().numpy()
        if "elbo" in out:
            self.elbo[idx] = out["elbo"].float().cpu().numpy()


@dataclass
class EmbedSummary:
    """What `embed_particles` did: particle count, time, device and files written."""

    n: int
    seconds: float
    device: str
    outputs: list[Path] = field(default_factory=list)
    classes: int | None = None

    @property
    def particles_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        """One-line summary for the terminal."""
        files = ", ".join(str(p) for p in self.outputs)
        return (
            f"embedded {self.n} particles in {self.seconds:.1f} s "
            f"({self.particles_per_s:.1f} particles/s, {self.device}) -> {files}"
        )


# ---------------------------------------------------------------- pure conversions


def wrap_degrees(deg: np.ndarray) -> np.ndarray:
    """Angles in degrees wrapped to (-180, 180]."""
    return 180.0 - np.mod(180.0 - np.asarray(deg, dtype=np.float64), 360.0)


def relion_pose(
    theta: np.ndarray, t_px: np.ndarray, apix: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """RELION alignment undoing pose theta (n,) rad, t (n, 2) px: psi (n,) deg, origin (n, 2) A."""
    psi = wrap_degrees(-np.degrees(theta))
    origin = -np.asarray(t_px, dtype=np.float64) * np.asarray(apix, dtype=np.float64).reshape(-1, 1)
    return psi, origin


def cryosparc_pose(
    psi_deg: np.ndarray, origin_A: np.ndarray, psize: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """alignments2D pose (n,) rad and shift (n, 2) px that pyem's csparc2star maps to the given
    RELION psi/origins (psi = degrees(pose), origin = shift * psize; no sign change)."""
    shift = np.asarray(origin_A, dtype=np.float64) / np.asarray(psize, np.float64).reshape(-1, 1)
    return np.radians(psi_deg), shift


def embedding_columns(emb: Embedding, apix: np.ndarray, labels: np.ndarray | None) -> pd.DataFrame:
    """The columns embed adds to a particle table (one row per particle)."""
    psi, origin = relion_pose(emb.theta, emb.t, apix)
    cols: dict[str, np.ndarray] = {
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
    }
    if labels is not None:
        cols["rlnClassNumber"] = labels.astype(np.int64)
    for j in range(emb.z_mu.shape[1]):
        cols[f"{Z_PREFIX}{j + 1}"] = emb.z_mu[:, j].astype(np.float64)
    for j in range(emb.z_sd.shape[1]):
        cols[f"{Z_SD_PREFIX}{j + 1}"] = emb.z_sd[:, j].astype(np.float64)
    cols[CONFIDENCE] = emb.confidence.astype(np.float64)
    if not np.isnan(emb.elbo).all():  # not computed (--no-elbo): no column
        cols[ELBO] = emb.elbo.astype(np.float64)
    return pd.DataFrame(cols)


def replace_columns(particles: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Input particles with pose (and class, when new has one) and old tvae columns replaced."""
    drop = [c for c in particles.columns if c in POSE_COLUMNS or c in new.columns]
    drop += [c for c in particles.columns if c.startswith("tvae")]
    kept = particles.drop(columns=sorted(set(drop))).reset_index(drop=True)
    return pd.concat([kept, new.reset_index(drop=True)], axis=1)


def assign_classes(z: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """1-based k-means classes (n,) in z space, numbered by decreasing size (class 1 largest)."""
    from .metrics import kmeans

    labels = kmeans(z, k, n_init=10, seed=seed)  # (n,) 0-based
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")  # old label of new class 1, 2, ...
    new_of_old = np.empty(k, np.int64)
    new_of_old[order] = np.arange(1, k + 1)
    return new_of_old[labels]


# ---------------------------------------------------------------- inference


def run_inference(
    model: torch.nn.Module,
    loader,
    n: int,
    device: torch.device,
    with_elbo: bool = True,
    ctf_for: Callable[[np.ndarray], torch.Tensor | None] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> Embedding:
    """Embed every batch (indices, images) of `loader` with `model.embed` into an Embedding."""
    emb = Embedding.empty(n, model.cfg.z_dim)
    use_amp = device.type == "cuda"
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)  # the ELBO's one Gumbel-softmax sample is reproducible
        for idx, y in loader:
            idx_np = idx.numpy()
            y = y.to(device, non_blocking=True)
            ctf = ctf_for(idx_np) if (with_elbo and ctf_for is not None) else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model.embed(y, with_elbo=with_elbo, ctf=ctf)
            emb.store(idx_np, out)
            if progress is not None:
                progress(len(idx_np))
    return emb


def load_model(run_dir: str | os.PathLike, device, checkpoint: str = "last") -> TrainedModel:
    """`load_trained`, without e2cnn's deprecation chatter on the terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")
        return load_trained(Path(run_dir), device, checkpoint)


def run_uses_ctf(trained: TrainedModel, stack) -> bool:
    """Whether the run was trained with the CTF (config.json "ctf"; else its --ctf option)."""
    config = trained.path.parent.parent / "config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text()).get("ctf", False))
        except (OSError, ValueError):
            pass
    mode = trained.train_config.get("ctf", "off")
    if mode == "auto":
        from .ctf import ctf_params

        return ctf_params(stack) is not None
    return mode == "on"


def _ctf_function(stack, input_path: str, device) -> Callable[[np.ndarray], torch.Tensor]:
    """idx -> (B, D, D) CTF of those particles, as in training (UserError if no defocus)."""
    from .ctf import compute_ctf, ctf_params

    params = ctf_params(stack)
    if params is None:
        raise UserError(
            f"{input_path}: the run was trained with the CTF but these particles have no defocus "
            "columns (use the star the run was trained on, or --no-elbo)"
        )
    apix = stack.apix

    def ctf_for(idx: np.ndarray) -> torch.Tensor:
        return compute_ctf(stack.box, torch.as_tensor(apix[idx]), params.subset(idx), device=device)

    return ctf_for


# ---------------------------------------------------------------- checks and outputs


@dataclass
class OutputPlan:
    """Final paths of every file embed writes (None: not written)."""

    star: Path
    npz: Path
    original_star: Path | None
    cs: Path | None

    def paths(self) -> list[Path]:
        return [p for p in (self.star, self.npz, self.original_star, self.cs) if p is not None]


def plan_outputs(
    out_star: str | os.PathLike,
    npz_out: str | os.PathLike | None,
    cs_out: str | os.PathLike | None,
    original_out: str | os.PathLike | None,
    with_original: bool,
    inputs: list[str | os.PathLike],
) -> OutputPlan:
    """Output paths checked before any work: suffixes, distinct, not an input, folders writable."""
    from .io import ensure_writable_dir

    star = Path(out_star)
    plan = OutputPlan(
        star=star,
        npz=Path(npz_out) if npz_out else star.with_suffix(".npz"),
        original_star=(
            (Path(original_out) if original_out else star.with_name(f"{star.stem}_original.star"))
            if with_original
            else None
        ),
        cs=Path(cs_out) if cs_out else None,
    )
    named = [("-o", plan.star, ".star"), ("--npz", plan.npz, ".npz"), ("--cs", plan.cs, ".cs")]
    named.append(("--original-out", plan.original_star, ".star"))
    seen = {os.path.abspath(p) for p in inputs if p is not None}
    for option, path, suffix in named:
        if path is None:
            continue
        if path.suffix.lower() != suffix:
            raise UserError(f"{option} {path}: the file name must end in {suffix}")
        if os.path.abspath(path) in seen:
            raise UserError(f"{option} {path}: would overwrite an input or another output")
        if path.is_dir():
            raise UserError(f"{option} {path}: is a folder, expected a file name")
        seen.add(os.path.abspath(path))
        try:
            ensure_writable_dir(path.parent if str(path.parent) else Path("."))
        except UserError as e:
            raise UserError(f"{option} {path}: {e}") from None
    return plan


def _check_box(stack, trained: TrainedModel, input_path: str, run_dir: str) -> None:
    """UserError with the fix when the images are not the size the model was trained on."""
    box = int(trained.model_config["box"])
    if stack.box != box:
        raise UserError(
            f"{input_path}: images are {stack.box} px but the model of {run_dir} takes {box} px; "
            f"downsample first (tvae-em preprocess {input_path} -o prep/ --size {box}), embed "
            f"prep/particles.star and pass --original {input_path} to get poses for this stack"
        )


def _check_classes(classes: int | None, n: int, input_path: str) -> None:
    if classes is not None and not 1 <= classes <= n:
        raise UserError(
            f"--classes {classes}: must be between 1 and the {n} particles of {input_path}"
        )


def open_original(path: str, datadir, stack) -> tuple[object, np.ndarray]:
    """The full-size ParticleStack and, for each particle of `stack`, its row there (n,)."""
    from .io import ParticleStack

    orig = ParticleStack.open(path, datadir=datadir)
    return orig, match_rows(orig.particles, stack.particles, path, str(stack.source))


MATCH_KEYS = (("uid",), ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"))


def match_rows(
    orig: pd.DataFrame, prep: pd.DataFrame, orig_name: str, prep_name: str
) -> np.ndarray:
    """Row of `orig` for each row of `prep` (n,): same order when the counts agree, else matched
    on uid or on micrograph + coordinates (particles dropped by preprocess --skip-bad)."""
    keys = next((k for k in MATCH_KEYS if set(k) <= set(orig) and set(k) <= set(prep)), None)
    a = _key_strings(orig, keys) if keys else None
    b = _key_strings(prep, keys) if keys else None
    if len(orig) == len(prep) and (keys is None or (a == b).all()):
        return np.arange(len(prep))
    if keys is None or a.duplicated().any():
        raise UserError(
            f"--original {orig_name}: cannot match its {len(orig)} particles to the {len(prep)} of "
            f"{prep_name} (give the star {prep_name} was preprocessed from)"
        )
    lookup = pd.Series(np.arange(len(orig)), index=a.to_numpy())
    rows = lookup.reindex(b.to_numpy())
    if rows.isna().any():
        i = int(np.argmax(rows.isna().to_numpy()))
        raise UserError(
            f"--original {orig_name}: particle {i + 1} of {prep_name} is not in it "
            f"(no row with the same {', '.join(keys)})"
        )
    return rows.to_numpy(np.int64)


def _key_strings(df: pd.DataFrame, keys: tuple[str, ...]) -> pd.Series:
    """One string per row identifying the particle (coordinates rounded to 0.01 px)."""
    parts = []
    for k in keys:
        col = df[k]
        if k.startswith("rlnCoordinate"):
            col = pd.to_numeric(col, errors="coerce").round(2)
        parts.append(col.astype(str).reset_index(drop=True))
    out = parts[0]
    for p in parts[1:]:
        out = out + "|" + p
    return out


def particle_star_tables(
    stack, new: pd.DataFrame, out_star: Path, rows: np.ndarray | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 (particles, optics) of `stack` (its `rows`, in that order) with the embed
    columns in place and image names valid from the folder of `out_star`."""
    from .io import relion31_tables

    rows = np.arange(len(stack)) if rows is None else rows
    particles, optics = relion31_tables(stack)
    particles = particles.iloc[rows].reset_index(drop=True)
    names = rebase_image_names(particles["rlnImageName"], stack, rows, out_star.parent)
    particles["rlnImageName"] = names
    return replace_columns(particles, new), optics


def rebase_image_names(names: pd.Series, stack, rows: np.ndarray, out_dir: Path) -> pd.Series:
    """rlnImageName whose stack part still finds the stack file from a star written in out_dir.

    A name that resolves to the same file from out_dir or from the working directory (RELION's
    project folder) is kept verbatim; others get the stack's path relative to out_dir.
    """
    names = names.astype(str)
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna()
    old = parts[1].where(has_at, parts[0])
    files = np.asarray(stack.files, dtype=object)
    target = files[stack.file_index[rows]]  # (n,) resolved stack of each particle
    fixed = {}
    for name, path in set(zip(old, target, strict=True)):
        fixed[name, path] = _stack_reference(name, path, out_dir)
    new = pd.Series([fixed[k] for k in zip(old, target, strict=True)], index=names.index)
    return (parts[0] + "@" + new).where(has_at, new)


def _stack_reference(name: str, path: str, out_dir: Path) -> str:
    """`name` if it leads to `path` from out_dir or the working directory, else a relative path."""
    for base in (out_dir, Path.cwd()):
        candidate = Path(name) if Path(name).is_absolute() else base / name
        if candidate.is_file() and os.path.samefile(candidate, path):
            return name
    return os.path.relpath(path, out_dir.resolve())


def cs_table(
    stack, psi_deg: np.ndarray, origin_A: np.ndarray, labels: np.ndarray | None, rows: np.ndarray
) -> np.ndarray:
    """cryoSPARC structured array of `stack`'s `rows`: uid (+ every field of a .cs input) and
    alignments2D/* with shifts in pixels of that stack."""
    from .io import dataframe_to_cs

    psize = stack.apix[rows]
    pose, shift = cryosparc_pose(psi_deg, origin_A, psize)
    template = getattr(stack, "cs_dtype", None) if stack.kind == "cryosparc" else None
    if template is not None:
        cs_cols = [c for c in stack.particles.columns if "/" in c or c == "uid"]
        keep = [c for c in cs_cols if not c.startswith(CS_ALIGN)]
        df = stack.particles[keep].iloc[rows].reset_index(drop=True).copy()
        template = np.dtype([d for d in template.descr if d[0] and not d[0].startswith(CS_ALIGN)])
    else:
        df = pd.DataFrame({"uid": np.asarray(rows, dtype=np.uint64)})  # row in that file
    df[f"{CS_ALIGN}pose"] = pose.astype(np.float32)
    df[f"{CS_ALIGN}shift[0]"] = shift[:, 0].astype(np.float32)
    df[f"{CS_ALIGN}shift[1]"] = shift[:, 1].astype(np.float32)
    df[f"{CS_ALIGN}psize_A"] = np.asarray(psize, dtype=np.float32)
    if labels is not None:
        df[f"{CS_ALIGN}class"] = (labels - 1).astype(np.uint32)
    return dataframe_to_cs(df, template)


def npz_arrays(
    emb: Embedding, psi: np.ndarray, origin: np.ndarray, labels: np.ndarray | None, apix, box: int
) -> dict[str, np.ndarray]:
    """The arrays of embedded.npz (docs/outputs.md)."""
    n = len(emb.theta)
    return {
        "z_mu": emb.z_mu,
        "z_sd": emb.z_sd,
        "theta_rad": emb.theta,
        "psi_deg": psi,
        "t_px": emb.t,
        "origin_A": origin,
        "confidence": emb.confidence,
        "elbo": emb.elbo,
        "class": labels if labels is not None else np.zeros(n, np.int64),
        "indices": np.arange(n, dtype=np.int64),
        "apix": np.asarray(apix, dtype=np.float64),
        "box": np.int64(box),
    }


def write_outputs(plan: OutputPlan, tables: dict[str, object]) -> None:
    """Write every planned file under temporary names, then rename them all (none on failure)."""
    from .io import atomic_paths, write_cs, write_star

    paths = plan.paths()
    with atomic_paths(paths) as tmps:
        tmp = dict(zip(map(str, paths), tmps, strict=True))
        particles, optics = tables["star"]
        write_star(tmp[str(plan.star)], {"optics": optics, "particles": particles})
        with open(tmp[str(plan.npz)], "wb") as f:
            np.savez(f, **tables["npz"])
        if plan.original_star is not None:
            particles, optics = tables["original_star"]
            write_star(tmp[str(plan.original_star)], {"optics": optics, "particles": particles})
        if plan.cs is not None:
            write_cs(tmp[str(plan.cs)], tables["cs"])


# ---------------------------------------------------------------- the command


def embed_particles(
    run_dir: str | os.PathLike,
    input: str | os.PathLike,
    out_star: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "auto",
    classes: int | None = None,
    cs_out: str | os.PathLike | None = None,
    npz_out: str | os.PathLike | None = None,
    original: str | os.PathLike | None = None,
    original_out: str | os.PathLike | None = None,
    input_apix: float | None = None,
    num_workers: int = 0,
    with_elbo: bool = True,
    checkpoint: str = "last",
    seed: int = 0,
    progress: Progress | None = None,
    on_start: Callable[[int], object] | None = None,
) -> EmbedSummary:
    """Embed the particles of `input` with the model of `run_dir` and write star, npz (and cs).

    `original`: the full-size star/cs the model's stack was made from; its rows are written too,
    with the same physical origins. `on_start(n)` is called once the particle count is known.
    """
    from .io import ParticleStack
    from .train import resolve_device

    input, run_dir = str(input), str(run_dir)
    dev = resolve_device(device)
    trained = load_model(run_dir, dev, checkpoint)
    stack = ParticleStack.open(input, datadir=datadir, apix=input_apix)
    n = len(stack)
    _check_box(stack, trained, input, run_dir)
    _check_classes(classes, n, input)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    orig, rows = open_original(str(original), datadir, stack) if original else (None, None)
    plan = plan_outputs(
        out_star, npz_out, cs_out, original_out, orig is not None, [input, original]
    )
    apix = stack.apix  # (n,) UserError when unknown
    use_ctf = with_elbo and run_uses_ctf(trained, stack)
    ctf_for = _ctf_function(stack, input, dev) if use_ctf else None

    model = trained.model.export_for_inference().to(dev)
    norm = Normalisation(trained.norm_mean, trained.norm_sd)
    loader = make_loader(
        BatchDataset(stack, norm), epoch_batches(n, batch_size, 0, 0, shuffle=False), num_workers
    )
    if on_start is not None:
        on_start(n)
    t0 = time.perf_counter()
    emb = run_inference(model, loader, n, dev, with_elbo, ctf_for, progress, seed)
    seconds = time.perf_counter() - t0

    labels = assign_classes(emb.z_mu, classes, seed) if classes else None
    new = embedding_columns(emb, apix, labels)
    psi, origin = relion_pose(emb.theta, emb.t, apix)
    tables: dict[str, object] = {
        "star": particle_star_tables(stack, new, plan.star),
        "npz": npz_arrays(emb, psi, origin, labels, apix, stack.box),
    }
    target, target_rows = stack, np.arange(n)
    if orig is not None:
        tables["original_star"] = particle_star_tables(orig, new, plan.original_star, rows)
        target, target_rows = orig, rows
    if plan.cs is not None:
        tables["cs"] = cs_table(target, psi, origin, labels, target_rows)
    write_outputs(plan, tables)
    return EmbedSummary(n, seconds, str(dev), outputs=plan.paths(), classes=classes)
