"""Public FP8 ops: quantizers, the block-scaled GEMM, and a differentiable FP8 linear (docs/architecture.md §6).

Every op takes ``backend='auto'|'reference'|'pallas'|'pallas_gpu'|'pallas_tpu'`` and ``interpret``:

* ``auto``: the Pallas Triton kernel on a GPU with FP8 tensor cores (sm_89+), the Pallas Mosaic
  kernel on TPU, the jnp reference elsewhere (CPU, older GPUs).
* ``pallas``: the kernel for this platform; on CPU it needs ``interpret=True`` and runs the GPU
  (Triton) kernel's program in the interpreter. ``pallas_gpu`` / ``pallas_tpu`` name one variant
  (both run on CPU with ``interpret=True``: that is how they are tested).

Quantisation itself is elementwise + a tile max: it is the jnp reference on every backend (XLA
fuses amax, scale and cast into one pass); the backend argument picks the GEMM.

Layouts: ``matmul`` takes the release layout — ``x [.., K]``, ``w [N, K]`` (``[out, in]``) and
computes ``x @ w.T``. ``linear`` takes the model's layout — ``w [K, N]`` (``[in, out]``, like
``dsv3_jax.model.layers.Linear.kernel``) and computes ``x @ w``; it quantizes ``w.T`` (the 128×128
blocks of ``w.T`` are the transposed blocks of ``w``, so the two layouts quantize identically).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ..dispatch import resolve_backend as _resolve
from . import pallas_gpu, pallas_tpu, reference as ref
from .quant_array import QuantArray
from .reference import BLOCK, pad_axis

BACKENDS = ("auto", "reference", "pallas", "pallas_gpu", "pallas_tpu")


def _gpu_has_fp8() -> bool:
    try:
        cc = getattr(jax.devices()[0], "compute_capability", None)
        return cc is not None and tuple(int(c) for c in str(cc).split(".")[:2]) >= (8, 9)
    except Exception:  # pragma: no cover - odd device objects
        return False


def resolve_backend(backend: str, interpret: bool = False, platform: Optional[str] = None) -> str:
    """The concrete GEMM implementation: ``reference``, ``pallas_gpu`` (FP8 tensor cores only) or ``pallas_tpu``."""
    return _resolve(backend, interpret, BACKENDS, gpu_supported=_gpu_has_fp8, platform=platform)


# ---- quantizers -------------------------------------------------------------------------------
def quantize_activation(x: jax.Array, *, pow2_scale: bool = False, backend: str = "auto",
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x [..., K]`` → ``(q e4m3 [..., K], scale f32 [..., ceil(K/128)])``: 1×128 tiles along the
    last (contraction) dim, ``x ≈ q * scale``."""
    resolve_backend(backend, interpret)
    return ref.quantize_activation(x, pow2_scale=pow2_scale)


