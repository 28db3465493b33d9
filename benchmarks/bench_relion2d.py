"""tvae-em against RELION 3.1's 2D classification on the same simulated particles, scored alike.

One command simulates a hard set (`tvae-em simulate particles --hard`: 3 look-alike blob volumes
x 2 views = 6 classes, 64 px at 2 A, CTF 1-2.5 um, known poses), preprocesses it to --box, then
runs `tvae-em train` (default options) + `tvae-em embed --classes K` and `relion_refine` 2D
classification with the RELION 3.1 GUI's Class2D defaults (K = the number of views), and scores
both from their own output stars with the same functions (tvae_em.metrics.pose_scores,
class_average_sharpness): class accuracy (Hungarian), angle error after one offset per true class,
shift error after re-centring each true class's frame, the sharpness of the noise-free particles
averaged with each method's poses and classes (correlation and FRC-0.5 with the true template),
and wall time. RELION is skipped, with a message, where relion_refine is not installed.

    python benchmarks/bench_relion2d.py --snr 0.1 --box 32 --n 3000 --epochs 5
    python benchmarks/bench_relion2d.py --snr 0.05 --box 64 --n 3000 --epochs 5
    python benchmarks/bench_relion2d.py --table          # every result so far, as markdown

Contrast: the simulation's particles are white (positive density times RELION's CTF, which is
positive at low frequency; tvae_em/ctf.py), which is what RELION expects, so RELION gets the
same preprocessed stack as tvae-em; --relion-invert gives it `preprocess --invert` instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate import Pipeline, _json_default, machine  # noqa: E402

from tvae_em.fourier import fourier_resize  # noqa: E402
from tvae_em.metrics import class_average_sharpness, pose_scores  # noqa: E402

DEFAULT_WORK = Path("/tmp/tvae-bench-relion2d")
DIAMETER_FRACTION = 0.85  # RELION's mask diameter: this fraction of the box


# ---------------------------------------------------------------------------------- reading


def poses_from_star(star: Path, n: int) -> dict[str, np.ndarray]:
    """theta (rad), t (n, 2) px and class (0-based) of particles 0..n-1 from a RELION 3.1 star,
    in the project's convention (geometry.relion_pose inverted: theta = -psi, t = -origin / apix).
    Rows are put in particle order by their rlnImageName index (RELION may reorder them)."""
    import starfile

    blocks = starfile.read(star, always_dict=True)
    parts, optics = blocks["particles"], blocks["optics"]
    apix_of = dict(zip(optics["rlnOpticsGroup"], optics["rlnImagePixelSize"], strict=True))
    apix = parts["rlnOpticsGroup"].map(apix_of).to_numpy(np.float64)
    index = parts["rlnImageName"].astype(str).str.split("@").str[0].astype(int).to_numpy() - 1
    if sorted(index) != list(range(n)):
        raise RuntimeError(f"{star}: expected particles 1..{n}, got {len(index)} rows")
    order = np.argsort(index)
    psi = parts["rlnAnglePsi"].to_numpy(np.float64)[order]
    origin = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)[order]
    return {
        "theta": -np.radians(psi),
        "t": -origin / apix[order, None],
        "class": parts["rlnClassNumber"].to_numpy(int)[order] - 1,
    }


def load_truth(data: Path, box: int) -> dict[str, np.ndarray]:
    """truth.csv and templates.mrcs of a simulation, scaled to the preprocessed box."""
    import mrcfile

    truth = pd.read_csv(data / "truth.csv")
    with mrcfile.open(data / "templates.mrcs", permissive=True) as m:
        templates = np.array(m.data, dtype=np.float32)
        sim_apix = float(m.voxel_size.x)
    sim_box = templates.shape[-1]
    return {
        "theta": truth["theta_rad"].to_numpy(),
        "t_sim": truth[["tx_px", "ty_px"]].to_numpy(),
        "t": truth[["tx_px", "ty_px"]].to_numpy() * box / sim_box,
        "class": truth["class"].to_numpy(),
        "templates_sim": templates,
        "templates": fourier_resize(templates, box) if box != sim_box else templates,
        "apix": sim_apix * sim_box / box,
    }


# ---------------------------------------------------------------------------------- scoring


def score_method(pred: dict[str, np.ndarray], truth: dict, clean: np.ndarray) -> dict[str, object]:
    """pose_scores + class_average_sharpness of one method's poses against the truth."""
    import torch

    from tvae_em.geometry import align_images

    out = pose_scores(
        pred["theta"], pred["t"], pred["class"], truth["theta"], truth["t"], truth["class"]
    )
    aligned = align_images(
        torch.from_numpy(clean),
        torch.from_numpy(np.asarray(pred["theta"])).float(),
        torch.from_numpy(np.asarray(pred["t"])).float(),
    ).numpy()
    out.update(class_average_sharpness(aligned, pred["class"], truth["templates"], truth["apix"]))
    return out


