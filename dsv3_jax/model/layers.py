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

from ..config import ModelConfig


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias ``b`` (SPEC §4): used only to choose experts, updated by
    the training loop from global expert loads, never by the optimizer (it is not an ``nnx.Param``)."""


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
                 axes: Sequence[str | None], cfg: ModelConfig, rngs: nnx.Rngs):
        self.in_shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        self.out_shape = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.kernel = param(rngs, self.in_shape + self.out_shape, axes, std=cfg.init_std, dtype=cfg.param_dtype)
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.quant = cfg.quant

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if self.quant == "fp8":  # SPEC §6: forward, dgrad and wgrad GEMMs in FP8 on the fp32 master weight
            from pallas_kernels.fp8 import linear as fp8_linear
            k, n = math.prod(self.in_shape), math.prod(self.out_shape)
            y = fp8_linear(x.astype(self.compute_dtype).reshape(*x.shape[:x.ndim - n_in], k),
                           self.kernel[...].reshape(k, n))
            return y.reshape(*y.shape[:-1], *self.out_shape)
        w = self.kernel[...].astype(self.compute_dtype)
        return jax.lax.dot_general(x.astype(self.compute_dtype), w,
                                   ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale``, computed in fp32 (as the reference implementations)."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.scale = param(rngs, (dim,), (axis_name,), std=0.0, dtype=cfg.param_dtype, init="ones")
        self.eps = cfg.rms_norm_eps
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return checkpoint_name((self.scale[...].astype(jnp.float32) * xf).astype(self.compute_dtype), "norm")


class MLP(nnx.Module):
    """SwiGLU FFN ``W2(silu(W1 x) * W3 x)`` (SPEC §4): dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), cfg, rngs)
        self.up_proj = Linear(dim, hidden, ("embed", "mlp"), cfg, rngs)
        self.down_proj = Linear(hidden, dim, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
