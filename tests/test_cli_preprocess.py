"""`tvae-em preprocess`: real files work; every bad input gives one line, exit 2, no output."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tvae_em.cli import main
from tvae_em.io import ParticleStack, write_star
from tvae_em.progress import progress_bar

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryodrgn-tests"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
pytestmark = pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")


def run(*args: str):
    return CliRunner().invoke(main, ["preprocess", *map(str, args)])


def write_mrcs(path: Path, data: np.ndarray) -> None:
    with mrcfile.new(path, data=data, overwrite=True) as m:
        m.set_image_stack()
        m.voxel_size = 2.0


def star(path: Path, names: list[str]) -> Path:
    write_star(path, {"particles": pd.DataFrame({"rlnImageName": names})})
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with good and bad inputs."""
    rng = np.random.default_rng(0)
    write_mrcs(tmp_path / "s.mrcs", rng.normal(size=(4, 16, 16)).astype(np.float32))
    write_mrcs(tmp_path / "big.mrcs", rng.normal(size=(2, 20, 20)).astype(np.float32))
    write_mrcs(tmp_path / "rect.mrcs", rng.normal(size=(2, 16, 12)).astype(np.float32))
    nan = rng.normal(size=(5, 16, 16)).astype(np.float32)
    nan[2, 3, 3] = np.nan
    write_mrcs(tmp_path / "nan.mrcs", nan)
    star(tmp_path / "good.star", [f"{i}@s.mrcs" for i in range(1, 5)])
    star(tmp_path / "range.star", ["1@s.mrcs", "9@s.mrcs"])
    star(tmp_path / "sizes.star", ["1@s.mrcs", "1@big.mrcs"])
    star(tmp_path / "rect.star", ["1@rect.mrcs"])
    star(tmp_path / "nostack.star", ["1@s.mrcs", "1@gone.mrcs"])
    star(tmp_path / "nan.star", [f"{i}@nan.mrcs" for i in range(1, 6)])
    (tmp_path / "empty.star").write_text("data_particles\n\nloop_\n_rlnImageName #1\n")
    (tmp_path / "noname.star").write_text("data_\n\nloop_\n_rlnDefocusU #1\n1.0\n")
    (tmp_path / "particles.txt").write_text("1@s.mrcs\n")
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


BAD = {
    "missing star": (["missing.star"], r"missing\.star"),
    "missing stack": (["nostack.star"], r"gone\.mrcs \(particle 2 of .*nostack\.star\) not found"),
    "index out of range": (["range.star"], r"particle 2 of .*range\.star asks for image 9"),
    "different sizes": (["sizes.star"], r"different sizes in .*sizes\.star.*big\.mrcs"),
    "non-square": (["rect.star"], r"rect\.mrcs are not square \(12x16\)"),
    "NaN pixels": (["nan.star"], r"particle 3 \(image 3 of .*nan\.mrcs\) has NaN pixels"),
    "empty star": (["empty.star"], r"empty\.star has no particles"),
    "no rlnImageName": (["noname.star"], r"noname\.star has no rlnImageName"),
    "unknown file type": (["particles.txt"], r"unknown input file type '\.txt'"),
    "size too large": (["good.star", "--size", "32"], r"--size 32 is larger than .*16x16"),
    "size odd": (["good.star", "--size", "9"], r"--size 9 must be a positive even"),
    "apix finer": (["good.star", "--apix", "1"], r"--apix 1 is finer than the input pixel size 2"),
    "size and apix": (["good.star", "--size", "8", "--apix", "4"], r"--size or --apix, not both"),
    "lowpass beyond Nyquist": (["good.star", "--size", "8", "--lowpass", "5"], r"--lowpass 5 A"),
    "output is a file": (["good.star", "-o", "afile"], r"output folder .*afile"),
    "output under a file": (["good.star", "-o", "afile/out"], r"output folder .*afile/out"),
    "bad input apix": (["good.star", "--input-apix", "-1"], r"--input-apix must be a positive"),
    "bad chunk size": (["good.star", "--chunk-size", "0"], r"--chunk-size must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(work, case, monkeypatch):
    args, pattern = BAD[case]
    monkeypatch.chdir(work)
    before = sorted(os.listdir(work))
    if "-o" not in args:
        args = [*args, "-o", "out"]
    result = run(*args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, errors[0]), errors[0]
    assert sorted(os.listdir(work)) == before  # no output folder, no temporary files


def test_skip_bad_drops_and_counts(work, monkeypatch):
    monkeypatch.chdir(work)
    result = run("nan.star", "-o", "out", "--skip-bad", "--size", "8")
    assert result.exit_code == 0, result.output
    assert "Wrote 4 particles (1 skipped)" in result.stdout
    assert "3 (NaN pixels)" in result.stderr
    assert len(ParticleStack.open(work / "out" / "particles.star")) == 4


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "ro").mkdir(mode=0o500)
    result = run("good.star", "-o", "ro")
    assert result.exit_code == 2 and "ro is not writable" in result.stderr


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["preprocess", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--skip-bad" in result.output


@needs_data
@pytest.mark.parametrize(
    "name, extra, box",
    [
        ("relion31.star", ["--size", "64"], 64),
        ("empiar_10076_7.star", ["--apix", "5", "--invert"], 84),
        ("empiar_10076_7.cs", ["--size", "64", "--lowpass", "20"], 64),
        ("toy_projections.star", ["--size", "16", "--norm", "image"], 16),
    ],
)
def test_real_files(tmp_path, name, extra, box):
    result = run(DATA / name, "-o", tmp_path / "out", *extra, "--chunk-size", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Wrote ") and len(result.stdout.splitlines()) == 1
    out = ParticleStack.open(tmp_path / "out" / "particles.star")
    assert out.box == box and out.kind == "relion31"
    expected = {"particles.mrcs", "particles.star"} | (
        {"particles.cs"} if name.endswith(".cs") else set()
    )
    assert set(os.listdir(tmp_path / "out")) == expected


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_plain_lines_when_not_a_terminal():
    stream = _Stream(tty=False)
    with progress_bar(100, "job", stream=stream) as advance:
        for _ in range(20):
            advance(5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("job: 100/100 particles (100%)")
    assert "particles/s" in lines[0] and "ETA" in lines[0]


def test_progress_rich_bar_on_a_terminal():
    stream = _Stream(tty=True)
    with progress_bar(10, "job", unit="images", stream=stream) as advance:
        advance(10)
    assert "10/10" in stream.getvalue() and "images/s" in stream.getvalue()
