"""Public MLA attention ops (docs/architecture.md §2): ``prefill`` (training / prompt) and ``decode`` (absorbed, latent cache).

Both take ``backend='auto'|'reference'|'blockwise'|'pallas'|'pallas_gpu'|'pallas_tpu'`` and
``interpret`` (same conventions as ``pallas_kernels.fp8``):

* ``auto``: the Pallas Triton kernel on GPU, the Pallas Mosaic kernel on TPU, the jnp reference on CPU.
* ``reference``: ``reference.py`` — the spec (``O(S²)`` scores for prefill; differentiated by autodiff).
* ``blockwise``: flash attention in plain jnp (``blockwise.py``; ``O(S·block)`` memory on any platform).
* ``pallas``: the kernel for this platform; on CPU it needs ``interpret=True`` and runs the GPU
  (Triton) kernel in the interpreter. ``pallas_gpu`` / ``pallas_tpu`` name one variant (both run on
  CPU with ``interpret=True``: that is how they are tested).

Prefill gradients (``blockwise`` and the Pallas backends): a ``custom_vjp`` whose forward saves only
``q, k, v, o`` and the per-row log-sum-exp; the backward recomputes the scores block by block
(FlashAttention-2): with the Pallas backends as two kernels (``prefill_bwd`` in ``pallas_gpu`` /
``pallas_tpu``: dk/dv per key block, dq per query block); with ``blockwise`` in **jnp**
(``blockwise.backward``, a ``lax.scan`` over key blocks).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ..dispatch import resolve_backend as _resolve
from . import blockwise, pallas_gpu, pallas_tpu, reference as ref

BACKENDS = ("auto", "reference", "blockwise", "pallas", "pallas_gpu", "pallas_tpu")


def resolve_backend(backend: str, interpret: bool = False, platform: Optional[str] = None) -> str:
    """The concrete implementation: ``reference``, ``blockwise``, ``pallas_gpu`` or ``pallas_tpu``."""
    return _resolve(backend, interpret, BACKENDS, platform=platform)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def dim_parts(d: int) -> list[tuple[int, int, int]]:
    """Head dim → power-of-2 parts ``(start, size, padded size ≥ 16)`` for the kernels:
    192 → 128 + 64, 576 → 512 + 64, 24 → 16 + 8(→16)."""
    first = 1 << (d.bit_length() - 1)
    parts = [(0, first, max(16, first))]
    if d > first:
        parts.append((first, d - first, max(16, _pow2(d - first))))
    return parts


def _split(x: jax.Array, parts) -> list[jax.Array]:
    return [_pad(x[..., a:a + n], -1, p) for a, n, p in parts]


# ---- prefill -----------------------------------------------------------------------------------------
def _prefill_fwd_impl(qh, kh, vh, q_seg, kv_seg, cfg):
    impl, scale, causal, block, interpret = cfg
    if impl == "blockwise":
        return blockwise.forward(qh, kh, vh, q_seg, kv_seg, scale=scale, causal=causal, block_k=block)
    parts = dim_parts(qh.shape[-1])
    dv = vh.shape[-1]
    vp = _pad(vh, -1, max(16, _pow2(dv)))
    kern = pallas_gpu if impl == "pallas_gpu" else pallas_tpu
    o, lse = kern.prefill_fwd(_split(qh, parts), _split(kh, parts), vp, q_seg, kv_seg, scale=scale,
                              causal=causal, block_q=block, block_k=block, interpret=interpret)
    return o[..., :dv], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(qh, kh, vh, q_seg, kv_seg, cfg):
    return _prefill_fwd_impl(qh, kh, vh, q_seg, kv_seg, cfg)[0]


def _flash_fwd(qh, kh, vh, q_seg, kv_seg, cfg):
    o, lse = _prefill_fwd_impl(qh, kh, vh, q_seg, kv_seg, cfg)
    return o, (qh, kh, vh, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    impl, scale, causal, block, interpret = cfg
    qh, kh, vh, q_seg, kv_seg, o, lse = res
    if impl in ("pallas_gpu", "pallas_tpu"):
        kern = pallas_gpu if impl == "pallas_gpu" else pallas_tpu
        parts = dim_parts(qh.shape[-1])
        d_v = vh.shape[-1]
        dvp = max(16, _pow2(d_v))
        delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
        dq, dk, dv = kern.prefill_bwd(_split(qh, parts), _split(kh, parts), _pad(vh, -1, dvp), q_seg, kv_seg,
                                            _pad(do.astype(vh.dtype), -1, dvp), lse, delta, scale=scale,
                                            causal=causal, block_q=block, block_k=block, interpret=interpret)
        unsplit = lambda xs: jnp.concatenate([x[..., :n] for x, (_, n, _) in zip(xs, parts)], -1)  # noqa: E731
        return unsplit(dq), unsplit(dk), dv[..., :d_v], None, None
    dq, dk, dv = blockwise.backward(qh, kh, vh, q_seg, kv_seg, o, lse, do, scale=scale, causal=causal,
                                    block_k=block)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prefill_block(impl: str, s: int) -> int:
    if impl == "pallas_gpu":   # Triton: power of 2, ≥ 16 (tensor-core M/N)
        return min(64, max(16, _pow2(s)))
    if impl == "pallas_tpu":   # one block for short sequences (block = full dim), else 128 (lanes)
        return 128 if s > 128 else _ceil(s, 8)
    return 128 if s > 128 else _ceil(s, 8)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "backend", "interpret", "block"))
def prefill(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, segment_ids: Optional[jax.Array] = None,
            causal: bool = True, backend: str = "auto", interpret: bool = False,
            block: Optional[int] = None) -> jax.Array:
    """Self-attention over a whole sequence (training and prompt processing).

    q, k ``[B, S, H, Dqk]`` (nope + rope channels; V3: 128 + 64), v ``[B, S, H, Dv]`` → ``[B, S, H, Dv]``
    in ``v.dtype``. fp32 scores, softmax and accumulation; ``segment_ids [B, S]`` keep attention
    inside each packed document (ids equal ⇔ may attend; padding = its own id). Differentiable on every
    backend (see the module doc for how). ``block``: query/key tile (defaults per backend)."""
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"mla.prefill: want q, k [B, S, H, Dqk] and v [B, S, H, Dv]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}.")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"mla.prefill: segment_ids {segment_ids.shape} must be [B, S] = {q.shape[:2]}.")
    impl = resolve_backend(backend, interpret)
    if impl == "reference":
        return ref.prefill_reference(q, k, v, scale=scale, segment_ids=segment_ids, causal=causal)
    b, s = q.shape[:2]
    block = int(block or _prefill_block(impl, s))
    sp = _ceil(s, block)
    seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q_seg = _pad(seg, 1, sp, jnp.iinfo(jnp.int32).min)        # pad rows match nothing ...
    kv_seg = _pad(seg, 1, sp, jnp.iinfo(jnp.int32).max)       # ... and pad keys are matched by nothing
    qh, kh, vh = (_pad(jnp.swapaxes(x, 1, 2), 2, sp) for x in (q, k, v))
    cfg = (impl, float(scale), bool(causal), block, interpret)
    o = _flash(qh, kh, vh, q_seg, kv_seg, cfg)
    return jnp.swapaxes(o[:, :, :s], 1, 2)


# ---- decode ------------------------------------------------------------------------------------------
def default_num_splits(tokens: int, batch: int, *, target_programs: int = 132, min_tokens: int = 256) -> int:
    """Split-KV count: enough programs for the machine (≈ one per H100 SM across the batch), never
    splits shorter than ``min_tokens`` cache positions."""
    by_work = max(1, tokens // min_tokens)
    by_machine = max(1, -(-target_programs // max(batch, 1)))
    return int(max(1, min(by_work, by_machine, 64)))


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "page_size", "backend", "interpret"))
def decode(q_latent: jax.Array, q_rope: jax.Array, ckv_cache: jax.Array, krope_cache: jax.Array, lengths: jax.Array,
           *, scale: float, block_table: Optional[jax.Array] = None, num_splits: Optional[int] = None,
           page_size: int = 64, backend: str = "auto", interpret: bool = False) -> jax.Array:
    """Absorbed MLA decode, one query token per sequence, all heads against the shared latent cache.

    q_latent ``[B, H, L]`` (``q_nope·W_kvb[k_nope]``), q_rope ``[B, H, R]``; caches ``[B, T, L]`` and
    ``[B, T, R]``, or page pools ``[num_pages, page, L|R]`` with ``block_table [B, pages_per_seq]``
    (entries past a sequence's last page are ignored, any value); lengths int ``[B]``: attend to cache
    positions ``< lengths[b]`` (clamped to the capacity). Returns the latent output ``o_lat [B, H, L]``
    in **fp32** (multiply by ``W_kvb[v]`` for the per-head output); a length-0 row gives zeros.

    Split-KV (flash-decoding): the cache is cut into ``num_splits`` chunks (default
    ``default_num_splits``) computed independently (output + log-sum-exp per chunk, fp32), then
    combined (``reference.combine_splits``). ``page_size``: the page a contiguous cache is viewed as
    by the kernels (no copy when it divides ``T``)."""
    b, h, lat = q_latent.shape
    rope = q_rope.shape[-1]
    paged = block_table is not None
    if q_rope.shape[:2] != (b, h) or ckv_cache.shape[-1] != lat or krope_cache.shape[-1] != rope \
            or ckv_cache.shape[:-1] != krope_cache.shape[:-1] or lengths.shape != (b,) \
            or (not paged and ckv_cache.shape[0] != b) or (paged and block_table.shape[0] != b):
        raise ValueError(f"mla.decode: shapes do not fit: q_latent {q_latent.shape}, q_rope {q_rope.shape}, "
                         f"ckv {ckv_cache.shape}, krope {krope_cache.shape}, lengths {lengths.shape}, block_table "
                         f"{None if block_table is None else block_table.shape} (want [B, H, L], [B, H, R], "
                         "[B, T, L] | [P, page, L], [B, T, R] | [P, page, R], [B], [B, pages_per_seq]).")
    impl = resolve_backend(backend, interpret)
    capacity = block_table.shape[1] * ckv_cache.shape[1] if paged else ckv_cache.shape[1]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)
    if impl in ("reference", "blockwise"):
        if not num_splits or num_splits == 1:
            return ref.decode_reference(q_latent, q_rope, ckv_cache, krope_cache, lengths, scale=scale,
                                        block_table=block_table)
        o, lse = ref.decode_partial_reference(q_latent, q_rope, ckv_cache, krope_cache, lengths, scale=scale,
                                              num_splits=num_splits, block_table=block_table)
        return ref.combine_splits(o, lse)

    if paged:
        ckv_pool, kr_pool, bt = ckv_cache, krope_cache, block_table.astype(jnp.int32)
        page = ckv_pool.shape[1]
    else:  # a contiguous cache is a pool whose sequence b owns pages b·n … b·n + n-1
        page = int(page_size)
        tp = _ceil(ckv_cache.shape[1], page)
        n = tp // page
        ckv_pool = _pad(ckv_cache, 1, tp).reshape(b * n, page, lat)
        kr_pool = _pad(krope_cache, 1, tp).reshape(b * n, page, rope)
        bt = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
    if impl == "pallas_gpu" and page & (page - 1):
        raise ValueError(f"mla.decode: the Triton kernel needs a power-of-2 page size, got {page}.")
    if impl == "pallas_tpu" and page % 8:
        raise ValueError(f"mla.decode: the Mosaic kernel needs a page size that is a multiple of 8, got {page}.")
    bt = jnp.clip(bt, 0, ckv_pool.shape[0] - 1)
    splits = int(num_splits or default_num_splits(capacity, b))
    splits = max(1, min(splits, bt.shape[1]))
    if impl == "pallas_gpu":
        ppb = max(1, min(64 // page, _pow2(-(-bt.shape[1] // splits))))    # pages per inner block (≈64 rows)
        pps = _ceil(-(-bt.shape[1] // splits), ppb)
        bt = _pad(bt, 1, pps * splits)                                    # extra entries: past every length
        latp, ropep = max(16, _pow2(lat)), max(16, _pow2(rope))
        block_h = min(64, max(16, _pow2(h)))
        hp = _ceil(h, block_h)
        ql = _pad(_pad(q_latent, -1, latp), 1, hp)
        qr = _pad(_pad(q_rope, -1, ropep), 1, hp)
        o, lse = pallas_gpu.decode_partial(ql, qr, _pad(ckv_pool, -1, latp), _pad(kr_pool, -1, ropep), bt, lengths,
                                           scale=float(scale), num_splits=splits, block_h=block_h,
                                           pages_per_block=ppb, interpret=interpret)
        o, lse = o[:, :, :h, :lat], lse[:, :, :h]
    else:
        pps = -(-bt.shape[1] // splits)
        bt = _pad(bt, 1, pps * splits)
        o, lse = pallas_tpu.decode_partial(q_latent, q_rope, ckv_pool, kr_pool, bt, lengths, scale=float(scale),
                                           num_splits=splits, interpret=interpret)
    return ref.combine_splits(o, lse)
