"""MLA attention ops (docs/architecture.md §2). ``reference.py`` is the specification and the CPU path;
``blockwise.py`` is flash attention in jnp (and the prefill backward); ``pallas_gpu.py`` (Triton) and
``pallas_tpu.py`` (Mosaic) are the kernels; ``ops.py`` dispatches by backend."""
from .ops import BACKENDS, decode, default_num_splits, prefill, resolve_backend
from .reference import (attention_mask, combine_splits, decode_partial_reference, decode_reference, gather_pages,
                        prefill_reference)

__all__ = ["BACKENDS", "attention_mask", "combine_splits", "decode", "decode_partial_reference", "decode_reference",
           "default_num_splits", "gather_pages", "prefill", "prefill_reference", "resolve_backend"]
