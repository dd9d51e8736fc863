"""Meshes, logical-axis rules and expert parallelism (issue M3)."""
from .mesh import AXES, MeshConfig, MeshError, make_mesh
from .rules import DEFAULT_RULES, rules_fn, batch_sharding, check_batch, per_device_bytes, per_device_elements, shard_state, spec_for, state_shardings

__all__ = ["AXES", "MeshConfig", "MeshError", "make_mesh", "DEFAULT_RULES", "rules_fn", "batch_sharding", "check_batch",
           "per_device_bytes", "per_device_elements", "shard_state", "spec_for", "state_shardings"]
