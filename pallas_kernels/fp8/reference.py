"""Reference (plain jnp) FP8 quantisation and block-scaled GEMM: the specification (docs/architecture.md §6).

Everything the Pallas kernels compute is defined here; they are tested against these functions.

Conventions (release format, ``checkpoint/fp8.py``): an FP8 tensor is a pair ``(q, scale)`` with
``q`` float8_e4m3fn of the *unpadded* shape and ``scale`` float32, one per tile, such that the real
value is ``q * scale`` (``scale`` plays the role of the checkpoint's ``weight_scale_inv``).

* activations / gradients: **1×128** tiles along the last (contraction) dim: ``x [..., K]`` →
  ``scale [..., ceil(K/128)]``;
* weights: **128×128** blocks of ``w [N, K]`` (``[out, in]``) → ``scale [ceil(N/128), ceil(K/128)]``.

``scale = max(amax, 1e-4) / 448`` (optionally rounded up to a power of two), ``q = x / scale``
saturated to ±448. NaN is ignored when taking amax, so a NaN stays where it was (as in an fp32
GEMM) instead of poisoning its whole tile; ±inf makes its tile's scale inf, and the tile
dequantises to NaN at the inf and 0 elsewhere, so the affected GEMM outputs are non-finite.

The GEMM ``matmul_rowscaled`` is the single numerical definition: for each 128-wide block ``k`` of
the contraction, the partial product of the FP8 operands is formed exactly (e4m3 products are exact
in bf16/fp32 inputs) with fp32 accumulation, promoted and scaled — ``acc += (P_k * a_s[:, k]) *
b_s[:, k]`` — every 128 elements of K (docs/architecture.md §6, "higher-precision accumulation").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 128
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_MIN = 1e-4  # docs/architecture.md §6


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pad ``axis`` of ``x`` up to a multiple of ``multiple``."""
    n = x.shape[axis]
    extra = cdiv(n, multiple) * multiple - n
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def compute_scale(amax: jax.Array, pow2: bool = False) -> jax.Array:
    """``max(amax, 1e-4) / 448``; with ``pow2`` rounded up to the next power of two (so ``x/scale``
    is exact in the exponent and still ≤ 448)."""
    scale = jnp.maximum(amax.astype(jnp.float32), AMAX_MIN) / E4M3_MAX
    if pow2:
        scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
    return scale


