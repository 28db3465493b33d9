"""The bad-input suite: every bad input to preprocess, train, embed, select and generate gets
exit code 2, one `Error:` line naming the file, particle or option, no traceback, and leaves
nothing behind.

Each row of CASES builds its input in the test's own folder (or uses the shared inputs of the
`world` fixture), runs the command line and checks the message and that no file anywhere was
created, changed or removed (hidden temporary files included). Rows marked ISSUE are the cases
of issue 13; the others were handled before and are kept here so the suite is complete.
Reliability tests that are not bad input (resume from another folder, stale locks and temporary
files, interrupted outputs) follow the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL, make_run_folder, write_particle_set

from tvae_em.cli import main
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.io import read_star, write_star
from tvae_em.run import RunFolder, RunLock
from tvae_em.synthetic import glyphs
from tvae_em.training import TrainOptions, train

BOX = 16
N = 24


# ---- inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Shared, never modified inputs: a good glyph star, a trained run, an untrained run, an
    embedding of the good star."""
    root = tmp_path_factory.mktemp("world")
    images, _ = glyphs(N, box=BOX, seed=1, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(root / "good", images, apix=2.0)
    trained = root / "trained"
    opts = TrainOptions(
        input=str(star),
        out_dir=str(trained),
        epochs=2,
        batch_size=8,
        seed=3,
        model_overrides=dict(TINY_MODEL),
    )
    train(opts, log=lambda m: None)
    run = make_run_folder(root / "run", BOX)
    embed_particles(EmbedOptions(run, star, root / "emb" / "e.star"))
    return {"root": root, "star": star, "trained": trained, "run": run, "npz": root / "emb/e.npz"}


def bad_pixels(folder: Path, value: float = np.nan, which: list[int] | None = None) -> Path:
    """A star of N glyphs where particles ``which`` (0-based; default: particle 3) have one
    pixel ``value``."""
    images, _ = glyphs(N, box=BOX, seed=1, n_classes=2, t_sd_px=1.0)
    for i in which if which is not None else [2]:
        images[i, 5, 7] = value
    return write_particle_set(folder, images, apix=2.0)


def edited_star(folder: Path, particles: dict | None = None, optics: dict | None = None) -> Path:
    """The good glyph star with some particle (or optics) columns replaced by ``values``."""
    images, _ = glyphs(N, box=BOX, seed=1, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(folder, images, apix=2.0)
    blocks = read_star(star)
    for block, changes in (("particles", particles), ("optics", optics)):
        for column, values in (changes or {}).items():
            blocks[block][column] = values
    write_star(star, blocks)
    return star


def duplicated_column(folder: Path) -> Path:
    """The good glyph star with rlnOpticsGroup given twice in data_particles."""
    images, _ = glyphs(N, box=BOX, seed=1, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(folder, images, apix=2.0)
    lines, out, in_particles = star.read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("data_particles"):
            in_particles = True
        if in_particles and line.startswith("_rlnOpticsGroup"):
            out += [line, "_rlnOpticsGroup #3"]
        elif in_particles and "@" in line:
            out.append(line + "\t1")
        else:
            out.append(line)
    star.write_text("\n".join(out) + "\n")
    return star


def column_values(value: str, at: int = 2) -> list[str]:
    """N values of a column: a good number everywhere but ``value`` in particle at + 1."""
    values = ["12000"] * N
    values[at] = value
    return values


def copy_run(world, tmp: Path, name: str = "trained") -> Path:
    """A private copy of a shared run folder (to damage)."""
    return Path(shutil.copytree(world[name], tmp / name))


def flip_bytes(path: Path, n: int = 200) -> None:
    """Invert n bytes in the middle of a file (same size)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for k in range(start, start + n):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def hold_lock(run: Path, stack: ExitStack) -> None:
    """Hold the run folder's lock as another train session would, until the test ends."""
    lock = RunLock(run / ".lock")
    lock.acquire()
    stack.callback(lock.release)


def embedding_with_nan_rows(world, tmp: Path) -> Path:
    data = dict(np.load(world["npz"]))
    data["z_mu"] = data["z_mu"].copy()
    data["z_mu"][[1, 4]] = np.nan
    np.savez(tmp / "nan.npz", **data)
    return tmp / "nan.npz"


# ---- the table -----------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input: ``args(world, tmp, stack)`` builds it and returns the command line."""

    args: Callable[[dict, Path, ExitStack], list]
    message: str  # regex the Error: line must match
    issue: bool = True  # a case of issue 13 (failed before it was fixed)


def TRAIN(world, tmp, *extra, star=None):
    star = star if star is not None else world["star"]
    return ["train", star, "-o", tmp / "run", "--epochs", "1", "--batch-size", "8", *extra]


CASES: dict[str, Case] = {
    # preprocess ------------------------------------------------------------------------------
    "preprocess all particles NaN": Case(
        lambda w, t, s: ["preprocess", bad_pixels(t / "in", which=list(range(N))), "-o", t / "o"],
        r"particle 1 \(image 1 of .*particles\.mrcs\) has NaN pixels; use --skip-bad",
    ),
    "preprocess all particles NaN, --skip-bad": Case(
        lambda w, t, s: [
            "preprocess",
            bad_pixels(t / "in", which=list(range(N))),
            "-o",
            t / "o",
            "--skip-bad",
        ],
        r"no usable particles in .*particles\.star: all 24 are bad",
    ),
    "preprocess duplicated column": Case(
        lambda w, t, s: ["preprocess", duplicated_column(t / "in"), "-o", t / "o"],
        r"particles\.star: column rlnOpticsGroup appears more than once in data_particles",
    ),
    "preprocess rlnImagePixelSize 0": Case(
        lambda w, t, s: [
            "preprocess",
            edited_star(t / "in", optics={"rlnImagePixelSize": [0.0]}),
            "-o",
            t / "o",
        ],
        r"particle 1 of .*particles\.star: its optics group has rlnImagePixelSize 0(\.0)?, not a "
        r"positive pixel size",
    ),
    "preprocess rlnImagePixelSize negative": Case(
        lambda w, t, s: [
            "preprocess",
            edited_star(t / "in", optics={"rlnImagePixelSize": [-2.0]}),
            "-o",
            t / "o",
        ],
        r"particle 1 of .*particles\.star: .*rlnImagePixelSize -2(\.0)?, not a positive pixel size",
    ),
    "preprocess rlnImagePixelSize nan": Case(
        lambda w, t, s: [
            "preprocess",
            edited_star(t / "in", optics={"rlnImagePixelSize": [np.nan]}),
            "-o",
            t / "o",
        ],
        r"particle 1 of .*particles\.star: .*rlnImagePixelSize nan, not a positive pixel size",
    ),
    "preprocess RELION 3.0 rlnImagePixelSize 0 in particle 5": Case(
        lambda w, t, s: ["preprocess", relion30_star(t / "in", bad_at=4), "-o", t / "o"],
        r"particle 5 of .*p30\.star: has rlnImagePixelSize 0(\.0)?, not a positive pixel size",
    ),
    "preprocess rlnDefocusU abc": Case(
        lambda w, t, s: [
            "preprocess",
            edited_star(t / "in", particles={"rlnDefocusU": column_values("abc")}),
            "-o",
            t / "o",
        ],
        r"particle 3 of .*particles\.star: rlnDefocusU is abc, not a finite number",
    ),
    "preprocess rlnDefocusU nan": Case(
        lambda w, t, s: [
            "preprocess",
            edited_star(t / "in", particles={"rlnDefocusU": column_values("nan", at=6)}),
            "-o",
            t / "o",
        ],
        r"particle 7 of .*particles\.star: rlnDefocusU is nan, not a finite number",
    ),
    "preprocess rlnOpticsGroup abc in particle 3": Case(
        lambda w, t, s: [
            "preprocess",
            edited_star(t / "in", particles={"rlnOpticsGroup": ["1", "1", "abc"] + ["1"] * 21}),
            "-o",
            t / "o",
        ],
        r"particle 3 of .*particles\.star: rlnOpticsGroup is abc, not a number",
    ),
    "preprocess text file as .cs": Case(
        lambda w, t, s: ["preprocess", text_file(t / "p.cs"), "-o", t / "o"],
        r"cannot read cryoSPARC file .*p\.cs: it is not a numpy array file",
    ),
    "preprocess missing star": Case(
        lambda w, t, s: ["preprocess", t / "missing.star", "-o", t / "o"],
        r"input file not found: .*missing\.star",
        issue=False,
    ),
    "preprocess --size 9": Case(
        lambda w, t, s: ["preprocess", w["star"], "-o", t / "o", "--size", "9"],
        r"--size 9 must be a positive even number",
        issue=False,
    ),
    "preprocess output under a file": Case(
        lambda w, t, s: ["preprocess", w["star"], "-o", text_file(t / "afile") / "out"],
        r"output folder .*afile/out",
        issue=False,
    ),
    # train -----------------------------------------------------------------------------------
    "train --z-dim 0": Case(lambda w, t, s: TRAIN(w, t, "--z-dim", "0"), r"--z-dim must be >= 1"),
    "train --rotations 3": Case(lambda w, t, s: TRAIN(w, t, "--rotations", "3"), r"--rotations"),
    "train --t-sd abc": Case(lambda w, t, s: TRAIN(w, t, "--t-sd", "abc"), r"--t-sd abc"),
    "train --tau 0": Case(lambda w, t, s: TRAIN(w, t, "--tau", "0"), r"--tau 0\.0: must be"),
    "train --checkpoint-every 0": Case(
        lambda w, t, s: TRAIN(w, t, "--checkpoint-every", "0"), r"--checkpoint-every 0: must be"
    ),
    "train --num-workers -1": Case(
        lambda w, t, s: TRAIN(w, t, "--num-workers", "-1"), r"--num-workers -1: must be 0 or more"
    ),
    "train --lr nan": Case(lambda w, t, s: TRAIN(w, t, "--lr", "nan"), r"--lr nan: must be"),
    "train --seed -1": Case(lambda w, t, s: TRAIN(w, t, "--seed", "-1"), r"--seed -1: must be"),
    "train NaN pixel": Case(
        lambda w, t, s: TRAIN(w, t, star=bad_pixels(t / "in")),
        r"particle 3 \(image 3 of .*particles\.mrcs\) has NaN pixels; drop such particles",
    ),
    "train Inf pixel": Case(
        lambda w, t, s: TRAIN(w, t, star=bad_pixels(t / "in", np.inf, [9])),
        r"particle 10 \(image 10 of .*particles\.mrcs\) has Inf pixels",
    ),
    "train rlnImagePixelSize 0": Case(
        lambda w, t, s: TRAIN(w, t, star=edited_star(t / "in", optics={"rlnImagePixelSize": [0]})),
        r"particle 1 of .*particles\.star: .*rlnImagePixelSize 0, not a positive pixel size",
    ),
    "train on a folder another train is writing": Case(
        lambda w, t, s: (t / "run").mkdir() or hold_lock(t / "run", s) or TRAIN(w, t),
        r"run: another tvae-em train is writing there \(pid \d+ on .*\)",
    ),
    "train --resume while another resume runs": Case(
        lambda w, t, s: hold_lock(copy_run(w, t), s) or ["train", "--resume", t / "trained"],
        r"trained: another tvae-em train is writing there \(pid \d+ on ",
    ),
    "train --resume --epochs lower than done": Case(
        lambda w, t, s: ["train", "--resume", copy_run(w, t), "--epochs", "1"],
        r"--epochs 1: the run has already trained 2 epochs; give --epochs larger than 2",
    ),
    "train --resume truncated config.json": Case(
        lambda w, t, s: ["train", "--resume", truncate(copy_run(w, t) / "config.json").parent],
        r"config\.json: not a readable config\.json \(JSONDecodeError",
    ),
    "train --resume garbage line in metrics.csv": Case(
        lambda w, t, s: ["train", "--resume", garbage_metrics(copy_run(w, t)), "--epochs", "3"],
        r"metrics\.csv: line 3 is not a row of epoch metrics",
    ),
    "train --resume flipped bytes in last.pt": Case(
        lambda w, t, s: ["train", "--resume", damaged_run(w, t), "--epochs", "3"],
        r"last\.pt: damaged checkpoint \(its sha256 differs from last\.pt\.sha256\)",
    ),
    "train missing input": Case(
        lambda w, t, s: ["train", t / "missing.star", "-o", t / "run"],
        r"input file not found: .*missing\.star",
        issue=False,
    ),
    "train --batch-size 1000": Case(
        lambda w, t, s: TRAIN(w, t, "--batch-size", "1000"), r"--batch-size 1000", issue=False
    ),
    "train --device tpu": Case(
        lambda w, t, s: TRAIN(w, t, "--device", "tpu"), r"--device tpu", issue=False
    ),
    "train --epochs 0": Case(
        lambda w, t, s: TRAIN(w, t, "--epochs", "0"), r"--epochs 0: must be at least 1", issue=False
    ),
    "train --resume --z-dim 3 (changed option)": Case(
        lambda w, t, s: ["train", "--resume", copy_run(w, t), "--z-dim", "3"],
        r"option z_dim=3 differs from the run's 2",
        issue=False,
    ),
    "train -o a trained run": Case(
        lambda w, t, s: [*TRAIN(w, t)[:3], copy_run(w, t), *TRAIN(w, t)[4:]],
        r"already holds a trained run; use --resume",
        issue=False,
    ),
    "train --resume a missing folder": Case(
        lambda w, t, s: ["train", "--resume", t / "nowhere"],
        r"nowhere: no config\.json there",
        issue=False,
    ),
    # embed -----------------------------------------------------------------------------------
    "embed duplicated column": Case(
        lambda w, t, s: ["embed", w["run"], duplicated_column(t / "in"), "-o", t / "e.star"],
        r"column rlnOpticsGroup appears more than once in data_particles",
    ),
    "embed NaN pixel --classes 2": Case(
        lambda w, t, s: [
            "embed",
            w["run"],
            bad_pixels(t / "in", which=[20]),
            "-o",
            t / "out" / "e.star",
            "--classes",
            "2",
        ],
        r"particle 21 \(image 21 of .*particles\.mrcs\) has NaN pixels",
    ),
    "embed rlnDefocusU abc": Case(
        lambda w, t, s: [
            "embed",
            w["run"],
            edited_star(t / "in", particles={"rlnDefocusU": column_values("abc", at=4)}),
            "-o",
            t / "e.star",
        ],
        r"particle 5 of .*particles\.star: rlnDefocusU is abc",
    ),
    "embed flipped bytes in last.pt": Case(
        lambda w, t, s: ["embed", damaged_run(w, t, "run"), w["star"], "-o", t / "e.star"],
        r"last\.pt: damaged checkpoint",
    ),
    "embed --checkpoint best without best.pt": Case(
        lambda w, t, s: [
            "embed",
            w["run"],
            w["star"],
            "-o",
            t / "e.star",
            "--checkpoint",
            "best",
        ],
        r"--checkpoint best: .*run has no checkpoints/best\.pt \(only checkpoints/last\.pt: use "
        r"--checkpoint last\)",
    ),
    "embed --num-workers -1": Case(
        lambda w, t, s: ["embed", w["run"], w["star"], "-o", t / "e.star", "--num-workers", "-1"],
        r"--num-workers -1: must be 0 or more",
    ),
    "embed --classes 0": Case(
        lambda w, t, s: ["embed", w["run"], w["star"], "-o", t / "e.star", "--classes", "0"],
        r"--classes 0: must be between 1 and the 24 particles",
        issue=False,
    ),
    "embed -o .txt": Case(
        lambda w, t, s: ["embed", w["run"], w["star"], "-o", t / "e.txt"],
        r"-o .*e\.txt: the file name must end in \.star",
        issue=False,
    ),
    "embed --class2d without --classes": Case(
        lambda w, t, s: ["embed", w["run"], w["star"], "-o", t / "e.star", "--class2d", t / "c/r"],
        r"--class2d .*c/r: needs --classes K",
        issue=False,
    ),
    # select ----------------------------------------------------------------------------------
    "select --classes on a star without classes": Case(
        lambda w, t, s: [
            "select",
            w["npz"].with_suffix(".star"),
            "-o",
            t / "s.star",
            "--classes",
            "1",
        ],
        r"--classes: .*e\.star has no rlnClassNumber column \(embed with --classes K\)",
        issue=False,
    ),
    "select a star embed did not write": Case(
        lambda w, t, s: ["select", w["star"], "-o", t / "s.star"],
        r"particles\.star: no rlnAnglePsi column \(not written by tvae-em embed\)",
        issue=False,
    ),
    "select --z 1:2:1": Case(
        lambda w, t, s: [
            "select",
            w["npz"].with_suffix(".star"),
            "-o",
            t / "s.star",
            "--z",
            "1:2:1",
        ],
        r"--z 1:2:1: MIN 2 is above MAX 1",
        issue=False,
    ),
    "select --cs with a missing --npz": Case(
        lambda w, t, s: [
            "select",
            w["npz"].with_suffix(".star"),
            "-o",
            t / "s.star",
            "--cs",
            t / "s.cs",
            "--npz",
            t / "none.npz",
        ],
        r"--npz .*none\.npz: file not found",
        issue=False,
    ),
    # generate --------------------------------------------------------------------------------
    "generate --size 0": Case(
        lambda w, t, s: ["generate", w["run"], "-o", t / "figs", "--size", "0"],
        r"--size 0: must be between 8 and 1024",
    ),
    "generate --classes on an embedding with NaN rows": Case(
        lambda w, t, s: [
            "generate",
            w["run"],
            "-o",
            t / "figs",
            "--embedding",
            embedding_with_nan_rows(w, t),
            "--classes",
            "2",
        ],
        r"--embedding .*nan\.npz: particle 2 has a non-finite z",
    ),
    "generate NaN pixel in --particles": Case(
        lambda w, t, s: [
            "generate",
            w["run"],
            "-o",
            t / "figs",
            "--particles",
            bad_pixels(t / "in", which=[0]),
        ],
        r"particle 1 \(image 1 of .*particles\.mrcs\) has NaN pixels",
    ),
    "generate --checkpoint best without best.pt": Case(
        lambda w, t, s: ["generate", w["run"], "-o", t / "figs", "--checkpoint", "best"],
        r"--checkpoint best: .*has no checkpoints/best\.pt",
    ),
    "generate flipped bytes in last.pt": Case(
        lambda w, t, s: ["generate", damaged_run(w, t, "run"), "-o", t / "figs"],
        r"last\.pt: damaged checkpoint",
    ),
    "generate --n-steps 1": Case(
        lambda w, t, s: ["generate", w["run"], "-o", t / "figs", "--n-steps", "1"],
        r"--n-steps 1: must be between 2",
        issue=False,
    ),
    "generate a run without checkpoint": Case(
        lambda w, t, s: ["generate", t, "-o", t / "figs"],
        r"no checkpoint in .*checkpoints \(train first\)",
        issue=False,
    ),
}


def relion30_star(folder: Path, bad_at: int) -> Path:
    """A RELION 3.0 star (no optics block) with a per-particle rlnImagePixelSize, 0 in one."""
    images, _ = glyphs(N, box=BOX, seed=1, n_classes=2, t_sd_px=1.0)
    star = write_particle_set(folder, images, apix=2.0)
    particles = read_star(star)["particles"].drop(columns=["rlnOpticsGroup"])
    particles["rlnImagePixelSize"] = [2.0] * N
    particles.loc[bad_at, "rlnImagePixelSize"] = 0.0
    write_star(folder / "p30.star", {"images": particles})
    return folder / "p30.star"


def text_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("uid blob/path\n1 a.mrcs\n")
    return path


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:40])
    return path


def garbage_metrics(run: Path) -> Path:
    lines = (run / "metrics.csv").read_text().splitlines()
    lines.insert(2, "garbage,x")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def damaged_run(world, tmp: Path, name: str = "trained") -> Path:
    run = copy_run(world, tmp, name)
    flip_bytes(run / "checkpoints" / "last.pt")
    return run


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` (hidden ones too) -> a hash of its content."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in filenames:
                p = os.path.join(dirpath, f)
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_exit_2_nothing_left(world, tmp_path, name, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    with ExitStack() as stack:
        args = [str(a) for a in case.args(world, tmp_path, stack)]
        before = snapshot(world["root"], tmp_path)
        r = CliRunner().invoke(main, args)
        after = snapshot(world["root"], tmp_path)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert re.search(case.message, errors[0]), errors[0]
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    assert (created, removed, changed) == ([], [], []), errors[0]


# ---- reliability beyond bad input -----------------------------------------------------------
def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_preprocess_skips_a_chunk_of_bad_particles(tmp_path):
    star = bad_pixels(tmp_path / "in", which=[5])
    r = _cli("preprocess", star, "-o", tmp_path / "o", "--skip-bad", "--chunk-size", "1")
    assert r.exit_code == 0, r.output
    assert f"Wrote {N - 1} particles (1 skipped)" in r.stdout and "6 (NaN pixels)" in r.stderr
    assert sorted(os.listdir(tmp_path / "o")) == ["particles.mrcs", "particles.star"]


def test_resume_from_another_folder_with_relative_input(world, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(world["star"].parent, a / "data")
    b.mkdir()
    monkeypatch.chdir(a)
    r = _cli(
        "train", "data/particles.star", "-o", "run", "--epochs", "1", "--batch-size", "8",
        "--rotations", "4",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((a / "run" / "config.json").read_text())
    assert config["options"]["input"] == "data/particles.star"
    assert config["resolved_paths"]["input"] == str(a / "data" / "particles.star")
    monkeypatch.chdir(b)
    r = _cli("train", "--resume", a / "run", "--epochs", "2")
    assert r.exit_code == 0, r.output
    r = _cli("train", "--resume", a / "run", "--epochs", "3", a / "data" / "particles.star")
    assert r.exit_code == 0, r.output  # the absolute path is the same input
    assert json.loads((a / "run" / "config.json").read_text())["options"]["epochs"] == 3


def test_stale_lock_and_temporary_files_are_cleaned_up(world, tmp_path):
    run = copy_run(world, tmp_path)
    (run / ".lock").write_text(json.dumps({"pid": 99999999, "host": "gone", "since": "then"}))
    stale = [
        run / "checkpoints" / ".last.pt.4242-0a1b2c3d.tmp",
        run / "checkpoints" / ".last.pt.tmp4242",
        run / ".config.json.4242-0a1b2c3d.tmp",
    ]
    for p in stale:
        p.write_bytes(b"partial")
    r = _cli("train", "--resume", run, "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale) and not (run / ".lock").exists()
    assert RunFolder(run).load_checkpoint()["epoch"] == 3


def test_checkpoint_verifies_after_a_kill_before_the_rename(world, tmp_path, monkeypatch):
    """The digest file accepts the old and the new checkpoint while the new one is renamed in."""
    import tvae_em.io.atomic as atomic

    run = RunFolder(copy_run(world, tmp_path))
    payload = run.load_checkpoint()
    real = os.replace

    def killed(src, dst):
        if Path(dst).name == "last.pt":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint("last", {**payload, "epoch": 7})
    monkeypatch.setattr(atomic.os, "replace", real)
    assert run.load_checkpoint()["epoch"] == 2  # the old one, still verified
    run.save_checkpoint("last", {**payload, "epoch": 7})
    assert run.load_checkpoint()["epoch"] == 7
    accepted = json.loads((run.path / "checkpoints" / "last.pt.sha256").read_text())["accepted"]
    assert len(accepted) == 1


def test_interrupted_generate_leaves_no_files(world, tmp_path, monkeypatch):
    import tvae_em.generate as gen

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "histogram_figure", interrupt)
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_figures(
            gen.GenerateOptions(world["run"], tmp_path / "a" / "figs", embedding=world["npz"])
        )
    assert snapshot(tmp_path) == before  # neither figs/ nor the folder a/ made for it
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # into an existing folder: its files untouched
        gen.generate_figures(
            gen.GenerateOptions(world["run"], tmp_path / "figs", embedding=world["npz"])
        )
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    gen.generate_figures(gen.GenerateOptions(world["run"], tmp_path / "figs"))
    assert sorted(os.listdir(tmp_path / "figs")) == [
        "latent_plane.png",
        "latent_traversal.png",
        "notes.txt",
    ]


def test_ctrl_c_before_the_first_checkpoint_says_so(world, tmp_path, monkeypatch):
    import tvae_em.training.loop as loop

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_run_epoch", interrupted)
    r = _cli(*TRAIN(world, tmp_path, "--rotations", "4"))
    assert r.exit_code == 130
    assert "before the first checkpoint" in r.stderr and "checkpoint is kept" not in r.stderr
    assert "--resume" not in r.stderr
