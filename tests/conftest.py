"""Shared fixtures: tiny run folders (untrained model + checkpoint), small particle sets on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tvae_em.data import Normalisation
from tvae_em.io import write_stack, write_star
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.run import RunFolder
from tvae_em.synthetic import star_blocks

TINY_MODEL = dict(
    rotations=4,
    encoder_fields=4,
    encoder_hidden_fields=4,
    encoder_layers=1,
    generator_hidden=32,
    generator_layers=1,
    fourier_features=32,
)


def make_run_folder(
    run_dir: Path,
    box: int,
    z_dim: int = 2,
    ctf: bool = False,
    norm: tuple[float, float] = (0.0, 1.0),
    **overrides,
) -> Path:
    """A run folder as train writes it (config.json + checkpoints/last.pt), untrained weights."""
    cfg = ModelConfig(box=box, z_dim=z_dim, **{**TINY_MODEL, **overrides})
    opts = {"input": "particles.star", "out_dir": str(run_dir), "ctf": "on" if ctf else "off"}
    RunFolder(run_dir).save_model(TargetVAE(cfg), opts, Normalisation(*norm), ctf=ctf, epoch=1)
    return run_dir


def write_particle_set(
    folder: Path,
    images: np.ndarray,
    apix: float,
    name: str = "particles",
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """images (n, D, D) -> folder/name.mrcs + a RELION 3.1 folder/name.star; returns the star."""
    folder.mkdir(parents=True, exist_ok=True)
    n, box = images.shape[0], images.shape[-1]
    write_stack(folder / f"{name}.mrcs", [images.astype(np.float32)], n, box, apix)
    blocks = star_blocks(n, box, apix, f"{name}.mrcs")
    for key, values in (extra or {}).items():
        blocks["particles"][key] = values
    star = folder / f"{name}.star"
    write_star(star, blocks)
    return star


@pytest.fixture
def make_run(tmp_path):
    """Factory: make_run(box, **kw) -> a fresh run folder under tmp_path."""
    counter = iter(range(1000))

    def factory(box: int, **kw) -> Path:
        return make_run_folder(tmp_path / f"run{next(counter)}", box, **kw)

    return factory


@pytest.fixture
def particle_set():
    """The `write_particle_set` helper, as a fixture."""
    return write_particle_set
