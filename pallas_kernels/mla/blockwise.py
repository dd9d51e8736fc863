"""Flash attention in plain jnp: forward (online softmax over key blocks) and the memory-efficient
backward (scores recomputed block by block from the saved log-sum-exp). Both keep ``O(S·block)``
scores alive instead of the reference's ``O(S²)``.

The backward is what ``ops.prefill`` differentiates with for ``backend='blockwise'`` (the Pallas
backends have their own backward kernels with the same math): a ``lax.scan`` over key blocks, each
step recomputing ``p = exp(q·kᵀ·scale − lse)`` for all queries against one key block and producing
that block's ``dk, dv`` and a ``dq`` update.

Layout here is head-major: ``q, k [B, H, S, Dqk]``, ``v, o, do [B, H, S, Dv]``, ``lse [B, H, S]``;
``q_seg`` / ``kv_seg`` ``[B, S]`` int (pads use ids that never match: see ``ops._segments``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": masked scores; rows with nothing to attend to give o = 0


def _pad_seq(x, axis, mult, value=0):
    pad = -x.shape[axis] % mult
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _mask(q_seg, kv_seg_blk, q_pos, k_pos, causal):
    """``[B, 1, Sq, bk]`` bool."""
    m = q_seg[:, None, :, None] == kv_seg_blk[:, None, None, :]
    if causal:
        m = m & (k_pos[None, None, None, :] <= q_pos[None, None, :, None])
    return m


def _blocks(k, v, kv_seg, block_k):
    """Key/value blocks stacked on a leading axis for ``lax.scan``."""
    b, h, s, _ = k.shape
    nb = s // block_k
    kb = jnp.moveaxis(k.reshape(b, h, nb, block_k, -1), 2, 0)
    vb = jnp.moveaxis(v.reshape(b, h, nb, block_k, -1), 2, 0)
    sb = jnp.moveaxis(kv_seg.reshape(b, nb, block_k), 1, 0)
    return kb, vb, sb, jnp.arange(nb) * block_k


def forward(q, k, v, q_seg, kv_seg, *, scale: float, causal: bool, block_k: int = 128):
    """→ ``(o [B, H, S, Dv] in v.dtype, lse [B, H, S] fp32)``; ``S`` a multiple of ``block_k``."""
    b, h, s, _ = q.shape
    dv = v.shape[-1]
    q_pos = jnp.arange(s)
    kb, vb, sb, starts = _blocks(k, v, kv_seg, block_k)

    def step(carry, blk):
        m, l, acc = carry
        k_j, v_j, seg_j, start = blk
        sc = jnp.einsum("bhqd,bhkd->bhqk", q, k_j, preferred_element_type=jnp.float32) * scale
        mask = _mask(q_seg, seg_j, q_pos, start + jnp.arange(block_k), causal)
        sc = jnp.where(mask, sc, NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v_j,
                                                 preferred_element_type=jnp.float32)
        return (m_new, l, acc), None

    init = (jnp.full((b, h, s), NEG, jnp.float32), jnp.zeros((b, h, s), jnp.float32),
            jnp.zeros((b, h, s, dv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, sb, starts))
    ok = l > 0
    o = jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG)
    return o.astype(v.dtype), lse


def backward(q, k, v, q_seg, kv_seg, o, lse, do, *, scale: float, causal: bool, block_k: int = 128):
    """Gradients ``(dq, dk, dv)`` of ``forward``'s ``o`` (FlashAttention-2 backward, blockwise over
    keys, in jnp): ``D = rowsum(do∘o)``, ``ds = p∘(do·vᵀ − D)``, ``dq = Σ ds·k·scale``,
    ``dk = dsᵀ·q·scale``, ``dv = pᵀ·do``. Accumulated in fp32, returned in the inputs' dtypes."""
    b, h, s, _ = q.shape
    q_pos = jnp.arange(s)
    kb, vb, sb, starts = _blocks(k, v, kv_seg, block_k)
    do32 = do.astype(jnp.float32)
    delta = jnp.sum(o.astype(jnp.float32) * do32, axis=-1)                   # [B, H, S]

    def step(dq, blk):
        k_j, v_j, seg_j, start = blk
        sc = jnp.einsum("bhqd,bhkd->bhqk", q, k_j, preferred_element_type=jnp.float32) * scale
        mask = _mask(q_seg, seg_j, q_pos, start + jnp.arange(block_k), causal)
        p = jnp.where(mask, jnp.exp(sc - lse[..., None]), 0.0)               # [B, H, S, bk]
        dv_j = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhqd,bhkd->bhqk", do, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(q.dtype), k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (kb, vb, sb, starts))
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