def cast_e4m3(y: jax.Array) -> jax.Array:
    """Saturating cast to e4m3 (float8_e4m3fn has no inf: out-of-range would become NaN)."""
    return jnp.clip(y, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _amax(x: jax.Array, axes) -> jax.Array:
    return jnp.max(jnp.where(jnp.isnan(x), 0.0, jnp.abs(x)), axis=axes)


@functools.partial(jax.jit, static_argnames=("pow2_scale",))
def quantize_activation(x: jax.Array, *, pow2_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x [..., K]`` → ``(q e4m3 [..., K], scale f32 [..., ceil(K/128)])``, 1×128 tiles along K."""
    k = x.shape[-1]
    xf = pad_axis(x.astype(jnp.float32), -1, BLOCK)
    tiles = xf.reshape(*xf.shape[:-1], -1, BLOCK)
    scale = compute_scale(_amax(tiles, -1), pow2_scale)
    q = cast_e4m3(tiles / scale[..., None]).reshape(xf.shape)[..., :k]
    return q, scale


@functools.partial(jax.jit, static_argnames=("pow2_scale",))
def quantize_weight(w: jax.Array, *, pow2_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """``w [N, K]`` (``[out, in]``) → ``(q e4m3 [N, K], scale f32 [ceil(N/128), ceil(K/128)])``,
    128×128 blocks — the released checkpoint's format."""
    n, k = w.shape
    wf = pad_axis(pad_axis(w.astype(jnp.float32), 0, BLOCK), 1, BLOCK)
    nb, kb = wf.shape[0] // BLOCK, wf.shape[1] // BLOCK
    blocks = wf.reshape(nb, BLOCK, kb, BLOCK)
    scale = compute_scale(_amax(blocks, (1, 3)), pow2_scale)
    q = cast_e4m3(blocks / scale[:, None, :, None]).reshape(wf.shape)[:n, :k]
    return q, scale


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_activation(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    k = q.shape[-1]
    s = jnp.repeat(scale, BLOCK, axis=-1)[..., :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_weight(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    n, k = q.shape
    s = jnp.repeat(jnp.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:n, :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


def to_bits(q: jax.Array) -> jax.Array:
    """e4m3 → its uint8 bits, for custom_vjp residuals: jax 0.10 returns NaN primal outputs when a
    float8 residual passes through ``jax.checkpoint`` with a save-anything policy (the model's
    default remat); the same bytes as uint8 are handled correctly. ``from_bits`` undoes it."""
    return jax.lax.bitcast_convert_type(q, jnp.uint8)


def from_bits(b: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(b, E4M3)


def weight_scale_rows(ws: jax.Array, n: int) -> jax.Array:
    """Block scales ``[ceil(N/128), Kb]`` → one row per output ``[N, Kb]`` (each row of a 128×128
    block shares its block's scale), the form the GEMM kernels take for both operands."""
    return jnp.repeat(ws, BLOCK, axis=0)[:n]


_BATCHED_MAX = 1 << 22  # Kb·M·N elements (16 MiB of fp32 partials) below which the K blocks are batched


def _upcast_dtype():
    # e4m3 values (4-bit significand, exponent in [-9, 8]) are exact in bf16 and fp32, so their
    # products are exact either way; fp32 is the faster XLA:CPU dot, bf16 the native MXU/tensor-core one.
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def matmul_rowscaled(aq: jax.Array, a_s: jax.Array, bq: jax.Array, b_s: jax.Array,
                     out_dtype=jnp.float32) -> jax.Array:
    """``(aq·a_s) @ (bq·b_s).T`` with per-K-block fp32 promotion and scaling.

    aq ``[M, K]``, bq ``[N, K]`` e4m3 (K-major, i.e. both contract their last dim);
    a_s ``[M, Kb]``, b_s ``[N, Kb]`` f32 with ``Kb = ceil(K/128)`` → ``[M, N]`` ``out_dtype``.
    """
    m, k = aq.shape
    n = bq.shape[0]
    kb = cdiv(k, BLOCK)
    assert bq.shape[1] == k and a_s.shape == (m, kb) and b_s.shape == (n, kb), (aq.shape, a_s.shape, bq.shape, b_s.shape)
    up = _upcast_dtype()
    a = pad_axis(aq, 1, BLOCK).astype(up).reshape(m, kb, BLOCK).transpose(1, 0, 2)  # [Kb, M, 128]
    b = pad_axis(bq, 1, BLOCK).astype(up).reshape(n, kb, BLOCK).transpose(1, 0, 2)  # [Kb, N, 128]

    a_s = a_s.astype(jnp.float32)
    b_s = b_s.astype(jnp.float32)
    if kb * m * n <= _BATCHED_MAX:
        # Small problems: all K-block partials at once (one batched dot; no loop to compile).
        part = jax.lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32,
                                   precision=jax.lax.Precision.HIGHEST)            # [Kb, M, N]
        return jnp.sum((part * a_s.T[:, :, None]) * b_s.T[:, None, :], axis=0).astype(out_dtype)

    def step(acc, blk):
        a_k, b_k, as_k, bs_k = blk
        part = jax.lax.dot_general(a_k, b_k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                   precision=jax.lax.Precision.HIGHEST)
        return acc + (part * as_k[:, None]) * bs_k[None, :], None

    acc0 = jnp.zeros((m, n), jnp.float32)
    acc, _ = jax.lax.scan(step, acc0, (a, b, a_s.T, b_s.T))
    return acc.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def matmul(xq: jax.Array, xs: jax.Array, wq: jax.Array, ws: jax.Array, out_dtype=jnp.bfloat16) -> jax.Array:
    """``x @ w.T`` for an activation ``x [M, K]`` (1×128 scales ``[M, Kb]``) and a weight
    ``w [N, K]`` (128×128 scales ``[ceil(N/128), Kb]``) → ``[M, N]``."""
    return matmul_rowscaled(xq, xs, wq, weight_scale_rows(ws, wq.shape[0]), out_dtype)
