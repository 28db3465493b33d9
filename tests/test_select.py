"""`tvae-em select`: the kept rows are exactly those passing every criterion, every column is
kept, full-size rows with `--original`, a .cs (read by cryosparc-tools) when the particles are
a .cs, and the real RELION reads the output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import make_run_folder, write_particle_set

from tvae_em.cli import main
from tvae_em.embed import EmbedOptions, embed_particles
from tvae_em.errors import UserError
from tvae_em.io import ParticleStack, read_star
from tvae_em.preprocess import preprocess_stack
from tvae_em.select import SelectOptions, parse_z_range, select_particles
from tvae_em.synthetic import glyphs

FULL, BOX, N = 32, 16, 24


def _toy_cs(root: Path, n: int) -> Path:
    """A cryoSPARC .cs of the full-size stack (blob/path relative to the project folder root)."""
    dtype = [
        ("uid", "<u8"),
        ("blob/path", "S21"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("location/micrograph_uid", "<u8"),
    ]
    arr = np.zeros(n, dtype=dtype)
    arr["uid"] = np.arange(n, dtype=np.uint64) * 7 + 2**62
    arr["blob/path"] = b"full/particles.mrcs"
    arr["blob/idx"] = np.arange(n)
    arr["blob/shape"] = FULL
    arr["blob/psize_A"] = 1.0
    arr["location/micrograph_uid"] = 99
    (root / "J3").mkdir()
    with open(root / "J3" / "particles.cs", "wb") as f:
        np.save(f, arr)
    return root / "J3" / "particles.cs"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    images, _ = glyphs(N, box=FULL, seed=4, n_classes=3, t_sd_px=2.0)
    extra = {
        "rlnMicrographName": [f"mics/m{i % 4}.mrc" for i in range(N)],
        "rlnCoordinateX": 100.0 + 10 * np.arange(N),
        "rlnCoordinateY": 50.0 + np.arange(N),
        "rlnGroupName": [f"g{i % 2:02d}" for i in range(N)],
    }
    full = write_particle_set(root / "full", images, 1.0, extra=extra)
    run = make_run_folder(root / "run", BOX)
    prep = preprocess_stack(ParticleStack.open(full), root / "prep", size=BOX).star
    embed_particles(EmbedOptions(run, prep, root / "e.star", classes=3, classify="kmeans"))
    cs = _toy_cs(root, N)
    prep_cs = preprocess_stack(ParticleStack.open(cs), root / "prepcs", size=BOX).star
    embed_particles(EmbedOptions(run, prep_cs, root / "ecs.star", classes=2, classify="kmeans"))
    return {"root": root, "full": full, "prep": prep, "cs": cs, "e": root / "e.star"}


def _particles(star: Path) -> pd.DataFrame:
    return read_star(star)["particles"]


def test_kept_rows_are_exactly_those_passing_every_criterion(world, tmp_path):
    e = _particles(world["e"])
    conf = float(np.quantile(e["tvaePoseConfidence"], 0.3))
    z_mid = float(np.median(e["tvaeZ1"]))
    s = select_particles(
        SelectOptions(
            world["e"],
            tmp_path / "s.star",
            classes="1,3",
            min_confidence=conf,
            elbo_quantile=0.1,
            z=(f"1:{z_mid - 10}:{z_mid + 0.5}", "2::"),
        )
    )
    expect = (
        e["rlnClassNumber"].isin([1, 3])
        & (e["tvaePoseConfidence"] >= conf)
        & (e["tvaeElbo"] >= np.quantile(e["tvaeElbo"], 0.1))
        & (e["tvaeZ1"] <= z_mid + 0.5)
    )
    out = _particles(tmp_path / "s.star")
    assert 0 < expect.sum() < N and s.kept == expect.sum() == len(out) and s.total == N
    pd.testing.assert_frame_equal(
        out.drop(columns="rlnImageName"),
        e[expect].drop(columns="rlnImageName").reset_index(drop=True),
        check_dtype=False,
    )
    assert ParticleStack.open(tmp_path / "s.star").box == BOX  # image names still resolve
    for c in (1, 2, 3):
        kept, total = s.per_class[c]
        assert total == (e["rlnClassNumber"] == c).sum()
        assert kept == (expect & (e["rlnClassNumber"] == c)).sum()
    assert s.per_class[2][0] == 0 and f"kept {s.kept} of {N} particles (class 1: " in s.line()


def test_elbo_quantile_drops_the_worst(world, tmp_path):
    select_particles(SelectOptions(world["e"], tmp_path / "s.star", elbo_quantile=0.1))
    elbo = _particles(world["e"])["tvaeElbo"].to_numpy()
    kept = _particles(tmp_path / "s.star")["tvaeElbo"].to_numpy()
    dropped = np.setdiff1d(elbo, kept)
    assert len(dropped) in (2, 3) and dropped.max() < kept.min()  # 10% of 24


def test_original_gives_the_full_size_rows_with_the_same_shifts(world, tmp_path):
    s = select_particles(
        SelectOptions(world["e"], tmp_path / "full.star", classes="2", original=world["full"])
    )
    e, full = _particles(world["e"]), _particles(world["full"])
    kept = e["rlnClassNumber"] == 2
    out = read_star(tmp_path / "full.star")
    p = out["particles"]
    assert len(p) == s.kept == kept.sum()
    rows = [int(np.flatnonzero(full["rlnCoordinateX"] == x)[0]) for x in e["rlnCoordinateX"][kept]]
    assert p["rlnGroupName"].tolist() == full["rlnGroupName"].iloc[rows].tolist()
    assert p["rlnImageName"].str.split("@").str[0].tolist() == [f"{r + 1:06d}" for r in rows]
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "tvaeZ1"):
        np.testing.assert_allclose(p[col], e[col][kept], rtol=1e-8)
    assert out["optics"]["rlnImagePixelSize"].tolist() == [1.0]
    assert out["optics"]["rlnImageSize"].tolist() == [FULL]
    assert ParticleStack.open(tmp_path / "full.star").box == FULL


def test_cs_input_gives_a_cs_that_cryosparc_reads(world, tmp_path):
    dataset = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools not installed")
    ecs = world["root"] / "ecs.star"
    s = select_particles(SelectOptions(ecs, tmp_path / "s.star", classes="2", original=world["cs"]))
    assert [p.name for p in s.outputs] == ["s.star", "s.cs"]
    e = _particles(ecs)
    kept = np.flatnonzero(e["rlnClassNumber"] == 2)
    d = dataset.Dataset.load(str(tmp_path / "s.cs"))
    source = np.load(world["cs"])
    assert len(d) == len(kept) and d["uid"].tolist() == source["uid"][kept].tolist()
    assert (d["location/micrograph_uid"] == 99).all()
    assert (d["alignments2D/class"] == 1).all()
    turn = d["alignments2D/pose"] - np.radians(e["rlnAnglePsi"][kept].to_numpy())
    np.testing.assert_allclose((turn + np.pi) % (2 * np.pi) - np.pi, 0.0, atol=1e-5)  # mod 2 pi
    np.testing.assert_allclose(d["alignments2D/shift"][:, 0], e["rlnOriginXAngst"][kept], atol=1e-5)


def test_relion_reads_the_subset(world, tmp_path):
    if shutil.which("relion_star_handler") is None:
        pytest.skip("RELION 3.1 (relion_star_handler) is not installed")
    select_particles(SelectOptions(world["e"], tmp_path / "s.star", classes="1"))
    out = subprocess.run(
        ["relion_star_handler", "--i", "s.star", "--o", "c.star", "--select", "rlnClassNumber",
         "--minval", "1", "--maxval", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_particles(tmp_path / "c.star")) == len(_particles(tmp_path / "s.star"))


def test_parse_z_range():
    r = parse_z_range("2:-0.5:")
    assert (r.dim, r.lo, r.hi) == (2, -0.5, None)
    for bad in ("2", "x:0:1", "0:0:1", "1:1:0", "1:a:2", "1:nan:2"):
        with pytest.raises(UserError, match="--z"):
            parse_z_range(bad)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", "7"], "has no class 7"),
        (["--classes", "a"], "--classes a"),
        (["--min-confidence", "1.5"], "--min-confidence 1.5"),
        (["--elbo-quantile", "1"], "--elbo-quantile 1"),
        (["--z", "3:0:1"], "2 latent dimensions"),
        (["--z", "1:1000:"], "no particle"),
        (["-o", "{tmp}/s.txt"], "must end in .star"),
        (["-o", "{e}"], "would overwrite"),
        (["--cs", "{tmp}/x.star"], "must end in .cs"),
        (["--original", "{tmp}/none.star"], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(world, tmp_path, extra, message):
    args = [a.format(tmp=tmp_path, e=world["e"]) for a in extra]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "s.star")]
    r = CliRunner().invoke(main, ["select", str(world["e"]), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_select(world, tmp_path):
    r = CliRunner().invoke(main, ["select", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--elbo-quantile" in r.output
    r = CliRunner().invoke(
        main, ["select", str(world["e"]), "-o", str(tmp_path / "s.star"), "--classes", "2"]
    )
    assert r.exit_code == 0 and r.stdout.startswith("kept ") and "class 2: " in r.stdout, r.output
