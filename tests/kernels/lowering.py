"""Lowering Pallas GPU kernels for CUDA on a machine without a GPU (``jax.export``)."""
from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def cuda_target(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """Name the target GPU while exporting: jax >= 0.12's Pallas Triton lowering reads the compute
    capability from the current abstract mesh's device when no GPU is attached (jax 0.10 assumed one);
    an abstract mesh over that device supplies it on every version."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("_",), abstract_device=device)):
        yield
