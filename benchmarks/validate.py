"""Validate tvae-em against ground truth by running the real CLI and scoring its `embed` output.

Each suite runs ``tvae-em simulate`` -> (``preprocess``) -> ``train`` -> ``embed`` in child
processes, then scores the embed .npz against the simulation's truth.csv with the paper's metrics
(tvae_em.metrics): rotation circular correlation (overall and within each true class, because each
class has its own canonical orientation; for digits, as the paper, after subtracting the prediction
on the unrotated digit), shift Pearson r per axis, clustering accuracy (k-means with many restarts
on z, Hungarian-matched), and the correlation of pose-aligned class averages with the true
templates. One JSON file and one markdown row per run go to the results folder.

    python benchmarks/validate.py mnist --mode U --z-dim 32 --n 10000 --epochs 5
    python benchmarks/validate.py particles --snr 0.05 --no-ctf --n 2000 --epochs 10
    python benchmarks/validate.py glyphs --n 1000 --epochs 5
    python benchmarks/validate.py table            # every result so far, as a markdown table
    python benchmarks/validate.py gpu-command      # the paper's full protocol on a GPU
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from tvae_em.metrics import (
    angle_error_summary,
    angle_errors,
    circular_correlation,
    cluster_embedding_accuracy,
    shift_correlation,
    template_correlation,
)

SHARED = Path(os.environ.get("TVAE_SHARED_DATA", "/work/shared/data"))
MNIST_DIR = SHARED / "mnist"
HAND_VOL = SHARED / "cryodrgn-tests" / "hand-vol.mrc"
DEFAULT_WORK = Path("/tmp/tvae-validate")
KMEANS_RESTARTS = 50
PAPER = {  # TARGET-VAE paper (Nasiri & Bepler 2022), Table 2 / text: P8-P16, z_dim 32
    "rotation_cc": 0.86,
    "mnist_n_acc": 0.777,
    "mnist_u_acc": 0.712,
    "spatial_vae_n_acc": 0.371,
    "spatial_vae_u_acc": 0.282,
}


# ---------------------------------------------------------------------------------- running


def cli(*args: str, log: Path | None = None) -> tuple[str, float]:
    """Run ``tvae-em ARGS`` in a child process; (stdout, wall seconds). Raises on failure."""
    cmd = [sys.executable, "-m", "tvae_em.cli", *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ tvae-em {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr[-4000:]}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"tvae-em {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, seconds


@dataclass
class Pipeline:
    """One validation run: folders, the commands it ran and their timings."""

    name: str
    work: Path
    commands: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.work / "commands.log"

    def run(self, step: str, *args: str) -> str:
        """Run one CLI step, remembering the command line and its wall time."""
        self.commands.append("tvae-em " + " ".join(map(str, args)))
        out, seconds = cli(*args, log=self.log)
        self.timings[step] = self.timings.get(step, 0.0) + seconds
        return out


def train_stats(run_dir: Path) -> dict[str, float]:
    """Training seconds (sum over epochs), particles/s and final loss from the run's metrics.csv."""
    m = pd.read_csv(run_dir / "metrics.csv")
    n = json.loads((run_dir / "config.json").read_text())["n_particles"]
    seconds = float(m["seconds"].sum())
    return {
        "train_seconds": seconds,
        "epochs_done": int(m["epoch"].iloc[-1]),
        "train_particles_per_s": n * len(m) / seconds if seconds > 0 else float("nan"),
        "final_loss": float(m["loss"].iloc[-1]),
    }


# ---------------------------------------------------------------------------------- scoring


