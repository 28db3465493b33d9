"""Particle I/O: RELION stars, cryoSPARC .cs tables, MRC stacks and the lazy ParticleStack."""

from .atomic import (
    atomic_folder,
    atomic_path,
    atomic_paths,
    check_writable_dir,
    ensure_writable_dir,
    remove_paths,
    stale_temps,
)
from .cs import cs_to_dataframe, cs_to_relion31, dataframe_to_cs, read_cs, write_cs
from .ctf_columns import PHASE_FLIPPED, cryosparc_ctf_params, relion_ctf_params
from .mrc import StackHeader, open_stack, read_header, write_stack
from .particles import (
    CsStack,
    MrcsStack,
    ParticleStack,
    StarStack,
    nonfinite_images,
    nonfinite_kind,
    write_particles_star,
)
from .relion import build_optics, origins_to_angstrom, relion30_to_31
from .star import read_particles_star, read_star, write_star

__all__ = [
    "PHASE_FLIPPED",
    "CsStack",
    "MrcsStack",
    "ParticleStack",
    "StarStack",
    "StackHeader",
    "atomic_folder",
    "atomic_path",
    "atomic_paths",
    "build_optics",
    "check_writable_dir",
    "cs_to_dataframe",
    "cs_to_relion31",
    "dataframe_to_cs",
    "ensure_writable_dir",
    "nonfinite_images",
    "nonfinite_kind",
    "open_stack",
    "origins_to_angstrom",
    "read_cs",
    "read_header",
    "read_particles_star",
    "read_star",
    "relion30_to_31",
    "remove_paths",
    "stale_temps",
    "cryosparc_ctf_params",
    "relion_ctf_params",
    "write_cs",
    "write_particles_star",
    "write_stack",
    "write_star",
]
