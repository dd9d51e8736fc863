"""Dropless routed-expert SwiGLU for XLA:CPU: expert-major tiles of a fixed capacity, looped until every
row is done (docs/design.md §MoE on CPU).

Rows sorted by expert (``x_sorted: [N, D]``, ``group_sizes: [E]``) are processed in *rounds*: round
``r`` takes rows ``r·C … r·C + C − 1`` of every expert's group into an ``[E, C, D]`` tile (missing rows
read as zeros) and runs the three SwiGLU GEMMs as batched matmuls against the weight stacks as they
are (``[E, D, I]``, no per-block weight gather). The number of rounds, ``ceil(max group / C)``, is a
``while`` loop's trip count decided at run time, so the result is dropless whatever the routing:
balanced routing takes one round of ``E·C ≈ 1.25 N`` rows (``C`` = 1.25 × the mean rows per expert),
a collapsed router more rounds, never a wrong answer.

Why: XLA:CPU runs a batched matmul over per-block gathered weights (the ``blocked`` layout,
``grouped_gemm.BlockLayout``) at about a third of its dense-matmul rate, and that layout computes
``N + E·block`` rows plus the gathered weight copies; an ``[E, C, D] × [E, D, I]`` batched matmul
runs near the dense rate. ``jax.lax.ragged_dot`` (GPU/TPU) is ~100× slower than either on XLA:CPU.

Differentiation is a ``custom_vjp``: a reverse-mode pass through a ``while`` loop is not defined, so the
backward pass is a second loop over the same rounds. The forward saves the two pre-activation
buffers (``[N, I]`` each) so the backward recomputes no GEMM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CAPACITY_FACTOR = 1.25  # tile rows per expert / mean rows per expert: one round for near-balanced routing


def round_capacity(rows: int, n_experts: int) -> int:
    """Static rows per expert in one round: ``CAPACITY_FACTOR`` × the mean, a multiple of 8, ≥ 8."""
    mean = -(-rows // max(1, n_experts))
    return max(8, -(-int(mean * CAPACITY_FACTOR) // 8) * 8)


def _round_rows(starts: jax.Array, sizes: jax.Array, r: jax.Array, cap: int, n: int) -> jax.Array:
    """``[E·C]`` row indices of round ``r`` (``n``, out of range, where an expert has no such row)."""
    rank = r * cap + jnp.arange(cap)[None, :]                                   # [E, C]
    return jnp.where(rank < sizes[:, None], starts[:, None] + rank, n).reshape(-1)


def _tile(buf: jax.Array, rows: jax.Array, n_experts: int) -> jax.Array:
    """``buf[rows]`` as ``[E, C, ·]``, zeros for out-of-range rows."""
    return jnp.take(buf, rows, axis=0, mode="fill", fill_value=0).reshape(n_experts, -1, buf.shape[-1])


def _mm(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def _put(buf: jax.Array, rows: jax.Array, tile: jax.Array) -> jax.Array:
    # every in-range row belongs to exactly one round and one slot; out-of-range writes are dropped
    return buf.at[rows].set(tile.reshape(-1, buf.shape[-1]).astype(buf.dtype), mode="drop")


def _rounds(sizes: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
    starts = jnp.cumsum(sizes) - sizes
    return starts, (jnp.max(sizes) + cap - 1) // cap


def _forward(x, sizes, w_gate, w_up, w_down, cap):
    n, _ = x.shape
    E, inter = w_gate.shape[0], w_gate.shape[-1]
    starts, n_rounds = _rounds(sizes, cap)

    def body(r, carry):
        y, a_buf, b_buf = carry
        rows = _round_rows(starts, sizes, r, cap, n)
        xt = _tile(x, rows, E)
        a = _mm("ecd,edi->eci", xt, w_gate, x.dtype)
        b = _mm("ecd,edi->eci", xt, w_up, x.dtype)
        yt = _mm("eci,eid->ecd", jax.nn.silu(a) * b, w_down, x.dtype)
        return _put(y, rows, yt), _put(a_buf, rows, a), _put(b_buf, rows, b)

    init = (jnp.zeros_like(x), jnp.zeros((n, inter), x.dtype), jnp.zeros((n, inter), x.dtype))
    return jax.lax.fori_loop(0, n_rounds, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def looped_ffn(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               cap: int) -> jax.Array:
    """SwiGLU of each sorted row with its expert's weights: ``x: [N, D]`` sorted by expert,
    ``group_sizes: [E']`` int (``E' ≥ E``: groups past the weight stack's ``E`` — the padding group of
    the expert-parallel path — come out zero), ``w_gate/w_up: [E, D, I]``, ``w_down: [E, I, D]`` →
    ``[N, D]`` in ``x``'s dtype (fp32 accumulation). ``cap``: rows per expert per round (static)."""
    return _forward(x, group_sizes[:w_gate.shape[0]], w_gate, w_up, w_down, cap)[0]


def _fwd(x, group_sizes, w_gate, w_up, w_down, cap):
    sizes = group_sizes[:w_gate.shape[0]]
    y, a_buf, b_buf = _forward(x, sizes, w_gate, w_up, w_down, cap)
    return y, (x, group_sizes, w_gate, w_up, w_down, a_buf, b_buf)


def _bwd(cap, res, ct):
    x, group_sizes, w_gate, w_up, w_down, a_buf, b_buf = res
    sizes = group_sizes[:w_gate.shape[0]]
    n, _ = x.shape
    E = w_gate.shape[0]
    starts, n_rounds = _rounds(sizes, cap)
    f32 = jnp.float32

    def body(r, carry):
        dx, dwg, dwu, dwd = carry
        rows = _round_rows(starts, sizes, r, cap, n)
        xt, g = _tile(x, rows, E), _tile(ct, rows, E)
        a, b = _tile(a_buf, rows, E), _tile(b_buf, rows, E)
        sig = jax.nn.sigmoid(a.astype(f32))
        sa = (a.astype(f32) * sig).astype(x.dtype)                  # silu(a)
        dwd = dwd + jnp.einsum("eci,ecd->eid", sa * b, g, preferred_element_type=f32)
        dh = _mm("ecd,eid->eci", g, w_down, f32)
        db = (dh * sa.astype(f32)).astype(x.dtype)
        # silu'(a) = σ(a)·(1 + a·(1 − σ(a)))
        da = (dh * b.astype(f32) * sig * (1 + a.astype(f32) * (1 - sig))).astype(x.dtype)
        dwg = dwg + jnp.einsum("ecd,eci->edi", xt, da, preferred_element_type=f32)
        dwu = dwu + jnp.einsum("ecd,eci->edi", xt, db, preferred_element_type=f32)
        dxt = (jnp.einsum("eci,edi->ecd", da, w_gate, preferred_element_type=f32)
               + jnp.einsum("eci,edi->ecd", db, w_up, preferred_element_type=f32))
        return _put(dx, rows, dxt), dwg, dwu, dwd

    init = (jnp.zeros_like(x), jnp.zeros(w_gate.shape, f32), jnp.zeros(w_up.shape, f32), jnp.zeros(w_down.shape, f32))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, n_rounds, body, init)
    zero_sizes = np.zeros(group_sizes.shape, jax.dtypes.float0)  # integer input: no cotangent
    return dx, zero_sizes, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


looped_ffn.defvjp(_fwd, _bwd)

__all__ = ["looped_ffn", "round_capacity", "CAPACITY_FACTOR"]
