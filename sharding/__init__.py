"""Meshes, the logical-axis rules and expert-parallel collectives (issue M3). Below the model:
nothing here imports ``dsv3_jax``."""
from .errors import Dsv3Error, MeshError
from .mesh import AXES, MeshConfig, make_mesh
from .rules import DEFAULT_RULES, Rules

__all__ = ["AXES", "Dsv3Error", "MeshConfig", "MeshError", "make_mesh", "DEFAULT_RULES", "Rules"]
