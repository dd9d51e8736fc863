"""Backend choice shared by every kernel op: ``auto`` picks the Pallas kernel of the platform
(Triton on GPU, Mosaic on TPU) and the jnp reference elsewhere; ``pallas`` on CPU needs ``interpret``."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax


def resolve_backend(backend: str, interpret: bool, backends: Sequence[str],
                    gpu_supported: Callable[[], bool] = lambda: True, platform: Optional[str] = None) -> str:
    """The concrete implementation name (``reference``, ``pallas_gpu``, ``pallas_tpu`` or another
    entry of ``backends`` asked for by name). ``platform``: what the program is compiled for (a mesh's
    devices, e.g. a TPU slice compiled ahead of time from a CPU host); default: this host's backend."""
    if backend not in backends:
        raise ValueError(f"backend={backend!r} is not one of {list(backends)}.")
    if platform is None:
        platform = jax.default_backend()
    else:  # compiling for devices that are not this host's: do not probe the local GPU
        gpu_supported = (lambda: True) if platform != jax.default_backend() else gpu_supported
    if backend == "auto":
        if platform == "gpu" and gpu_supported():
            return "pallas_gpu"
        return "pallas_tpu" if platform == "tpu" else "reference"
    if backend == "pallas":
        if platform in ("gpu", "tpu"):
            return f"pallas_{platform}"
        if not interpret:
            raise ValueError(f"backend='pallas' has no kernel for platform {platform!r}; pass interpret=True "
                             "to run the kernel in the Pallas interpreter, or use backend='reference'.")
        return "pallas_gpu"
    return backend
