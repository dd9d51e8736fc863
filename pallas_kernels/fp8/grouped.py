"""FP8 grouped GEMM for routed experts on the block-padded layout (docs/architecture.md §6).

Rows sorted by expert are padded to blocks of ``B`` rows, each block owned by one expert
(``dsv3_jax.model.grouped_gemm.BlockLayout``). ``grouped_linear(xb, w, block_expert)`` computes
``y[b] = xb[b] @ w[block_expert[b]]`` with all three GEMMs in FP8, like ``ops.linear``:

* forward: ``xb`` in 1×128 tiles along K, each expert's weight in 128×128 blocks;
* dgrad: the gradient in 1×128 tiles along N × the same weight blocks transposed;
* wgrad: per block, activation (dequantised from its FP8 residual) and gradient re-tiled 1×128
  along the block's rows (tokens, the contraction) and the per-block fp32 products summed per expert.

The expert stack is quantized once, in its own ``[E, K, N]`` layout (``quantize_experts``): a 128×128
block of ``w[e]`` is the transpose of a block of ``w[e].T``, so this gives bit for bit the FP8 values
and scales ``ops.linear`` makes from ``w[e].T``, without an fp32 transposed copy of the stack (at 671B
XLA kept one for every layer, 9.5 GiB per chip: docs/design.md §Memory at 671B). The GEMMs need ``[N, K]``
blocks in the forward and ``[K, N]`` in dgrad: only the FP8 bytes of a block's own expert are
transposed, per block. A caller that runs many chunks of blocks against the same experts quantizes
once and passes ``quantized=`` (``dsv3_jax.model.grouped_gemm``).

A block whose expert id is ``E`` or more (``block_expert`` past the stack) multiplies by zero weights:
the padding group of a layout (foreign or unused slots) needs no zero expert appended to the stack.

Each block's GEMM is the single-matrix op (``ops.gemm_rowscaled``), mapped over blocks with the block's
expert weights gathered in FP8 (``NB·K·N`` bytes) and a per-block fp32 weight gradient (``NB·K·N·4``);
callers bound ``NB`` by running chunks of blocks.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import reference as ref
from .ops import gemm_rowscaled, resolve_backend


def quantize_experts(w: jax.Array, *, pow2_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """``w [E, K, N]`` (``[in, out]`` per expert) → ``(uint8 bits of e4m3 [E, K, N], fp32 scales
    [E, ceil(K/128), ceil(N/128)])``, 128×128 blocks in the weight's own layout. No gradient flows
    through it (``grouped_linear`` returns the weight gradient to ``w`` itself). The values travel as
    uint8 bits: see ``reference.to_bits``."""
    wq, ws = jax.vmap(lambda m: ref.quantize_weight(m, pow2_scale=pow2_scale))(jax.lax.stop_gradient(w))
    return ref.to_bits(wq), ws


def _block_gemm(aq, a_s, bq, b_s, out_dtype, backend, interpret):
    f = functools.partial(gemm_rowscaled, out_dtype=out_dtype, backend=backend, interpret=interpret)
    return jax.vmap(f)(aq, a_s, bq, b_s)


def _rows(ws, n):  # [NB, Nb, Kb] block scales → [NB, N, Kb] per-row scales
    return jax.vmap(lambda s: ref.weight_scale_rows(s, n))(ws)


def _take(a, idx):
    """``a[idx]`` along the expert axis, zeros for ids past the stack (the padding group)."""
    return jnp.take(a, idx, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _grouped(xb, w, wbits, ws, block_expert, out_dtype, backend, interpret, pow2_scale):
    return _grouped_fwd(xb, w, wbits, ws, block_expert, out_dtype, backend, interpret, pow2_scale)[0]


def _grouped_fwd(xb, w, wbits, ws, block_expert, out_dtype, backend, interpret, pow2_scale):
    # ``w`` (fp32 master) is only where the weight gradient goes: the forward reads its FP8 form.
    xq, xs = ref.quantize_activation(xb, pow2_scale=pow2_scale)                       # [NB, B, K]
    wq_b = jnp.swapaxes(ref.from_bits(_take(wbits, block_expert)), 1, 2)              # [NB, N, K] e4m3
    ws_b = jnp.swapaxes(_take(ws, block_expert), 1, 2)                                # [NB, Nb, Kb]
    y = _block_gemm(xq, xs, wq_b, _rows(ws_b, wq_b.shape[1]), out_dtype, backend, interpret)
    return y, (ref.to_bits(xq), xs, wbits, ws, block_expert, jnp.zeros((0,), xb.dtype),
               jnp.zeros((0,), w.dtype))


def _grouped_bwd(out_dtype, backend, interpret, pow2_scale, res, dy):
    xq, xs, wbits, ws, block_expert, x_like, w_like = res
    xq = ref.from_bits(xq)
    num_experts, k = wbits.shape[0], xq.shape[-1]
    dyq, dys = ref.quantize_activation(dy, pow2_scale=pow2_scale)                     # along N
    # dgrad: dy [B, N] @ w[e].T — the expert's [K, N] FP8 blocks as they are stored
    wq_b, ws_b = ref.from_bits(_take(wbits, block_expert)), _take(ws, block_expert)   # [NB, K, N], [NB, Kb, Nb]
    dx = _block_gemm(dyq, dys, wq_b, _rows(ws_b, k), x_like.dtype, backend, interpret)
    x_t = jnp.swapaxes(ref.dequantize_activation(xq, xs), 1, 2)                       # [NB, K, B]
    xtq, xts = ref.quantize_activation(x_t, pow2_scale=pow2_scale)                    # along tokens
    dytq, dyts = ref.quantize_activation(jnp.swapaxes(dy, 1, 2), pow2_scale=pow2_scale)
    dw_blocks = _block_gemm(xtq, xts, dytq, dyts, jnp.float32, backend, interpret)    # [NB, K, N]
    dw = jax.ops.segment_sum(dw_blocks, block_expert, num_segments=num_experts)       # ids ≥ E dropped
    return dx, dw.astype(w_like.dtype), None, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_linear(xb: jax.Array, w: jax.Array, block_expert: jax.Array, *, out_dtype=None,
                   backend: str = "auto", interpret: bool = False, pow2_scale: bool = False,
                   quantized: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """``xb [NB, B, K]`` (row blocks, block ``b`` owned by expert ``block_expert[b]``; an id ≥ E gives
    zeros), ``w [E, K, N]`` (``[in, out]`` per expert) → ``[NB, B, N]``; differentiable in ``xb`` and
    ``w``, FP8 GEMMs. ``quantized``: ``quantize_experts(w)`` computed once by a caller that makes many
    calls with the same ``w`` (it must be that, with the same ``pow2_scale``)."""
    if xb.ndim != 3 or w.ndim != 3 or xb.shape[-1] != w.shape[1] or block_expert.shape != xb.shape[:1]:
        raise ValueError(f"fp8 grouped_linear: xb {xb.shape}, w {w.shape}, block_expert {block_expert.shape} "
                         "do not fit (want xb [NB, B, K], w [E, K, N], block_expert [NB]).")
    resolve_backend(backend, interpret)
    out_dtype = jnp.dtype(out_dtype or xb.dtype)
    wbits, ws = quantized if quantized is not None else quantize_experts(w, pow2_scale=pow2_scale)
    if wbits.shape != w.shape or ws.shape != (w.shape[0], ref.cdiv(w.shape[1], ref.BLOCK), ref.cdiv(w.shape[2], ref.BLOCK)):
        raise ValueError(f"fp8 grouped_linear: quantized {wbits.shape}, {ws.shape} is not quantize_experts(w) "
                         f"for w {w.shape}.")
    return _grouped(xb, w, wbits, ws, block_expert.astype(jnp.int32), out_dtype, backend, bool(interpret),
                    pow2_scale)
