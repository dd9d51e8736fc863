"""Reference (plain jnp) MLA attention: the spec the Pallas kernels are tested against."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def attention_mask(q_len: int, kv_len: int, *, causal: bool = True,
                   q_segment_ids: Optional[jax.Array] = None,
                   kv_segment_ids: Optional[jax.Array] = None) -> Optional[jax.Array]:
    """Boolean ``[B|1, Sq, Sk]`` mask: causal by index (packed rows are causal too) and, with
    segment ids, no attention across documents."""
    mask = None
    if causal:
        offset = kv_len - q_len  # queries are the last q_len positions of the kv sequence
        qi = jnp.arange(q_len)[:, None] + offset
        ki = jnp.arange(kv_len)[None, :]
        mask = (ki <= qi)[None]
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        seg = q_segment_ids[:, :, None] == kv_seg[:, None, :]
        mask = seg if mask is None else mask & seg
    return mask


def prefill_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                      segment_ids: Optional[jax.Array] = None, causal: bool = True) -> jax.Array:
    """Softmax attention, fp32 scores and softmax.

    q, k: ``[B, S, H, Dqk]`` (nope + rope channels), v: ``[B, S, H, Dv]`` → ``[B, S, H, Dv]``.
    Fully masked rows (never happens for causal self-attention) would give a uniform average.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, q_segment_ids=segment_ids)
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
