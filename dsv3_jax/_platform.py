"""Keep a machine without TPUs quiet when libtpu is installed (the ``tpu`` extra, which ``dsv3 plan``
needs to compile for a TPU slice from a CPU host).

With libtpu importable, JAX tries to bring up a TPU client on first use; on a host with no TPU chips
that fails after libtpu prints a page of worker/accelerator warnings. When no TPU device files exist
and the user has not chosen platforms (``JAX_PLATFORMS``), JAX is told to use the platforms this host
can have: CUDA when its plugin is installed, and the CPU. Compiling *for* a TPU topology still works:
``jax.experimental.topologies`` does not need the TPU backend.
"""
from __future__ import annotations

import glob
import importlib.util
import os


def avoid_absent_tpu() -> None:
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU chips on this host
        return
    import jax
    from jax._src import xla_bridge
    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():  # too late to choose; leave JAX as is
        return
    cuda = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")
