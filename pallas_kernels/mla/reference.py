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


# ---- absorbed decode over the latent cache (docs/architecture.md §2) ---------------------------------------------
def gather_pages(pool: jax.Array, block_table: jax.Array) -> jax.Array:
    """Paged cache ``pool [P, page, X]`` + ``block_table [B, pages_per_seq]`` → contiguous
    ``[B, pages_per_seq·page, X]`` (entry ``j`` of a row holds tokens ``j·page … (j+1)·page-1``)."""
    pages = pool[jnp.clip(block_table, 0, pool.shape[0] - 1)]       # [B, pps, page, X]
    return pages.reshape(block_table.shape[0], -1, pool.shape[-1])


def decode_partial_reference(q_latent: jax.Array, q_rope: jax.Array, ckv: jax.Array, krope: jax.Array,
                             lengths: jax.Array, *, scale: float, num_splits: int = 1,
                             block_table: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Split-KV (flash-decoding) partials: the cache's ``T`` positions cut into ``num_splits`` equal
    chunks; per chunk the normalised latent output ``o [B, n, H, L]`` (fp32) and the log-sum-exp of
    its scores ``lse [B, n, H]`` (``-inf`` and ``o = 0`` where the chunk holds no position < length).
    ``combine_splits`` turns them into the full attention."""
    if block_table is not None:
        ckv, krope = gather_pages(ckv, block_table), gather_pages(krope, block_table)
    b, t, _ = ckv.shape
    chunk = -(-t // num_splits)
    pad = chunk * num_splits - t
    ckv = jnp.pad(ckv, ((0, 0), (0, pad), (0, 0)))
    krope = jnp.pad(krope, ((0, 0), (0, pad), (0, 0)))
    s = (jnp.einsum("bhl,btl->bht", q_latent, ckv, preferred_element_type=jnp.float32)
         + jnp.einsum("bhr,btr->bht", q_rope, krope, preferred_element_type=jnp.float32)) * scale
    valid = jnp.arange(t + pad)[None, None, :] < lengths[:, None, None]            # [B, 1, T]
    s = jnp.where(valid, s, -jnp.inf).reshape(b, s.shape[1], num_splits, chunk)   # [B, H, n, c]
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)                                                         # 0 where masked
    l = jnp.sum(p, axis=-1)                                                         # [B, H, n]
    o = jnp.einsum("bhnc,bncl->bnhl", p, ckv.reshape(b, num_splits, chunk, -1).astype(jnp.float32))
    l_t = jnp.swapaxes(l, 1, 2)                                                     # [B, n, H]
    o = jnp.where(l_t[..., None] > 0, o / jnp.where(l_t > 0, l_t, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m_safe[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return o, jnp.swapaxes(lse, 1, 2)


def combine_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Flash-decoding combine: ``o [B, n, H, L]``, ``lse [B, n, H]`` → ``Σ_s exp(lse_s - lse) o_s``
    ``[B, H, L]`` fp32 with ``lse = logsumexp_s lse_s``; rows with no position at all give 0."""
    m = jnp.max(lse, axis=1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)                                                       # 0 for empty splits
    total = jnp.sum(w, axis=1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bnh,bnhl->bhl", w, o.astype(jnp.float32))


def decode_reference(q_latent: jax.Array, q_rope: jax.Array, ckv: jax.Array, krope: jax.Array,
                     lengths: jax.Array, *, scale: float, block_table: Optional[jax.Array] = None) -> jax.Array:
    """Absorbed MLA decode (docs/architecture.md §2), all heads against the one latent stream: scores
    ``(q_lat·c_kv + q_rope·k_rope)·scale`` over cache positions ``< lengths[b]``, fp32 softmax,
    ``o_lat = Σ p·c_kv``. q_latent ``[B, H, L]``, q_rope ``[B, H, R]``, caches ``[B, T, L]`` /
    ``[B, T, R]`` (or page pools ``[P, page, ·]`` with ``block_table [B, pages_per_seq]``),
    lengths int ``[B]`` → ``[B, H, L]`` **fp32**. A sequence of length 0 gives zeros."""
    o, lse = decode_partial_reference(q_latent, q_rope, ckv, krope, lengths, scale=scale,
                                      block_table=block_table)
    return o[:, 0]
