"""Functional entry points: pure jitted functions of ``(graphdef, state, batch)``
(docs/design.md §Functional at the boundary).

``nnx.split(model)`` gives ``(graphdef, state)``; the forward checks token ids on the host first
(JAX would clamp them silently), then runs one compiled program per shape.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
from flax import nnx

from .transformer import DeepSeekV3, ModelOutput, check_tokens


def make_forward(model: DeepSeekV3, *, mtp: bool = True) -> tuple[Callable[..., ModelOutput], nnx.State]:
    """Split ``model`` and return ``(forward, state)`` with
    ``forward(state, tokens, segment_ids=None, positions=None) -> ModelOutput`` jitted."""
    graphdef, state = nnx.split(model)
    vocab = model.cfg.vocab_size

    @jax.jit
    def _fwd(state, tokens, segment_ids, positions):
        return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, positions=positions, mtp=mtp)

    def forward(state: nnx.State, tokens, segment_ids: Optional[jax.Array] = None,
                positions: Optional[jax.Array] = None) -> ModelOutput:
        check_tokens(tokens, vocab, ndim=2)  # the model's own check sees tracers under jit: this is the one that runs
        return _fwd(state, tokens, segment_ids, positions)

    return forward, state
