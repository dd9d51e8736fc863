"""MLA attention ops (SPEC §2). ``reference.py`` is the specification and the CPU path."""
from .reference import attention_mask, prefill_reference

__all__ = ["attention_mask", "prefill_reference"]