def rotation_scores(pred: np.ndarray, true: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Circular correlation of predicted vs true angles (rad): overall, per true class, class mean.

    Each class's canonical frame is arbitrary, so its predictions are offset by a per-class
    constant; the circular correlation within a class is invariant to that offset.
    """
    per_class = {}
    for c in np.unique(labels):
        sel = labels == c
        if sel.sum() >= 3:
            per_class[int(c)] = circular_correlation(pred[sel], true[sel])
    vals = [v for v in per_class.values() if not math.isnan(v)]
    return {
        "rot_cc": circular_correlation(pred, true),
        "rot_cc_class": per_class,
        "rot_cc_class_mean": float(np.mean(vals)) if vals else float("nan"),
    }


def score_embedding(
    emb: dict[str, np.ndarray],
    truth: pd.DataFrame,
    k: int,
    unrotated: dict[str, np.ndarray] | None = None,
    restarts: int = KMEANS_RESTARTS,
    seed: int = 0,
) -> dict[str, object]:
    """The paper's metrics for one embed .npz (as a dict) against truth.csv (same particle order).

    unrotated: the embedding of the same digits before their pose (MNIST): the rotation score is
    then the paper's, on pred(rotated) - pred(unrotated).
    """
    labels = truth["class"].to_numpy()
    true_theta = truth["theta_rad"].to_numpy()
    true_t = truth[["tx_px", "ty_px"]].to_numpy()
    if len(emb["theta_rad"]) != len(truth):
        raise ValueError(f"{len(emb['theta_rad'])} embedded particles but {len(truth)} in truth")
    pred = np.asarray(emb["theta_rad"], dtype=np.float64)
    out: dict[str, object] = {"n": len(truth), "k": k}
    out.update(rotation_scores(pred, true_theta, labels))
    out.update(angle_error_summary(angle_errors(pred, true_theta, labels)))
    if unrotated is not None:
        rel = pred - np.asarray(unrotated["theta_rad"], dtype=np.float64)
        paper = rotation_scores(rel, true_theta, labels)
        out["rot_cc_raw"] = out["rot_cc"]
        out["rot_cc_class_raw"] = out["rot_cc_class_mean"]
        out.update(paper)
    rx, ry = shift_correlation(np.asarray(emb["shift_px"]), true_t)
    out.update(shift_r_x=rx, shift_r_y=ry)
    z_mu, z_sd = np.asarray(emb["z_mu"]), np.asarray(emb["z_sd"])
    kmeans_labels = None
    if k > 1:
        out["acc"] = cluster_embedding_accuracy(z_mu, labels, k, n_init=restarts, seed=seed)
        out["acc_mu_sd"] = cluster_embedding_accuracy(
            np.concatenate([z_mu, z_sd], 1), labels, k, n_init=restarts, seed=seed
        )
        from tvae_em.clustering import kmeans

        kmeans_labels = kmeans(z_mu, k, n_init=restarts, seed=seed)
    out["chance_acc"] = float(np.bincount(labels).max() / len(labels))
    out["_kmeans_labels"] = kmeans_labels
    return out


def class_average_scores(
    star: Path,
    emb: dict[str, np.ndarray],
    truth: pd.DataFrame,
    templates_mrcs: Path,
    kmeans_labels: np.ndarray | None,
) -> dict[str, float]:
    """Correlation of pose-aligned class averages with the true (CTF-free) templates.

    Averages of the embedded particles (phase-flipped when the star has defocus) aligned with the
    predicted poses, over true classes (pose accuracy alone: tc_true) and over k-means classes (what
    a user gets, matched one-to-one to templates: tc_kmeans); bounds: the true poses (tc_oracle)
    and random angles without shifts (tc_random). Templates are Fourier-resized to the box.
    """
    import mrcfile
    import torch

    from tvae_em.ctf import batch_ctf
    from tvae_em.data import Normalisation
    from tvae_em.fourier import fourier_resize
    from tvae_em.generate import class_averages
    from tvae_em.io import ParticleStack

    stack = ParticleStack.open(str(star))
    with mrcfile.open(templates_mrcs, permissive=True) as m:
        templates = np.array(m.data, dtype=np.float32)
    sim_box = templates.shape[-1]
    if templates.shape[-1] != stack.box:
        templates = fourier_resize(templates, stack.box)
    params = stack.ctf_params()
    flip = None
    if params is not None:
        apix = stack.apix

        def flip(idx: np.ndarray) -> torch.Tensor:
            return batch_ctf(params, apix, idx, stack.box)

    theta, t = np.asarray(emb["theta_rad"]), np.asarray(emb["shift_px"])
    true_labels = truth["class"].to_numpy()
    scale = stack.box / sim_box  # the truth is in pixels of the simulated (template) box
    true_pose = (truth["theta_rad"].to_numpy(), truth[["tx_px", "ty_px"]].to_numpy() * scale)
    rng = np.random.default_rng(0)
    no_pose = (rng.uniform(-np.pi, np.pi, len(theta)), np.zeros_like(t))  # the floor
    sets = {
        "tc_oracle": (true_labels, *true_pose),
        "tc_random": (true_labels, *no_pose),
        "tc_true": (true_labels, theta, t),
    }
    if kmeans_labels is not None:
        sets["tc_kmeans"] = (kmeans_labels, theta, t)
    out = {}
    for key, (labels, th, tt) in sets.items():
        k = int(labels.max()) + 1
        avg, _ = class_averages(stack, Normalisation(), th, tt, labels, k, flip_for=flip)
        cc = template_correlation(avg, templates, one_to_one=True)
        out[key] = float(np.nanmean(cc))
    return out


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        out = {k: d[k] for k in d.files}
    out.setdefault("shift_px", out["t_px"])  # embedded before re-centring: the template frame
    return out


# ---------------------------------------------------------------------------------- suites


def _variant(opts: dict) -> str:
    """The part of a run's name that tells renderer and tagged variants apart."""
    out = "" if opts.get("renderer", "auto") == "auto" else f"_{opts['renderer']}"
    return out + (f"_{opts['tag']}" if opts.get("tag") else "")


def train_args(opts: dict) -> list[str]:
    """`tvae-em train` options shared by all suites."""
    args = [
        "--z-dim", opts["z_dim"], "--rotations", opts["rotations"], "--epochs", opts["epochs"],
        "--batch-size", opts["batch_size"], "--lr", opts["lr"], "--seed", opts["seed"],
        "--device", opts["device"], "--checkpoint-every", opts["epochs"],
    ]  # fmt: skip
    if opts.get("pixel_fraction") is not None:
        args += ["--pixel-fraction", opts["pixel_fraction"]]
    if opts.get("renderer", "auto") != "auto":
        args += ["--renderer", opts["renderer"]]
    args += (opts.get("train_extra") or "").split()
    return [str(a) for a in args]


def run_pipeline(
    pipe: Pipeline,
    star: Path,
    truth_csv: Path,
    k: int,
    opts: dict,
    train_extra: list[str] = (),
    templates: Path | None = None,
    unrotated_star: Path | None = None,
) -> dict[str, object]:
    """train + embed (+ embed of the unrotated set) + scores; the result row."""
    pipe.run("train", "train", star, "-o", pipe.work / "run", *train_args(opts), *train_extra)
    return embed_and_score(pipe, star, truth_csv, k, opts, templates, unrotated_star)


def embed_and_score(
    pipe: Pipeline,
    star: Path,
    truth_csv: Path,
    k: int,
    opts: dict,
    templates: Path | None = None,
    unrotated_star: Path | None = None,
) -> dict[str, object]:
    """embed (+ embed of the unrotated set) with the trained pipe.work/run + scores: the row."""
    run_dir = pipe.work / "run"
    emb_star = pipe.work / "embedded.star"
    pipe.run("embed", "embed", run_dir, star, "-o", emb_star, "--no-elbo", "--device",
             opts["device"])  # fmt: skip
    if unrotated_star is not None:
        u_star = pipe.work / "embedded_unrotated.star"
        pipe.run("embed", "embed", run_dir, unrotated_star, "-o", u_star, "--no-elbo",
                 "--device", opts["device"])  # fmt: skip
    t0 = time.perf_counter()
    inputs = {"star": star, "truth": truth_csv, "k": k, "templates": templates}
    scores = score_run(pipe.work, inputs, seed=opts["seed"])
    pipe.timings["score"] = time.perf_counter() - t0
    row = {"name": pipe.name, **scores, **train_stats(run_dir)}
    row.update(
        inputs={k_: str(v) if isinstance(v, Path) else v for k_, v in inputs.items()},
        work=str(pipe.work),
        options={k_: v for k_, v in opts.items() if k_ not in ("results", "work")},
        commands=pipe.commands,
        wall_seconds=pipe.timings,
        machine=machine(),
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    return row


def score_run(work: Path, inputs: dict, seed: int = 0) -> dict[str, object]:
    """Scores of a finished run folder: work/embedded.npz (+ work/embedded_unrotated.npz) against
    inputs["truth"]; class averages of inputs["star"] when inputs["templates"] exists."""
    emb = load_npz(work / "embedded.npz")
    u_npz = work / "embedded_unrotated.npz"
    unrot = load_npz(u_npz) if u_npz.is_file() else None
    truth = pd.read_csv(inputs["truth"])
    scores = score_embedding(emb, truth, int(inputs["k"]), unrot, seed=seed)
    km = scores.pop("_kmeans_labels")
    templates = inputs.get("templates")
    if templates is not None and Path(templates).is_file():
        scores.update(class_average_scores(Path(inputs["star"]), emb, truth, Path(templates), km))
    return scores


def mnist_suite(opts: dict) -> dict[str, object]:
    """MNIST(N)/(U): simulate, write the same digits unrotated, train, embed both, score."""
    from tvae_em.synthetic import load_mnist, mnist_rotated, write_dataset

    mode, n = opts["mode"], opts["n"]
    name = f"mnist-{mode}_z{opts['z_dim']}_P{opts['rotations']}_n{n}_e{opts['epochs']}"
    pipe = _pipeline(name, opts)
    data = pipe.work / "data"
    pipe.run("simulate", "simulate", f"mnist-{mode.lower()}", "-o", data, "--n", n,
             "--mnist-dir", opts["mnist_dir"], "--seed", opts["seed"])  # fmt: skip
    # The same digits before their pose (the paper subtracts the prediction on them). Rebuilt
    # with build_dataset's arguments and checked against the stack the CLI wrote.
    digits, labels = load_mnist(opts["mnist_dir"])
    images, truth = mnist_rotated(digits[:n], labels[:n], mode, 50, 2.0, opts["seed"])
    _check_same_stack(data / "particles.mrcs", images)
    zeros = {"theta": np.zeros(n), "t": np.zeros((n, 2)), "label": truth["label"]}
    unrot = write_dataset(pipe.work / "unrotated", truth["unrotated"], zeros, apix=1.0)
    row = run_pipeline(
        pipe, data / "particles.star", data / "truth.csv", 10, opts,
        unrotated_star=unrot["star"],
    )  # fmt: skip
    row.update(suite="mnist", data=f"MNIST({mode}) 50x50, {n} digits")
    return row


def _check_same_stack(path: Path, images: np.ndarray) -> None:
    import mrcfile

    with mrcfile.open(path, permissive=True) as m:
        if not np.allclose(np.asarray(m.data), images, atol=1e-6):
            raise RuntimeError(f"{path}: the rebuilt digits differ from the simulated ones")


def particles_suite(opts: dict) -> dict[str, object]:
    """Projections of a volume at `views` fixed directions + CTF + noise -> preprocess -> score."""
    vol = opts["volume"]
    vol_name = "blob" if vol == "blob" else Path(vol).stem
    ctf_sim = "ctf" if opts["sim_ctf"] else "noctf"
    train_ctf = "--ctf" if opts["ctf"] else "--no-ctf"
    name = (
        f"particles-{vol_name}_snr{opts['snr']:g}_sim-{ctf_sim}_train{train_ctf}"
        f"_z{opts['z_dim']}_n{opts['n']}_e{opts['epochs']}_s{opts['seed']}{_variant(opts)}"
    )
    pipe = _pipeline(name, opts)
    data = pipe.work / "data"
    sim = ["simulate", "particles", "-o", data, "--n", opts["n"], "--snr", opts["snr"],
           "--views", opts["views"], "--seed", opts["seed"],
           "--apix", opts["sim_apix"]]  # fmt: skip
    if vol != "blob":
        sim += ["--volume", vol]
    else:
        sim += ["--box", opts["sim_box"]]
    if not opts["sim_ctf"]:
        sim += ["--no-ctf"]
    pipe.run("simulate", *sim)
    prep = pipe.work / "prep"
    pipe.run("preprocess", "preprocess", data / "particles.star", "-o", prep, "--size", opts["box"])
    row = run_pipeline(
        pipe, prep / "particles.star", data / "truth.csv", opts["views"], opts,
        train_extra=[train_ctf], templates=data / "templates.mrcs",
    )  # fmt: skip
    row.update(
        suite="particles",
        data=f"{vol_name} {opts['views']} views, SNR {opts['snr']:g}, "
        f"{'CTF 1-2.5 um' if opts['sim_ctf'] else 'no CTF'}, {opts['n']} x {opts['box']} px",
        train_ctf=bool(opts["ctf"]),
    )
    return row


def hinge_suite(opts: dict) -> dict[str, object]:
    """A flexible two-domain object (`simulate hinge`) + CTF + noise -> preprocess -> train ->
    embed; scores: |Spearman| of the hinge angle with the best z coordinate and with z's first
    principal component, and the angle error (one class)."""
    from tvae_em.metrics import latent_parameter_correlation

    name = (
        f"hinge{opts['hinge_max']:g}_snr{opts['snr']:g}_z{opts['z_dim']}_n{opts['n']}"
        f"_e{opts['epochs']}_s{opts['seed']}{_variant(opts)}"
    )
    pipe = _pipeline(name, opts)
    data, prep = pipe.work / "data", pipe.work / "prep"
    pipe.run("simulate", "simulate", "hinge", "-o", data, "--n", opts["n"], "--snr", opts["snr"],
             "--box", opts["sim_box"], "--hinge-max", opts["hinge_max"],
             "--seed", opts["seed"])  # fmt: skip
    pipe.run("preprocess", "preprocess", data / "particles.star", "-o", prep, "--size", opts["box"])
    row = run_pipeline(pipe, prep / "particles.star", data / "truth.csv", 1, opts)
    emb = load_npz(pipe.work / "embedded.npz")
    truth = pd.read_csv(data / "truth.csv")
    row.update(latent_parameter_correlation(emb["z_mu"], truth["hinge_deg"].to_numpy()))
    row.update(
        suite="hinge",
        data=f"hinge 0-{opts['hinge_max']:g} deg, SNR {opts['snr']:g}, CTF 1-2.5 um, "
        f"{opts['n']} x {opts['box']} px",
    )
    return row


def glyphs_suite(opts: dict) -> dict[str, object]:
    """Glyphs (letters F, L, P, ...), optionally noisy: simulate, train, embed, score."""
    snr = opts.get("snr")
    name = (
        f"glyphs_v{opts['views']}_snr{snr or 'inf'}_z{opts['z_dim']}_n{opts['n']}"
        f"_e{opts['epochs']}_s{opts['seed']}{_variant(opts)}"
    )
    pipe = _pipeline(name, opts)
    data = pipe.work / "data"
    sim = ["simulate", "glyphs", "-o", data, "--n", opts["n"], "--box", opts["box"],
           "--views", opts["views"], "--seed", opts["seed"]]  # fmt: skip
    if snr is not None:
        sim += ["--snr", snr]
    pipe.run("simulate", *sim)
    row = run_pipeline(
        pipe, data / "particles.star", data / "truth.csv", opts["views"], opts,
        templates=data / "templates.mrcs",
    )  # fmt: skip
    row.update(
        suite="glyphs", data=f"glyphs {opts['views']} classes, {opts['n']} x {opts['box']} px"
    )
    return row


def _pipeline(name: str, opts: dict) -> Pipeline:
    work = Path(opts["work"]) / name
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    return Pipeline(name, work)


def machine() -> str:
    """A short description of the machine the run used."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {gpu}"


# ---------------------------------------------------------------------------------- reporting

COLUMNS = [
    ("name", "run", "{}"),
    ("n", "n", "{}"),
    ("epochs_done", "epochs", "{}"),
    ("rot_cc", "rot cc", "{:.3f}"),
    ("rot_cc_class_mean", "rot cc/class", "{:.3f}"),
    ("shift_r_x", "shift r x", "{:.3f}"),
    ("shift_r_y", "shift r y", "{:.3f}"),
    ("angle_err_median_deg", "angle err deg", "{:.1f}"),
    ("angle_beyond_150", ">150 deg", "{:.1%}"),
    ("acc", "acc z", "{:.1%}"),
    ("acc_mu_sd", "acc [mu,sd]", "{:.1%}"),
    ("tc_oracle", "TC true poses", "{:.3f}"),
    ("tc_random", "TC random poses", "{:.3f}"),
    ("tc_true", "TC true cls", "{:.3f}"),
    ("tc_kmeans", "TC k-means", "{:.3f}"),
    ("rho_best", "|rho| best z", "{:.3f}"),
    ("rho_pc1", "|rho| z PC1", "{:.3f}"),
    ("rho_direction", "|rho| z direction", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("train_particles_per_s", "train p/s", "{:.1f}"),
]


def markdown_row(row: dict) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        v = row.get(key)
        cells.append(
            "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
        )
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join(" --- " for _ in COLUMNS) + "|"
    return "\n".join([head, sep, *(markdown_row(r) for r in rows)])


def save_row(row: dict, results: Path) -> Path:
    """Write NAME.json and NAME.md (one table row) into the results folder."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{row['name']}.json"
    path.write_text(json.dumps(row, indent=1, default=_json_default))
    (results / f"{row['name']}.md").write_text(markdown_row(row) + "\n")
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def load_rows(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


GPU_PROTOCOL = """\
# The paper's full protocol (Adam lr 2e-4, batch 100, up to 500 epochs, LR halved on plateaus),
# P8, on the 10,000 MNIST test digits, on one GPU:
for mode in n u; do
  tvae-em simulate mnist-$mode -o mnist_$mode --mnist-dir {mnist}
  for z in 2 32; do
    tvae-em train mnist_$mode/particles.star -o run_${{mode}}_z$z --z-dim $z --rotations 8 \\
        --epochs 500 --batch-size 100 --lr 2e-4 --device cuda --compile
    tvae-em embed run_${{mode}}_z$z mnist_$mode/particles.star -o emb_${{mode}}_z$z.star --no-elbo
  done
done
# or, with scoring (unrotated-digit subtraction, k-means x {restarts}, Hungarian):
for mode in N U; do for z in 2 32; do
  python benchmarks/validate.py --work /scratch/tvae-validate mnist --mode $mode --z-dim $z \\
      --n 10000 --epochs 500 --batch-size 100 --lr 2e-4 --device cuda
done; done
# issue 6's CTF comparison at full size (64 px, 2 A/px), 10,000 particles per set:
for snr in 0.1 0.05; do for c in --ctf --no-ctf; do
  python benchmarks/validate.py --work /scratch/tvae-validate particles --snr $snr $c \\
      --n 10000 --box 64 --epochs 200 --batch-size 100 --lr 2e-4 --pixel-fraction 1 --device cuda
done; done
python benchmarks/validate.py table"""


# ---------------------------------------------------------------------------------- CLI


def common(f):
    """Options every suite shares."""
    opts = [
        click.option("--z-dim", type=int, default=2, show_default=True),
        click.option("--rotations", type=int, default=8, show_default=True),
        click.option("--epochs", type=int, default=5, show_default=True),
        click.option("--batch-size", type=int, default=16, show_default=True),  # train's default
        click.option("--lr", type=float, default=1e-3, show_default=True),
        click.option("--pixel-fraction", type=float, default=None),
        click.option("--renderer", type=click.Choice(["auto", "real", "fourier"]), default="auto"),
        click.option("--train-extra", default="", help="More `tvae-em train` options, quoted."),
        click.option("--tag", default="", help="Suffix of the run's name (to compare variants)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group()
@click.option("--results", type=click.Path(file_okay=False), default=str(DEFAULT_WORK / "results"),
              show_default=True, help="Folder for the JSON/markdown rows.")  # fmt: skip
@click.option("--work", type=click.Path(file_okay=False), default=str(DEFAULT_WORK / "runs"),
              show_default=True, help="Folder for data sets and runs.")  # fmt: skip
@click.pass_context
def main(ctx: click.Context, results: str, work: str) -> None:
    """Score tvae-em against ground truth with the paper's metrics (runs the real CLI)."""
    ctx.obj = {"results": Path(results), "work": Path(work)}


def _finish(ctx: click.Context, row: dict) -> None:
    path = save_row(row, ctx.obj["results"])
    click.echo(markdown_table([row]))
    click.echo(f"-> {path}")


@main.command()
@click.option("--mode", type=click.Choice(["N", "U"]), required=True)
@click.option("--n", type=int, default=10000, show_default=True)
@click.option("--mnist-dir", type=click.Path(file_okay=False), default=str(MNIST_DIR))
@common
@click.pass_context
def mnist(ctx: click.Context, **opts) -> None:
    """The paper's MNIST(N)/(U) digits (50x50); rotation scored after unrotated subtraction."""
    _finish(ctx, mnist_suite({**ctx.obj, **opts}))


@main.command()
@click.option("--snr", type=float, default=0.1, show_default=True)
@click.option("--ctf/--no-ctf", default=True, show_default=True, help="CTF-aware training.")
@click.option("--sim-ctf/--sim-no-ctf", default=True, show_default=True,
              help="Simulate a per-particle CTF (defocus 1-2.5 um).")  # fmt: skip
@click.option("--volume", default=str(HAND_VOL), show_default=True,
              help="MRC density, or 'blob' for synthetic.blob_volume.")  # fmt: skip
@click.option("--views", type=int, default=3, show_default=True, help="Classes (directions).")
@click.option("--n", type=int, default=1000, show_default=True)
@click.option("--sim-apix", type=float, default=2.0, show_default=True,
              help="Pixel size (A) of the simulation (= the volume's voxel size).")  # fmt: skip
@click.option("--sim-box", type=int, default=64, show_default=True, help="Blob volume size.")
@click.option("--box", type=int, default=32, show_default=True, help="preprocess --size.")
@common
@click.pass_context
def particles(ctx: click.Context, **opts) -> None:
    """Simulated particles of hand-vol.mrc (or a blob volume), preprocessed to --box."""
    _finish(ctx, particles_suite({**ctx.obj, **opts}))


@main.command()
@click.option("--n", type=int, default=1000, show_default=True)
@click.option("--box", type=int, default=32, show_default=True)
@click.option("--views", type=int, default=3, show_default=True, help="Glyph classes (1-5).")
@click.option("--snr", type=float, default=None, help="Add noise at this SNR.")
@common
@click.pass_context
def glyphs(ctx: click.Context, **opts) -> None:
    """Asymmetric letters, uniform rotation, Gaussian shifts."""
    _finish(ctx, glyphs_suite({**ctx.obj, **opts}))


@main.command()
@click.option("--n", type=int, default=3000, show_default=True)
@click.option("--box", type=int, default=32, show_default=True)
@click.option("--sim-box", type=int, default=64, show_default=True)
@click.option("--snr", type=float, default=0.1, show_default=True)
@click.option("--hinge-max", type=float, default=60.0, show_default=True)
@common
@click.pass_context
def hinge(ctx: click.Context, **opts) -> None:
    """Continuous heterogeneity: does z carry the hinge angle of a flexible particle?"""
    _finish(ctx, hinge_suite({**ctx.obj, **opts}))


@main.command()
@click.pass_context
def table(ctx: click.Context) -> None:
    """Print every result row in the results folder as one markdown table."""
    rows = load_rows(ctx.obj["results"])
    click.echo(markdown_table(rows) if rows else f"no results in {ctx.obj['results']}")


@main.command()
@click.argument("names", nargs=-1)
@click.pass_context
def rescore(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Recompute the scores of finished runs (all, or NAMES) from their embed outputs."""
    results = ctx.obj["results"]
    rows = [r for r in load_rows(results) if not names or r["name"] in names]
    for row in rows:
        work = Path(row.get("work", ctx.obj["work"] / row["name"]))
        inputs = row.get("inputs") or _inferred_inputs(row, work)
        row.update(score_run(work, inputs, seed=row["options"]["seed"]), inputs=inputs)
        save_row(row, results)
    click.echo(markdown_table(rows))


def _inferred_inputs(row: dict, work: Path) -> dict:
    """Inputs of a row written before rows recorded them, from the suite's folder layout."""
    star = work / ("prep" if row["suite"] == "particles" else "data") / "particles.star"
    k = {"mnist": 10}.get(row["suite"], row["options"].get("views"))
    templates = work / "data" / "templates.mrcs"
    return {"star": str(star), "truth": str(work / "data" / "truth.csv"), "k": k,
            "templates": str(templates) if templates.is_file() else None}  # fmt: skip


@main.command("gpu-command")
def gpu_command() -> None:
    """Print the commands for the paper's full training protocol on a GPU."""
    click.echo(GPU_PROTOCOL.format(mnist=MNIST_DIR, restarts=KMEANS_RESTARTS))


if __name__ == "__main__":
    main()
