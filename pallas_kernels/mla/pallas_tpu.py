"""MLA attention as Pallas TPU (Mosaic) kernels (``blockwise.py`` / ``reference.py`` are the spec).

**Prefill** (flash forward): grid ``(B, H, S/BQ, S/BK)`` with the key axis innermost and sequential;
the running max, denominator and fp32 output accumulator live in VMEM scratch across key steps.
Causal: key blocks above the diagonal are skipped (``pl.when``) and their index map is clamped to
the last needed block, so no DMA is issued for them either. **Prefill backward**: the same
structure twice (dk/dv over grid ``(B, H, key blocks, query blocks)``, dq over
``(B, H, query blocks, key blocks)``), fp32 VMEM accumulators along the sequential axis.

**Decode** (absorbed, split-KV): grid ``(B, splits, pages_per_split)``; the lengths and the block
table are scalar-prefetched into SMEM and the index maps DMA page ``block_table[b, page]`` of the
latent pools straight into VMEM — one page (``[page, 512]`` c_kv + ``[page, 64]`` k_rope) per step,
all heads at once against it (MQA-like). Pages at or past the sequence's length map to its last
valid page (no new DMA) and are skipped.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _precision(*xs):
    """Mosaic contracts bf16/fp8 operands at default precision only; fp32 operands at full fp32 (a
    global ``jax_default_matmul_precision='highest'`` would otherwise ask for fp32 contraction of bf16)."""
    return (jax.lax.Precision.HIGHEST if all(x.dtype == jnp.float32 for x in xs) else jax.lax.Precision.DEFAULT)

NEG = -1e30


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret is True else (interpret or False)


def _online_step(m_sc, l_sc, acc_sc, s, mask, v):
    s = jnp.where(mask, s, NEG)
    m_prev = m_sc[...]                                               # [M, 1]
    m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_sc[...] = l_sc[...] * corr + p.sum(axis=-1, keepdims=True)
    acc_sc[...] = acc_sc[...] * corr + jax.lax.dot(p.astype(v.dtype), v, precision=_precision(v), preferred_element_type=jnp.float32)
    m_sc[...] = m_new


def _finish(m_sc, l_sc, acc_sc, o_ref, lse_ref):
    l = l_sc[...]
    ok = l > 0
    o_ref[...] = jnp.where(ok, acc_sc[...] / jnp.where(ok, l, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(jnp.where(ok, l, 1.0)), NEG)


def _init(m_sc, l_sc, acc_sc):
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


# ---- prefill ---------------------------------------------------------------------------------------
def _prefill_kernel(*refs, n_parts: int, scale: float, causal: bool, block_q: int, block_k: int):
    q_refs, k_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[2 * n_parts:]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        _init(m_sc, l_sc, acc_sc)

    def compute():
        s = sum(jax.lax.dot_general(qr[...], kr[...], (((1,), (1,)), ((), ())), precision=_precision(qr, kr),
                                    preferred_element_type=jnp.float32)
                for qr, kr in zip(q_refs, k_refs)) * scale            # [BQ, BK]
        mask = qseg_ref[...] == kvseg_ref[...]                       # [BQ, 1] == [1, BK]
        if causal:
            q_pos = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
            k_pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            mask = mask & (k_pos <= q_pos)
        _online_step(m_sc, l_sc, acc_sc, s, mask, v_ref[...])

    if causal:
        pl.when(j * block_k < (i + 1) * block_q)(compute)
    else:
        compute()

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        _finish(m_sc, l_sc, acc_sc, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k", "interpret"))
def prefill_fwd(q_parts, k_parts, v, q_seg, kv_seg, *, scale: float, causal: bool, block_q: int = 128,
                block_k: int = 128, interpret=False):
    """Same contract as ``pallas_gpu.prefill_fwd``: → ``(o [B, H, Sp, Dv], lse [B, H, Sp] fp32)``."""
    b, h, sp, dv = v.shape
    assert sp % block_q == 0 and sp % block_k == 0
    n = len(q_parts)

    def kv_block(i, j):  # causal: blocks past the diagonal re-map to the last needed one (no DMA)
        return jnp.minimum(j, jax.lax.div((i + 1) * block_q - 1, block_k)) if causal else j  # lax.div: no sign op

    q_specs = [pl.BlockSpec((None, None, block_q, x.shape[-1]), lambda b_, h_, i, j: (b_, h_, i, 0))
               for x in q_parts]
    k_specs = [pl.BlockSpec((None, None, block_k, x.shape[-1]), lambda b_, h_, i, j: (b_, h_, kv_block(i, j), 0))
               for x in k_parts]
    o, lse = pl.pallas_call(
        functools.partial(_prefill_kernel, n_parts=n, scale=scale, causal=causal, block_q=block_q, block_k=block_k),
        grid=(b, h, sp // block_q, sp // block_k),
        in_specs=q_specs + k_specs + [
            pl.BlockSpec((None, None, block_k, dv), lambda b_, h_, i, j: (b_, h_, kv_block(i, j), 0)),
            pl.BlockSpec((None, block_q, 1), lambda b_, h_, i, j: (b_, i, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b_, h_, i, j: (b_, 0, kv_block(i, j))),
        ],
        out_specs=[pl.BlockSpec((None, None, block_q, dv), lambda b_, h_, i, j: (b_, h_, i, 0)),
                   pl.BlockSpec((None, None, block_q, 1), lambda b_, h_, i, j: (b_, h_, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, h, sp, dv), v.dtype), jax.ShapeDtypeStruct((b, h, sp, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="mla_flash_prefill",
    )(*q_parts, *k_parts, v, q_seg[:, :, None], kv_seg[:, None, :])
    return o, lse[..., 0]


# ---- prefill backward (FlashAttention-2: one kernel for dk/dv, one for dq) ------------------------------
def _nt(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a, b),
                               preferred_element_type=jnp.float32)


def _tn(a, b):
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(a, b),
                               preferred_element_type=jnp.float32)


def _grads_block(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, i, j, *, scale, causal,
                 block_q, block_k):
    """Recomputed ``p`` and ``ds`` ``[BQ, BK]`` of one (query block, key block) pair."""
    s = sum(_nt(qr[...], kr[...]) for qr, kr in zip(q_refs, k_refs)) * scale
    mask = qseg_ref[...] == kvseg_ref[...]
    if causal:
        q_pos = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        k_pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        mask = mask & (k_pos <= q_pos)
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (_nt(do_ref[...], v_ref[...]) - delta_ref[...]) * scale
    return p, ds


def _dkdv_kernel(*refs, n_parts: int, **kw):
    q_refs, k_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref = refs[2 * n_parts:2 * n_parts + 6]
    dk_refs, dv_ref = refs[2 * n_parts + 6:3 * n_parts + 6], refs[3 * n_parts + 6]
    dk_acc, dv_acc = refs[3 * n_parts + 7:4 * n_parts + 7], refs[4 * n_parts + 7]
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        for a in (*dk_acc, dv_acc):
            a[...] = jnp.zeros(a.shape, jnp.float32)

    def compute():
        p, ds = _grads_block(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, i, j, **kw)
        do = do_ref[...]
        dv_acc[...] += _tn(p.astype(do.dtype), do)
        for a, qr in zip(dk_acc, q_refs):
            a[...] += _tn(ds.astype(qr.dtype), qr[...])

    if kw["causal"]:
        pl.when((i + 1) * kw["block_q"] > j * kw["block_k"])(compute)
    else:
        compute()

    @pl.when(i == pl.num_programs(3) - 1)
    def _():
        for r, a in zip((*dk_refs, dv_ref), (*dk_acc, dv_acc)):
            r[...] = a[...].astype(r.dtype)


def _dq_kernel(*refs, n_parts: int, **kw):
    q_refs, k_refs = refs[:n_parts], refs[n_parts:2 * n_parts]
    v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref = refs[2 * n_parts:2 * n_parts + 6]
    dq_refs, dq_acc = refs[2 * n_parts + 6:3 * n_parts + 6], refs[3 * n_parts + 6:]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        for a in dq_acc:
            a[...] = jnp.zeros(a.shape, jnp.float32)

    def compute():
        _, ds = _grads_block(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, i, j, **kw)
        for a, kr in zip(dq_acc, k_refs):
            a[...] += jax.lax.dot(ds.astype(kr.dtype), kr[...], precision=_precision(kr), preferred_element_type=jnp.float32)

    if kw["causal"]:
        pl.when(j * kw["block_k"] < (i + 1) * kw["block_q"])(compute)
    else:
        compute()

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        for r, a in zip(dq_refs, dq_acc):
            r[...] = a[...].astype(r.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k", "interpret"))
def prefill_bwd(q_parts, k_parts, v, q_seg, kv_seg, do, lse, delta, *, scale: float, causal: bool,
                block_q: int = 128, block_k: int = 128, interpret=False):
    """Same contract as ``pallas_gpu.prefill_bwd``. dk/dv: grid ``(B, H, key blocks, query blocks)``,
    fp32 VMEM accumulators across the (sequential) query axis, query blocks above the diagonal skipped
    and their index maps clamped (no DMA); dq: ``(B, H, query blocks, key blocks)`` likewise."""
    b, h, sp, dv = v.shape
    n = len(q_parts)
    kw = dict(scale=scale, causal=causal, block_q=block_q, block_k=block_k)
    nq, nk = sp // block_q, sp // block_k
    seg_q, seg_k = q_seg[:, :, None], kv_seg[:, None, :]
    lse4, delta4 = lse[..., None], delta[..., None]
    args = (*q_parts, *k_parts, v, do, lse4, delta4, seg_q, seg_k)

    # dk/dv: grid (b, h, j, i)
    def qi(j, i):  # causal: query blocks before the diagonal re-map to the first needed one
        return jnp.maximum(i, jax.lax.div(j * block_k, block_q)) if causal else i

    qspec = lambda d: pl.BlockSpec((None, None, block_q, d), lambda b_, h_, j, i: (b_, h_, qi(j, i), 0))  # noqa: E731
    kspec = lambda d: pl.BlockSpec((None, None, block_k, d), lambda b_, h_, j, i: (b_, h_, j, 0))  # noqa: E731
    row = pl.BlockSpec((None, None, block_q, 1), lambda b_, h_, j, i: (b_, h_, qi(j, i), 0))
    out = pl.pallas_call(
        functools.partial(_dkdv_kernel, n_parts=n, **kw),
        grid=(b, h, nk, nq),
        in_specs=[qspec(x.shape[-1]) for x in q_parts] + [kspec(x.shape[-1]) for x in k_parts] + [
            kspec(dv), qspec(dv), row, row,
            pl.BlockSpec((None, block_q, 1), lambda b_, h_, j, i: (b_, qi(j, i), 0)),
            pl.BlockSpec((None, 1, block_k), lambda b_, h_, j, i: (b_, 0, j))],
        out_specs=[kspec(x.shape[-1]) for x in k_parts] + [kspec(dv)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in k_parts] + [jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((block_k, x.shape[-1]), jnp.float32) for x in k_parts]
        + [pltpu.VMEM((block_k, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="mla_flash_prefill_dkdv",
    )(*args)
    dk_parts, dv_ = out[:n], out[n]

    # dq: grid (b, h, i, j)
    def kj(i, j):
        return jnp.minimum(j, jax.lax.div((i + 1) * block_q - 1, block_k)) if causal else j

    qspec2 = lambda d: pl.BlockSpec((None, None, block_q, d), lambda b_, h_, i, j: (b_, h_, i, 0))  # noqa: E731
    kspec2 = lambda d: pl.BlockSpec((None, None, block_k, d), lambda b_, h_, i, j: (b_, h_, kj(i, j), 0))  # noqa: E731
    row2 = pl.BlockSpec((None, None, block_q, 1), lambda b_, h_, i, j: (b_, h_, i, 0))
    dq_parts = pl.pallas_call(
        functools.partial(_dq_kernel, n_parts=n, **kw),
        grid=(b, h, nq, nk),
        in_specs=[qspec2(x.shape[-1]) for x in q_parts] + [kspec2(x.shape[-1]) for x in k_parts] + [
            kspec2(dv), qspec2(dv), row2, row2,
            pl.BlockSpec((None, block_q, 1), lambda b_, h_, i, j: (b_, i, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b_, h_, i, j: (b_, 0, kj(i, j)))],
        out_specs=[qspec2(x.shape[-1]) for x in q_parts],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in q_parts],
        scratch_shapes=[pltpu.VMEM((block_q, x.shape[-1]), jnp.float32) for x in q_parts],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="mla_flash_prefill_dq",
    )(*args)
    return list(dq_parts), list(dk_parts), dv_


# ---- decode ----------------------------------------------------------------------------------------
def _decode_kernel(len_ref, bt_ref, ql_ref, qr_ref, ckv_ref, kr_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                   scale: float, pages_per_split: int):
    b, s_idx, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page = ckv_ref.shape[0]
    length = len_ref[b]
    g = s_idx * pages_per_split + j                                   # global page index

    @pl.when(j == 0)
    def _():
        _init(m_sc, l_sc, acc_sc)

    @pl.when(g * page < length)
    def _():
        c = ckv_ref[...]                                              # [page, L]: keys and values
        s = (jax.lax.dot_general(ql_ref[...], c, (((1,), (1,)), ((), ())), precision=_precision(c),
                                  preferred_element_type=jnp.float32)
             + jax.lax.dot_general(qr_ref[...], kr_ref[...], (((1,), (1,)), ((), ())), precision=_precision(c),
                                   preferred_element_type=jnp.float32)) * scale     # [H, page]
        pos = g * page + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        _online_step(m_sc, l_sc, acc_sc, s, pos < length, c)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        _finish(m_sc, l_sc, acc_sc, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "interpret"))
def decode_partial(q_lat, q_rope, ckv_pool, krope_pool, block_table, lengths, *, scale: float, num_splits: int,
                   interpret=False):
    """Same contract as ``pallas_gpu.decode_partial`` (all heads per program)."""
    b, h, lat = q_lat.shape
    rope = q_rope.shape[-1]
    _, page, _ = ckv_pool.shape
    pps = block_table.shape[1] // num_splits

    def page_of(b_, s_, j, lens, bt):
        last = jnp.maximum(jax.lax.div(lens[b_] + page - 1, page) - 1, 0)   # lengths ≥ 0: truncating div
        return bt[b_, jnp.minimum(s_ * pps + j, last)]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, num_splits, pps),
        in_specs=[
            pl.BlockSpec((None, h, lat), lambda b_, s_, j, lens, bt: (b_, 0, 0)),
            pl.BlockSpec((None, h, rope), lambda b_, s_, j, lens, bt: (b_, 0, 0)),
            pl.BlockSpec((None, page, lat), lambda b_, s_, j, lens, bt: (page_of(b_, s_, j, lens, bt), 0, 0)),
            pl.BlockSpec((None, page, rope), lambda b_, s_, j, lens, bt: (page_of(b_, s_, j, lens, bt), 0, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, h, lat), lambda b_, s_, j, lens, bt: (b_, s_, 0, 0)),
                   pl.BlockSpec((None, None, h, 1), lambda b_, s_, j, lens, bt: (b_, s_, 0, 0))],
        scratch_shapes=[pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                        pltpu.VMEM((h, lat), jnp.float32)],
    )
    o, lse = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, pages_per_split=pps),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, lat), jnp.float32),
                   jax.ShapeDtypeStruct((b, num_splits, h, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="mla_absorbed_decode",
    )(lengths.astype(jnp.int32), block_table.astype(jnp.int32), q_lat, q_rope, ckv_pool, krope_pool)
    return o, lse[..., 0]