def clean_particles(truth: dict, box: int) -> np.ndarray:
    """The simulation's noise-free, CTF-free particles at the preprocessed box."""
    from tvae_em.synthetic import clean_images

    return clean_images(truth["templates_sim"], truth["theta"], truth["t_sim"], truth["class"], box)


# ---------------------------------------------------------------------------------- running


def relion_command(
    star: str, out: str, k: int, box: int, apix: float, j: int, seed: int, iters: int = 25
) -> list[str]:
    """relion_refine 2D classification as RELION 3.1's Class2D GUI writes it with its defaults
    (25 iterations, T = 2, in-plane sampling 6 deg, offsets 5 px range / 1 px step, both at
    oversampling 1, so --psi_step 12 and --offset_step 2), CTF on, mask DIAMETER_FRACTION x box."""
    diameter = round(DIAMETER_FRACTION * box * apix)
    return [
        "relion_refine", "--o", out, "--i", star, "--dont_combine_weights_via_disc",
        "--pool", "3", "--pad", "2", "--ctf", "--iter", str(iters), "--tau2_fudge", "2",
        "--particle_diameter", str(diameter), "--K", str(k), "--flatten_solvent",
        "--zero_mask", "--oversampling", "1", "--psi_step", "12", "--offset_range", "5",
        "--offset_step", "2", "--norm", "--scale", "--j", str(j), "--random_seed", str(seed),
    ]  # fmt: skip


def run_relion(pipe: Pipeline, prep: Path, k: int, box: int, apix: float, opts: dict) -> Path:
    """Run relion_refine in the preprocessed folder (RELION resolves image names from where it
    runs); the final iteration's _data.star."""
    out_dir = pipe.work / "relion"
    out_dir.mkdir()
    cmd = relion_command("particles.star", str(out_dir / "run"), k, box, apix, opts["relion_j"],
                         opts["seed"], opts["relion_iter"])  # fmt: skip
    pipe.commands.append(f"(cd {prep} && {' '.join(cmd)})")
    t0 = time.perf_counter()
    with open(out_dir / "relion.log", "w") as log:
        proc = subprocess.run(cmd, cwd=prep, stdout=log, stderr=subprocess.STDOUT)
    pipe.timings["relion"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"relion_refine failed ({proc.returncode}); see {out_dir}/relion.log")
    return out_dir / f"run_it{opts['relion_iter']:03d}_data.star"


K = 6  # simulate --hard: 3 volumes x 2 views


def run_name(opts: dict) -> str:
    return (
        f"hard_snr{opts['snr']:g}_box{opts['box']}_n{opts['n']}_e{opts['epochs']}_s{opts['seed']}"
    )