def quantize_weight(w: jax.Array, *, pow2_scale: bool = False, backend: str = "auto",
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``w [N, K]`` (``[out, in]``) → ``(q e4m3 [N, K], scale f32 [ceil(N/128), ceil(K/128)])``:
    128×128 blocks, the released checkpoint's ``weight`` / ``weight_scale_inv``."""
    resolve_backend(backend, interpret)
    return ref.quantize_weight(w, pow2_scale=pow2_scale)


# ---- GEMM -------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "interpret"))
def gemm_rowscaled(aq, a_s, bq, b_s, *, out_dtype=jnp.float32, backend: str = "auto", interpret: bool = False):
    """``(aq·a_s) @ (bq·b_s).T``; aq ``[M, K]``, bq ``[N, K]`` e4m3, per-row per-K-block scales
    a_s ``[M, Kb]``, b_s ``[N, Kb]`` — the one GEMM behind forward, dgrad and wgrad."""
    impl = resolve_backend(backend, interpret)
    out_dtype = jnp.dtype(out_dtype)
    if impl == "reference":
        return ref.matmul_rowscaled(aq, a_s, bq, b_s, out_dtype)
    m, n = aq.shape[0], bq.shape[0]
    a_s = a_s.astype(jnp.float32)
    b_s = b_s.astype(jnp.float32)
    if impl == "pallas_gpu":
        bm = pallas_gpu.block_m(m)
        aq_p = pad_axis(pad_axis(aq, 0, bm), 1, BLOCK)
        bq_p = pad_axis(pad_axis(bq, 0, pallas_gpu.BN), 1, BLOCK)
        as_t = pad_axis(a_s, 0, bm, 1.0).T
        bs_t = pad_axis(b_s, 0, pallas_gpu.BN, 1.0).T
        out = pallas_gpu.matmul_padded(aq_p, as_t, bq_p, bs_t, out_dtype=out_dtype, bm=bm,
                                       interpret=bool(interpret))
    else:  # pallas_tpu
        kb = a_s.shape[1]
        ks = pallas_tpu.k_steps(kb)
        bm = pallas_tpu.block_m(m)
        np_ = -(-n // 128) * 128
        bn = pallas_tpu.block_n(np_)
        aq_p = pad_axis(pad_axis(aq, 0, bm), 1, BLOCK)
        bq_p = pad_axis(pad_axis(bq, 0, bn), 1, BLOCK)
        as3 = pad_axis(a_s, 0, bm, 1.0).T[:, :, None]
        bs3 = pad_axis(b_s, 0, bn, 1.0).T[:, None, :]
        out = pallas_tpu.matmul_padded(aq_p, as3, bq_p, bs3, out_dtype=out_dtype, bm=bm, bn=bn, ks=ks,
                                       interpret=bool(interpret))
    return out[:m, :n]


def matmul(xq: jax.Array, xs: jax.Array, wq: jax.Array, ws: jax.Array, *, out_dtype=jnp.bfloat16,
           backend: str = "auto", interpret: bool = False) -> jax.Array:
    """``x @ w.T`` from FP8 operands: ``xq [..., K]`` with 1×128 scales ``xs [..., Kb]``, ``wq [N, K]``
    with 128×128 scales ``ws [ceil(N/128), Kb]`` → ``[..., N]`` ``out_dtype``; fp32 accumulation,
    promoted and scaled every 128 elements of K. Any M, N, K (padded inside)."""
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = wq.shape[0]
    kb = -(-k // BLOCK)
    if wq.shape != (n, k) or xs.shape != (*lead, kb) or ws.shape != (-(-n // BLOCK), kb):
        raise ValueError(f"fp8 matmul: shapes do not fit: xq {xq.shape}, xs {xs.shape}, wq {wq.shape}, "
                         f"ws {ws.shape} (want xs [..., {kb}], wq [N, {k}], ws [ceil(N/128), {kb}]).")
    out = gemm_rowscaled(xq.reshape(-1, k), xs.reshape(-1, kb), wq, ref.weight_scale_rows(ws, n),
                         out_dtype=out_dtype, backend=backend, interpret=interpret)
    return out.reshape(*lead, n)


# ---- differentiable linear --------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _linear(x2, w, out_dtype, backend, interpret, pow2_scale):
    return _linear_fwd(x2, w, out_dtype, backend, interpret, pow2_scale)[0]


def _linear_fwd(x2, w, out_dtype, backend, interpret, pow2_scale):
    gemm = functools.partial(gemm_rowscaled, backend=backend, interpret=interpret)
    xq, xs = ref.quantize_activation(x2, pow2_scale=pow2_scale)      # 1×128 along K
    wq, ws = ref.quantize_weight(w.T, pow2_scale=pow2_scale)          # [N, K], 128×128
    y = gemm(xq, xs, wq, ref.weight_scale_rows(ws, wq.shape[0]), out_dtype=out_dtype)
    # Residuals in FP8 (docs/architecture.md §6): the quantized activation and weight (as uint8 bits, see
    # ``reference.to_bits``), plus dtype witnesses.
    return y, (ref.to_bits(xq), xs, ref.to_bits(wq), ws, jnp.zeros((0,), x2.dtype), jnp.zeros((0,), w.dtype))


def _linear_bwd(out_dtype, backend, interpret, pow2_scale, res, dy):
    xq, xs, wq, ws, x_like, w_like = res
    xq, wq = ref.from_bits(xq), ref.from_bits(wq)
    gemm = functools.partial(gemm_rowscaled, backend=backend, interpret=interpret)
    k = xq.shape[1]
    # dgrad: dx [M, K] = dy [M, N] @ W.T — dy in 1×128 tiles along N, the weight's 128×128 blocks
    # transposed ([K, N]); contraction over N.
    dyq, dys = ref.quantize_activation(dy, pow2_scale=pow2_scale)
    dx = gemm(dyq, dys, wq.T, ref.weight_scale_rows(ws.T, k), out_dtype=x_like.dtype)
    # wgrad: dW [K, N] = x.T @ dy — contraction over tokens, so both operands are re-tiled 1×128
    # along M: the FP8 activation is dequantized, transposed and re-quantized (report §3.3).
    xtq, xts = ref.quantize_activation(ref.dequantize_activation(xq, xs).T, pow2_scale=pow2_scale)
    dytq, dyts = ref.quantize_activation(dy.T, pow2_scale=pow2_scale)
    dw = gemm(xtq, xts, dytq, dyts, out_dtype=jnp.float32)
    return dx, dw.astype(w_like.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear(x: jax.Array, w: jax.Array, *, out_dtype=None, backend: str = "auto", interpret: bool = False,
           pow2_scale: bool = False) -> jax.Array:
    """Differentiable FP8 ``x @ w`` with ``x [..., K]`` and ``w [K, N]`` (``[in, out]``, the model's
    Linear layout; pass the fp32 master weight, or a 2-D ``QuantArray`` of stored FP8 blocks, which is
    used as stored — forward only). All three GEMMs (forward, dgrad, wgrad) run in FP8
    with fp32 accumulation; ``dw`` is fp32 (``w.dtype``), ``dx`` is ``x.dtype``. Output dtype
    defaults to ``x.dtype``."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8 linear: x {x.shape} @ w {w.shape} needs w [K={x.shape[-1]}, N].")
    resolve_backend(backend, interpret)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead = x.shape[:-1]
    if isinstance(w, QuantArray):
        # Stored FP8 blocks (e.g. the release's): 1×128 activation tiles × the stored 128×128 blocks,
        # no re-quantization. Inference only: no gradient reaches a QuantArray.
        xq, xs = quantize_activation(jax.lax.stop_gradient(x), pow2_scale=pow2_scale, backend=backend,
                                     interpret=interpret)
        return matmul(xq, xs, w.values.T, w.scale.T, out_dtype=out_dtype, backend=backend, interpret=interpret)
    y = _linear(x.reshape(-1, x.shape[-1]), w, out_dtype, backend, bool(interpret), pow2_scale)
    return y.reshape(*lead, w.shape[1])
