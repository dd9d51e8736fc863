"""FP8 grouped GEMM for routed experts on the block-padded layout (docs/architecture.md §6).

Rows sorted by expert are padded to blocks of ``B`` rows, each block owned by one expert
(``dsv3_jax.model.grouped_gemm.BlockLayout``). ``grouped_linear(xb, w, block_expert)`` computes
``y[b] = xb[b] @ w[block_expert[b]]`` with all three GEMMs in FP8, like ``ops.linear``:

* forward: ``xb`` in 1×128 tiles along K, each expert's ``w[e].T`` in 128×128 blocks;
* dgrad: the gradient in 1×128 tiles along N × the same weight blocks transposed;
* wgrad: per block, activation (dequantised from its FP8 residual) and gradient re-tiled 1×128
  along the block's rows (tokens, the contraction) and the per-block fp32 products summed per expert.

Each block's GEMM is the single-matrix op (``ops.gemm_rowscaled``), mapped over blocks with the block's
expert weights gathered in FP8. This is the reference formulation (memory ``NB·N·K`` bytes for the
gathered weights, ``NB·K·N`` fp32 for the per-block weight gradients, as the bf16 blocked path);
a grouped Pallas kernel that indexes the expert per block instead of gathering is future work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import reference as ref
from .ops import gemm_rowscaled, resolve_backend


def _block_gemm(aq, a_s, bq, b_s, out_dtype, backend, interpret):
    f = functools.partial(gemm_rowscaled, out_dtype=out_dtype, backend=backend, interpret=interpret)
    return jax.vmap(f)(aq, a_s, bq, b_s)


def _rows(ws, n):  # [NB, Nb, Kb] block scales → [NB, N, Kb] per-row scales
    return jax.vmap(lambda s: ref.weight_scale_rows(s, n))(ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _grouped(xb, w, block_expert, out_dtype, backend, interpret, pow2_scale):
    return _grouped_fwd(xb, w, block_expert, out_dtype, backend, interpret, pow2_scale)[0]


def _grouped_fwd(xb, w, block_expert, out_dtype, backend, interpret, pow2_scale):
    xq, xs = ref.quantize_activation(xb, pow2_scale=pow2_scale)                       # [NB, B, K]
    wq, ws = jax.vmap(lambda m: ref.quantize_weight(m, pow2_scale=pow2_scale))(jnp.swapaxes(w, 1, 2))  # [E, N, K]
    wq_b, ws_b = wq[block_expert], ws[block_expert]
    y = _block_gemm(xq, xs, wq_b, _rows(ws_b, wq.shape[1]), out_dtype, backend, interpret)
    return y, (ref.to_bits(xq), xs, ref.to_bits(wq), ws, block_expert, jnp.zeros((0,), xb.dtype),
               jnp.zeros((0,), w.dtype))


def _grouped_bwd(out_dtype, backend, interpret, pow2_scale, res, dy):
    xq, xs, wq, ws, block_expert, x_like, w_like = res
    xq, wq = ref.from_bits(xq), ref.from_bits(wq)
    num_experts, k = wq.shape[0], xq.shape[-1]
    dyq, dys = ref.quantize_activation(dy, pow2_scale=pow2_scale)                     # along N
    wq_b, ws_b = wq[block_expert], ws[block_expert]
    dx = _block_gemm(dyq, dys, jnp.swapaxes(wq_b, 1, 2), _rows(jnp.swapaxes(ws_b, 1, 2), k),
                     x_like.dtype, backend, interpret)
    x_t = jnp.swapaxes(ref.dequantize_activation(xq, xs), 1, 2)                       # [NB, K, B]
    xtq, xts = ref.quantize_activation(x_t, pow2_scale=pow2_scale)                    # along tokens
    dytq, dyts = ref.quantize_activation(jnp.swapaxes(dy, 1, 2), pow2_scale=pow2_scale)
    dw_blocks = _block_gemm(xtq, xts, dytq, dyts, jnp.float32, backend, interpret)    # [NB, K, N]
    dw = jax.ops.segment_sum(dw_blocks, block_expert, num_segments=num_experts)
    return dx, dw.astype(w_like.dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_linear(xb: jax.Array, w: jax.Array, block_expert: jax.Array, *, out_dtype=None,
                   backend: str = "auto", interpret: bool = False, pow2_scale: bool = False) -> jax.Array:
    """``xb [NB, B, K]`` (row blocks, block ``b`` owned by expert ``block_expert[b]``), ``w [E, K, N]``
    (``[in, out]`` per expert) → ``[NB, B, N]``; differentiable in ``xb`` and ``w``, FP8 GEMMs."""
    if xb.ndim != 3 or w.ndim != 3 or xb.shape[-1] != w.shape[1] or block_expert.shape != xb.shape[:1]:
        raise ValueError(f"fp8 grouped_linear: xb {xb.shape}, w {w.shape}, block_expert {block_expert.shape} "
                         "do not fit (want xb [NB, B, K], w [E, K, N], block_expert [NB]).")
    resolve_backend(backend, interpret)
    out_dtype = jnp.dtype(out_dtype or xb.dtype)
    return _grouped(xb, w, block_expert.astype(jnp.int32), out_dtype, backend, bool(interpret), pow2_scale)