def benchmark(opts: dict) -> dict[str, object]:
    """Simulate, preprocess, run both tools (timings.json after each step), score both."""
    name = run_name(opts)
    work = Path(opts["work"]) / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    pipe = Pipeline(name, work)
    load = {"start": os.getloadavg()}

    def step(label: str, *args) -> None:
        pipe.run(label, *args)
        _save_timings(work, pipe, load)

    data, prep = work / "data", work / "prep"
    step("simulate", "simulate", "particles", "-o", data, "--hard", "--n", opts["n"],
         "--snr", opts["snr"], "--seed", opts["seed"])  # fmt: skip
    step("preprocess", "preprocess", data / "particles.star", "-o", prep, "--size", opts["box"])
    if not opts["skip_tvae"]:
        step("train", "train", prep / "particles.star", "-o", work / "run", "--epochs",
             opts["epochs"], "--seed", opts["seed"], *opts["train_extra"].split())  # fmt: skip
        step("embed", "embed", work / "run", prep / "particles.star", "-o", work / "embedded.star",
             "--classes", K, "--no-elbo", "--seed", opts["seed"])  # fmt: skip
    relion_prep = prep
    if opts["relion_invert"]:
        relion_prep = work / "prep_inverted"
        step("preprocess", "preprocess", data / "particles.star", "-o", relion_prep,
             "--size", opts["box"], "--invert")  # fmt: skip
    if opts["skip_relion"]:
        pass
    elif shutil.which("relion_refine") is None:
        click.echo("relion_refine not found on PATH: skipping RELION (apt-get install relion)")
    else:
        apix = 2.0 * 64 / opts["box"]  # the --hard preset's 2 A at 64 px, preprocessed to --box
        run_relion(pipe, relion_prep, K, opts["box"], apix, opts)
        _save_timings(work, pipe, load)
    load["end"] = os.getloadavg()
    _save_timings(work, pipe, load)
    return score_work(work, opts)


def _last_relion_star(work: Path) -> Path | None:
    """The last iteration's run_itNNN_data.star in relion*/ (a run stopped early: its last one)."""
    stars = sorted(work.glob("relion*/run_it[0-9][0-9][0-9]_data.star"), key=lambda p: p.name)
    return stars[-1] if stars else None


def _save_timings(work: Path, pipe: Pipeline, load: dict) -> None:
    info = {"wall_seconds": pipe.timings, "commands": pipe.commands, "load_average": load}
    (work / "timings.json").write_text(json.dumps(info, indent=1))


