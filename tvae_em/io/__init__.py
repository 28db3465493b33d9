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
from .relion import (
    SOURCE_ROW,
    OpticsDefaults,
    build_optics,
    complete_optics,
    origins_to_angstrom,
    project_path,
    relion30_to_31,
    stack_reference,
)
from .star import (
    StarText,
    read_particles_star,
    read_particles_star_text,
    read_star,
    read_star_text,
    write_star,
)

__all__ = [
    "PHASE_FLIPPED",
    "SOURCE_ROW",
    "OpticsDefaults",
    "StarText",
    "complete_optics",
    "project_path",
    "read_star_text",
    "read_particles_star_text",
    "stack_reference",
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
