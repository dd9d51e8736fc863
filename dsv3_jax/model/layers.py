"""Building blocks shared by the model: parameters with logical axes, linear maps, RMSNorm, SwiGLU.

Every parameter carries logical axis names (DESIGN.md "Logical axes on every parameter");
``sharding/rules.py`` maps them to mesh axes, so a layout change is a rules change.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import fp8

from sharding.kernels import per_shard

from ..config import ModelConfig
from .execution import Execution


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias ``b`` (SPEC §4): used only to choose experts, updated by
    the training loop from global expert loads, never by the optimizer (it is not an ``nnx.Param``)."""


class FP8Scale(nnx.Variable):
    """Block scales of an FP8-stored weight (``fp8_weights``, SPEC §6): the weight is ``q * scale``
    per 128×128 block of its flattened ``[in, out]`` matrix (the release's ``weight_scale_inv``,
    transposed with the weight). Not an ``nnx.Param``: FP8 storage is for inference."""


def fp8_storage(shape: Sequence[int], n_lead: int, n_in: int, axes: Sequence[str | None]
                ) -> tuple[nnx.Param, FP8Scale]:
    """An e4m3 weight ``[*lead, *in, *out]`` and its scales ``[*lead, ceil(K/128), ceil(N/128)]``
    (``K``/``N`` the flattened in/out sizes). Leading (expert) axes of the scales shard like the weight's."""
    BLOCK = fp8.BLOCK
    lead, ins, outs = shape[:n_lead], shape[n_lead:n_lead + n_in], shape[n_lead + n_in:]
    kb, nb = -(-math.prod(ins) // BLOCK), -(-math.prod(outs) // BLOCK)
    q = nnx.Param(jnp.zeros(tuple(shape), jnp.float8_e4m3fn), out_sharding=tuple(axes), eager_sharding=False)
    s = FP8Scale(jnp.ones((*lead, kb, nb), jnp.float32), out_sharding=tuple(axes[:n_lead]) + (None, None),
                 eager_sharding=False)
    return q, s


def dequantize_fp8(q: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """``q [*lead, *in, *out]`` e4m3 × block ``scale [*lead, Kb, Nb]`` → ``dtype``, same shape: the
    flattened ``[K, N]`` matrix is ``pallas_kernels.fp8.dequantize_weight``'s 128×128 block layout."""
    n_lead = scale.ndim - 2
    lead = q.shape[:n_lead]
    k = math.prod(q.shape[n_lead:n_lead + n_in])
    deq = lambda q2, s: fp8.dequantize_weight(q2, s, dtype=jnp.dtype(dtype))  # noqa: E731
    for _ in range(n_lead):
        deq = jax.vmap(deq)
    return deq(q.reshape(*lead, k, -1), scale).reshape(q.shape)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float,
          dtype: str = "float32", init: str = "normal") -> nnx.Param:
    """An ``nnx.Param`` initialised N(0, std²) (SPEC §8: std 0.006) or to ones, tagged with logical axes."""
    if init == "ones":
        value = jnp.ones(shape, dtype_of(dtype))
    elif init == "zeros":
        value = jnp.zeros(shape, dtype_of(dtype))
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype_of(dtype))
    # eager_sharding=False: parameters are placed by sharding/rules.py at the jit boundary, not at creation.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """Bias-free ``y = x @ W`` with ``W: [*in_shape, *out_shape]`` (``[in, out]``, the transpose of PyTorch's).

    Multi-dimensional outputs (e.g. ``[heads, head_dim]``) keep the head axis visible for sharding.
    """

    def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int],
                 axes: Sequence[str | None], cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs):
        self.in_shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        self.out_shape = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.fp8_weights = cfg.fp8_weights
        if cfg.fp8_weights:  # release-format storage (SPEC §6), e.g. from `convert --keep-fp8`
            self.kernel, self.kernel_scale = fp8_storage(self.in_shape + self.out_shape, 0, len(self.in_shape), axes)
        else:
            self.kernel = param(rngs, self.in_shape + self.out_shape, axes, std=cfg.init_std, dtype=cfg.param_dtype)
        self.compute_dtype = dtype_of(rt.compute_dtype)
        self.quant = rt.quant
        self.ex = rt

    def weight(self, dtype=None) -> jax.Array:
        """The kernel as ``dtype`` (FP8 storage dequantised; default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.fp8_weights:
            return dequantize_fp8(self.kernel[...], self.kernel_scale[...], len(self.in_shape), dtype)
        return self.kernel[...].astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        k, n = math.prod(self.in_shape), math.prod(self.out_shape)
        if self.fp8_weights and self.quant == "fp8":
            # FP8 inference on the stored weights as released: 1×128 activation tiles × the
            # checkpoint's 128×128 blocks, fp32 promotion per K block (SPEC §6); no re-quantisation.
            ex = self.ex

            def gemm(x2, wq, ws):  # one device's tokens × the stored blocks
                xq, xs = fp8.quantize_activation(x2, backend=ex.fp8_backend, interpret=ex.interpret)
                return fp8.matmul(xq, xs, wq, ws, out_dtype=self.compute_dtype, backend=ex.fp8_backend,
                                  interpret=ex.interpret)
            x2 = x.astype(self.compute_dtype).reshape(-1, k)
            y = per_shard(gemm, ex.mesh, ex.rules, (("batch", None), None, None), ("batch", None))(
                x2, self.kernel[...].reshape(k, n).T, self.kernel_scale[...].T)
            return y.reshape(*x.shape[:x.ndim - n_in], *self.out_shape)
        if self.quant == "fp8":  # SPEC §6: forward, dgrad and wgrad GEMMs in FP8 on the fp32 master weight
            ex = self.ex
            lin = lambda x2, w: fp8.linear(x2, w, backend=ex.fp8_backend, interpret=ex.interpret)  # noqa: E731
            x2 = x.astype(self.compute_dtype).reshape(-1, k)
            # per shard of tokens; the weight whole on every shard (its wgrad is summed over the mesh)
            y = per_shard(lin, ex.mesh, ex.rules, (("batch", None), None), ("batch", None))(
                x2, self.kernel[...].reshape(k, n))
            return y.reshape(*x.shape[:x.ndim - n_in], *self.out_shape)
        return jax.lax.dot_general(x.astype(self.compute_dtype), self.weight(),
                                   ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale``, computed in fp32 (as the reference implementations)."""

    def __init__(self, dim: int, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.scale = param(rngs, (dim,), (axis_name,), std=0.0, dtype=cfg.param_dtype, init="ones")
        self.eps = cfg.rms_norm_eps
        self.compute_dtype = dtype_of(rt.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return checkpoint_name((self.scale[...].astype(jnp.float32) * xf).astype(self.compute_dtype), "norm")


class MLP(nnx.Module):
    """SwiGLU FFN ``W2(silu(W1 x) * W3 x)`` (SPEC §4): dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs):
        self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), cfg, rt, rngs)
        self.up_proj = Linear(dim, hidden, ("embed", "mlp"), cfg, rt, rngs)
        self.down_proj = Linear(hidden, dim, ("mlp", "embed"), cfg, rt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
