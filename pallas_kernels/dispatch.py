"""Backend choice shared by every kernel op: ``auto`` picks the Pallas kernel of the platform
(Triton on GPU, Mosaic on TPU) and the jnp reference elsewhere; ``pallas`` on CPU needs ``interpret``."""
from __future__ import annotations

from typing import Callable, Sequence

import jax


def resolve_backend(backend: str, interpret: bool, backends: Sequence[str],
                    gpu_supported: Callable[[], bool] = lambda: True) -> str:
    """The concrete implementation name (``reference``, ``pallas_gpu``, ``pallas_tpu`` or another
    entry of ``backends`` asked for by name)."""
    if backend not in backends:
        raise ValueError(f"backend={backend!r} is not one of {list(backends)}.")
    platform = jax.default_backend()
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
