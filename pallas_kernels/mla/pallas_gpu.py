"""MLA attention as Pallas GPU kernels, Triton-lowered (``blockwise.py`` / ``reference.py`` are the spec).

**Prefill** (flash forward): one program per ``(batch, head, query block)``; it walks the key blocks
(only up to the diagonal when causal) with an online softmax and writes the output block and its
log-sum-exp (saved for the backward). The head dims arrive split in power-of-2 parts — q/k
``192 = 128 (nope) + 64 (rope)`` — and the score is the sum of the parts' dots. **Prefill backward**
(FlashAttention-2): a dk/dv kernel per key block walking the query blocks and a dq kernel per query
block walking the key blocks, both recomputing ``p`` from the saved log-sum-exp.

**Decode** (absorbed, split-KV): one program per ``(batch, head block, split)`` attends a block of
heads to its split of the latent page pool: pages come through the block table, the score is
``q_lat·c_kvᵀ + q_rope·k_ropeᵀ`` (``576 = 512 + 64``), ``c_kv`` pages are read once per head block
and serve as both keys and values (MQA-like). Output: the split's normalised latent output and
log-sum-exp; ``ops.decode`` combines the splits.

Inputs arrive padded by ``ops.py`` (sequence to the block, dims to powers of 2 ≥ 16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG = -1e30


def _online(m, l, acc, s, mask, v):
    """One online-softmax step: scores ``s [M, N]`` (masked by ``mask``) against values ``v [N, Dv]``."""
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(axis=-1)
    acc = acc * corr[:, None] + jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc


def _finish(m, l, acc):
    ok = l > 0
    o = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0)
    return o, jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG)


# ---- prefill ---------------------------------------------------------------------------------------
def _prefill_kernel(*refs, n_parts: int, scale: float, causal: bool, block_q: int, block_k: int):
    q_refs, k_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref = refs[2 * n_parts:]
    i = pl.program_id(2)
    seq = k_refs[0].shape[0]
    qs = [r[...] for r in q_refs]                                    # [BQ, Dpart] each
    q_seg = qseg_ref[...]                                            # [BQ]
    q_pos = i * block_q + jnp.arange(block_q)
    n_blocks = pl.cdiv((i + 1) * block_q, block_k) if causal else seq // block_k

    def body(j, carry):
        m, l, acc = carry
        ks = pl.ds(j * block_k, block_k)
        s = sum(jax.lax.dot_general(q, kr[ks, :], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                for q, kr in zip(qs, k_refs)) * scale                # [BQ, BK]
        mask = q_seg[:, None] == kvseg_ref[ks][None, :]
        if causal:
            mask = mask & ((j * block_k + jnp.arange(block_k))[None, :] <= q_pos[:, None])
        return _online(m, l, acc, s, mask, v_ref[ks, :])

    dv = v_ref.shape[-1]
    init = (jnp.full((block_q,), NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, dv), jnp.float32))
    o, lse = _finish(*jax.lax.fori_loop(0, n_blocks, body, init))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k", "interpret",
                                             "num_warps", "num_stages"))
def prefill_fwd(q_parts, k_parts, v, q_seg, kv_seg, *, scale: float, causal: bool, block_q: int = 64,
                block_k: int = 64, interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """q/k parts ``[B, H, Sp, D_i]`` (power-of-2 ``D_i``), v ``[B, H, Sp, Dv]``, segments ``[B, Sp]``
    → ``(o [B, H, Sp, Dv] v.dtype, lse [B, H, Sp] fp32)``."""
    b, h, sp, dv = v.shape
    assert sp % block_q == 0 and sp % block_k == 0
    n = len(q_parts)
    q_specs = [pl.BlockSpec((None, None, block_q, x.shape[-1]), lambda b_, h_, i: (b_, h_, i, 0)) for x in q_parts]
    k_specs = [pl.BlockSpec((None, None, sp, x.shape[-1]), lambda b_, h_, i: (b_, h_, 0, 0)) for x in k_parts]
    return pl.pallas_call(
        functools.partial(_prefill_kernel, n_parts=n, scale=scale, causal=causal, block_q=block_q, block_k=block_k),
        grid=(b, h, sp // block_q),
        in_specs=q_specs + k_specs + [
            pl.BlockSpec((None, None, sp, dv), lambda b_, h_, i: (b_, h_, 0, 0)),
            pl.BlockSpec((None, block_q), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, block_q, dv), lambda b_, h_, i: (b_, h_, i, 0)),
                   pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct((b, h, sp, dv), v.dtype), jax.ShapeDtypeStruct((b, h, sp), jnp.float32)],
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="mla_flash_prefill",
    )(*q_parts, *k_parts, v, q_seg, kv_seg)


# ---- prefill backward (FlashAttention-2: one kernel for dk/dv, one for dq) ------------------------------
def _nt(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _probs(q_parts, k_parts, q_seg, kv_seg, q_pos, k_pos, lse, scale, causal):
    s = sum(_nt(q, k) for q, k in zip(q_parts, k_parts)) * scale     # [BQ, BK]
    mask = q_seg[:, None] == kv_seg[None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    return jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)


def _dkdv_kernel(*refs, n_parts: int, scale: float, causal: bool, block_q: int, block_k: int):
    q_refs, k_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref = refs[2 * n_parts:2 * n_parts + 6]
    dk_refs, dv_ref = refs[2 * n_parts + 6:3 * n_parts + 6], refs[3 * n_parts + 6]
    j = pl.program_id(2)
    seq = q_refs[0].shape[0]
    ks = [r[...] for r in k_refs]
    v = v_ref[...]
    kv_seg = kvseg_ref[...]
    k_pos = j * block_k + jnp.arange(block_k)

    def body(i, carry):
        dks, dv = carry
        qs = pl.ds(i * block_q, block_q)
        q_parts = [r[qs, :] for r in q_refs]
        do = do_ref[qs, :]
        p = _probs(q_parts, ks, qseg_ref[qs], kv_seg, i * block_q + jnp.arange(block_q), k_pos, lse_ref[qs],
                   scale, causal)                                       # [BQ, BK]
        dv = dv + _tn(p.astype(do.dtype), do)
        ds = (p * (_nt(do, v) - delta_ref[qs][:, None]) * scale).astype(q_parts[0].dtype)
        return [dk + _tn(ds, q) for dk, q in zip(dks, q_parts)], dv

    first = jax.lax.div(j * block_k, block_q) if causal else 0
    init = ([jnp.zeros(k.shape, jnp.float32) for k in ks], jnp.zeros(v.shape, jnp.float32))
    dks, dv = jax.lax.fori_loop(first, seq // block_q, body, init)
    for r, dk in zip(dk_refs, dks):
        r[...] = dk.astype(r.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, n_parts: int, scale: float, causal: bool, block_q: int, block_k: int):
    q_refs, k_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref = refs[2 * n_parts:2 * n_parts + 6]
    dq_refs = refs[2 * n_parts + 6:]
    i = pl.program_id(2)
    seq = k_refs[0].shape[0]
    qs = [r[...] for r in q_refs]
    do, lse, delta, q_seg = do_ref[...], lse_ref[...], delta_ref[...], qseg_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)

    def body(j, dqs):
        ks_ = pl.ds(j * block_k, block_k)
        k_parts = [r[ks_, :] for r in k_refs]
        p = _probs(qs, k_parts, q_seg, kvseg_ref[ks_], q_pos, j * block_k + jnp.arange(block_k), lse, scale, causal)
        ds = (p * (_nt(do, v_ref[ks_, :]) - delta[:, None]) * scale).astype(qs[0].dtype)
        return [dq + jax.lax.dot(ds, k, preferred_element_type=jnp.float32) for dq, k in zip(dqs, k_parts)]

    n_blocks = pl.cdiv((i + 1) * block_q, block_k) if causal else seq // block_k
    dqs = jax.lax.fori_loop(0, n_blocks, body, [jnp.zeros(q.shape, jnp.float32) for q in qs])
    for r, dq in zip(dq_refs, dqs):
        r[...] = dq.astype(r.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k", "interpret",
                                             "num_warps", "num_stages"))
def prefill_bwd(q_parts, k_parts, v, q_seg, kv_seg, do, lse, delta, *, scale: float, causal: bool,
                block_q: int = 64, block_k: int = 64, interpret: bool = False, num_warps: int = 4,
                num_stages: int = 2):
    """Gradients of ``prefill_fwd``: ``do [B, H, Sp, Dv]``, ``lse`` and ``delta = rowsum(do∘o)``
    ``[B, H, Sp]`` fp32 → ``(dq parts, dk parts, dv)``. dk/dv: one program per key block walking the
    query blocks (from the diagonal when causal); dq: one program per query block walking the key
    blocks (up to the diagonal). Scores are recomputed from ``lse``; nothing ``O(S²)`` is stored."""
    b, h, sp, dv = v.shape
    n = len(q_parts)
    kw = dict(n_parts=n, scale=scale, causal=causal, block_q=block_q, block_k=block_k)
    full = lambda d: pl.BlockSpec((None, None, sp, d), lambda b_, h_, x: (b_, h_, 0, 0))  # noqa: E731
    full_row = pl.BlockSpec((None, None, sp), lambda b_, h_, x: (b_, h_, 0))
    args = (*q_parts, *k_parts, v, do, lse, delta, q_seg, kv_seg)
    params = _compiler_params(num_warps, num_stages)

    kblk = lambda d: pl.BlockSpec((None, None, block_k, d), lambda b_, h_, j: (b_, h_, j, 0))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_dkdv_kernel, **kw),
        grid=(b, h, sp // block_k),
        in_specs=[full(x.shape[-1]) for x in q_parts] + [kblk(x.shape[-1]) for x in k_parts] + [
            kblk(dv), full(dv), full_row, full_row,
            pl.BlockSpec((None, sp), lambda b_, h_, j: (b_, 0)),
            pl.BlockSpec((None, block_k), lambda b_, h_, j: (b_, j))],
        out_specs=[kblk(x.shape[-1]) for x in k_parts] + [kblk(dv)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in k_parts] + [jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="mla_flash_prefill_dkdv",
    )(*args)
    dk_parts, dv_ = out[:n], out[n]

    qblk = lambda d: pl.BlockSpec((None, None, block_q, d), lambda b_, h_, i: (b_, h_, i, 0))  # noqa: E731
    qrow = pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i))
    dq_parts = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(b, h, sp // block_q),
        in_specs=[qblk(x.shape[-1]) for x in q_parts] + [full(x.shape[-1]) for x in k_parts] + [
            full(dv), qblk(dv), qrow, qrow,
            pl.BlockSpec((None, block_q), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, sp), lambda b_, h_, i: (b_, 0))],
        out_specs=[qblk(x.shape[-1]) for x in q_parts],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in q_parts],
        compiler_params=params, interpret=interpret, name="mla_flash_prefill_dq",
    )(*args)
    return list(dq_parts), list(dk_parts), dv_


# ---- decode ----------------------------------------------------------------------------------------
def _decode_kernel(ql_ref, qr_ref, ckv_ref, kr_ref, bt_ref, len_ref, o_ref, lse_ref, *, scale: float,
                   pages_per_block: int):
    s_idx = pl.program_id(2)
    bh, lat = ql_ref.shape
    page = ckv_ref.shape[1]
    pages_per_split = bt_ref.shape[0]
    bk = pages_per_block * page
    length = len_ref[0]
    first = s_idx * pages_per_split                                   # global page index of this split
    n_pages = jnp.clip(pl.cdiv(length, page) - first, 0, pages_per_split)
    q_lat, q_rope = ql_ref[...], qr_ref[...]

    def body(t, carry):
        m, l, acc = carry
        pages = bt_ref[pl.ds(t * pages_per_block, pages_per_block)]
        c = ckv_ref[pages].reshape(bk, lat)                          # [BK, L]: keys and values
        r = kr_ref[pages].reshape(bk, kr_ref.shape[-1])             # [BK, R]
        s = (jax.lax.dot_general(q_lat, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
             + jax.lax.dot_general(q_rope, r, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)) * scale
        pos = (first + t * pages_per_block) * page + jnp.arange(bk)
        mask = jnp.broadcast_to((pos < length)[None, :], (bh, bk))
        return _online(m, l, acc, s, mask, c)

    init = (jnp.full((bh,), NEG, jnp.float32), jnp.zeros((bh,), jnp.float32), jnp.zeros((bh, lat), jnp.float32))
    o, lse = _finish(*jax.lax.fori_loop(0, pl.cdiv(n_pages, pages_per_block), body, init))
    o_ref[...] = o
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "block_h", "pages_per_block", "interpret",
                                             "num_warps", "num_stages"))
def decode_partial(q_lat, q_rope, ckv_pool, krope_pool, block_table, lengths, *, scale: float, num_splits: int,
                   block_h: int, pages_per_block: int, interpret: bool = False, num_warps: int = 4,
                   num_stages: int = 2):
    """q_lat ``[B, Hp, L]``, q_rope ``[B, Hp, R]``, pools ``[P, page, L|R]``, block_table
    ``[B, num_splits·pages_per_split]`` (valid page ids), lengths ``[B]`` →
    ``(o [B, n, Hp, L] fp32, lse [B, n, Hp] fp32)``."""
    b, hp, lat = q_lat.shape
    rope = q_rope.shape[-1]
    n_pool, page, _ = ckv_pool.shape
    pps = block_table.shape[1] // num_splits
    assert hp % block_h == 0 and pps % pages_per_block == 0
    bt = block_table.reshape(b, num_splits, pps)
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, pages_per_block=pages_per_block),
        grid=(b, hp // block_h, num_splits),
        in_specs=[
            pl.BlockSpec((None, block_h, lat), lambda b_, h_, s_: (b_, h_, 0)),
            pl.BlockSpec((None, block_h, rope), lambda b_, h_, s_: (b_, h_, 0)),
            pl.BlockSpec((n_pool, page, lat), lambda b_, h_, s_: (0, 0, 0)),
            pl.BlockSpec((n_pool, page, rope), lambda b_, h_, s_: (0, 0, 0)),
            pl.BlockSpec((None, None, pps), lambda b_, h_, s_: (b_, s_, 0)),
            pl.BlockSpec((None, 1), lambda b_, h_, s_: (b_, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, block_h, lat), lambda b_, h_, s_: (b_, s_, h_, 0)),
                   pl.BlockSpec((None, None, block_h), lambda b_, h_, s_: (b_, s_, h_))],
        out_shape=[jax.ShapeDtypeStruct((b, num_splits, hp, lat), jnp.float32),
                   jax.ShapeDtypeStruct((b, num_splits, hp), jnp.float32)],
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="mla_absorbed_decode",
    )(q_lat, q_rope, ckv_pool, krope_pool, bt, lengths.reshape(b, 1).astype(jnp.int32))


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