def score_work(work: Path, opts: dict) -> dict[str, object]:
    """Score whatever a run folder holds: embedded.star (tvae-em) and the last RELION
    iteration's _data.star (relion/, or another relion*/ folder), plus the true poses."""
    info = json.loads((work / "timings.json").read_text())
    times = info["wall_seconds"]
    truth = load_truth(work / "data", opts["box"])
    clean = clean_particles(truth, opts["box"])
    tools: dict[str, object] = {}
    emb = work / "embedded.star"
    if emb.is_file():
        tools["tvae-em"] = score_method(poses_from_star(emb, opts["n"]), truth, clean)
        tools["tvae-em"]["wall_s"] = times.get("train", math.nan) + times.get("embed", math.nan)
    star = _last_relion_star(work)
    if star is not None:
        tools["relion"] = score_method(poses_from_star(star, opts["n"]), truth, clean)
        tools["relion"]["wall_s"] = times.get("relion", math.nan)
        tools["relion"].update(star=str(star), iterations=int(star.name[6:9]))
    elif shutil.which("relion_refine") is None:
        tools["relion"] = {"skipped": "relion_refine not installed"}
    oracle = {"theta": truth["theta"], "t": truth["t"], "class": truth["class"]}
    tools["true poses"] = score_method(oracle, truth, clean)
    views = pd.read_csv(work / "data" / "views.csv")
    return {
        "name": work.name,
        "data": f"hard: 3 look-alike volumes x 2 views, SNR {opts['snr']:g}, CTF 1-2.5 um, "
        f"{opts['n']} particles, 64 px -> {opts['box']} px",
        "max_view_cc": float(views["max_cc"].max()),
        "tools": tools,
        "options": {k_: v for k_, v in opts.items() if k_ not in ("work", "results")},
        **info,
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---------------------------------------------------------------------------------- reporting

COLUMNS = [
    ("class_acc", "class acc", "{:.1%}"),
    ("angle_err_median_deg", "angle err median", "{:.1f}"),
    ("angle_within_3", "<= 3 deg", "{:.1%}"),
    ("angle_within_10", "<= 10 deg", "{:.1%}"),
    ("angle_beyond_150", "> 150 deg", "{:.1%}"),
    ("shift_err_median_px", "shift err px (re-centred)", "{:.2f}"),
    ("shift_within_1px", "<= 1 px", "{:.1%}"),
    ("shift_err_raw_median_px", "shift err px (raw)", "{:.2f}"),
    ("avg_cc_mean", "avg cc", "{:.3f}"),
    ("avg_frc05_median_A", "avg FRC-0.5 A", "{:.1f}"),
    ("wall_s", "wall s", "{:.0f}"),
]


def markdown_rows(result: dict) -> list[str]:
    """One markdown table row per tool of one result."""
    rows = []
    for tool, scores in result["tools"].items():
        if "skipped" in scores:
            continue
        iters = scores.get("iterations")
        partial = f" ({iters} it)" if iters is not None and iters != 25 else ""
        cells = [result["name"], tool + partial]
        for key, _, fmt in COLUMNS:
            v = scores.get(key)
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            cells.append("-" if missing else fmt.format(v))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown_table(results: list[dict]) -> str:
    head = ["run", "tool", *(c[1] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in results:
        lines += markdown_rows(r)
    return "\n".join(lines)


def save(result: dict, results: Path) -> Path:
    """NAME.json and NAME.md (its table rows) in the results folder."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default))
    (results / f"{result['name']}.md").write_text("\n".join(markdown_rows(result)) + "\n")
    return path


@click.command()
@click.option("--snr", type=float, default=0.1, show_default=True)
@click.option("--box", type=int, default=32, show_default=True, help="preprocess --size.")
@click.option("--n", type=int, default=3000, show_default=True, help="Particles.")
@click.option("--epochs", type=int, default=5, show_default=True, help="tvae-em train --epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--relion-j", type=int, default=2, show_default=True, help="relion_refine --j.")
@click.option("--relion-iter", type=int, default=25, show_default=True,
              help="relion_refine --iter (the GUI's 25; fewer only for a smoke test).")  # fmt: skip
@click.option("--relion-invert", is_flag=True, help="Give RELION `preprocess --invert` particles.")
@click.option("--train-extra", default="", help="More `tvae-em train` options, quoted.")
@click.option("--skip-tvae", is_flag=True, help="Run RELION only.")
@click.option("--skip-relion", is_flag=True, help="Run tvae-em only.")
@click.option("--work", type=click.Path(file_okay=False), default=str(DEFAULT_WORK / "runs"),
              show_default=True)  # fmt: skip
@click.option("--results", type=click.Path(file_okay=False),
              default=str(DEFAULT_WORK / "results"), show_default=True)  # fmt: skip
@click.option("--table", is_flag=True, help="Print every result so far as one table and stop.")
@click.option("--rescore", is_flag=True, help="Score the finished run folder of these options.")
def main(table: bool, rescore: bool, **opts) -> None:
    """tvae-em vs RELION 3.1 Class2D on one simulated hard set, scored the same way."""
    results = Path(opts["results"])
    if table:
        rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
        click.echo(markdown_table(rows) if rows else f"no results in {results}")
        return
    result = score_work(Path(opts["work"]) / run_name(opts), opts) if rescore else benchmark(opts)
    path = save(result, results)
    click.echo(markdown_table([result]))
    click.echo(f"-> {path}")


if __name__ == "__main__":
    main()
