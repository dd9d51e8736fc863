"""Building blocks shared by the model: parameters with logical axes, linear maps, RMSNorm, SwiGLU.

Every parameter carries logical axis names (docs/design.md §Logical axes on every parameter);
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
    """Aux-loss-free balancing bias ``b`` (docs/architecture.md §4): used only to choose experts, updated by
    the training loop from global expert loads, never by the optimizer (it is not an ``nnx.Param``)."""


def fp8_param(shape: Sequence[int], n_lead: int, n_in: int, axes: Sequence[str | None]) -> nnx.Param:
    """A weight stored as the release stores it (``fp8_weights``, docs/architecture.md §6): a ``QuantArray`` of e4m3
    values ``[*lead, *in, *out]`` and 128×128 block scales, as one parameter with the values' logical
    axes (the scales shard along the leading expert axes only; ``sharding.Rules`` knows)."""
    return nnx.Param(fp8.QuantArray.zeros(shape, n_lead, n_in), out_sharding=tuple(axes), eager_sharding=False)


def as_float(w: jax.Array | fp8.QuantArray, dtype) -> jax.Array:
    """A stored weight as a float array of ``dtype`` (FP8 storage dequantised block by block)."""
    return w.dequantize(dtype) if isinstance(w, fp8.QuantArray) else w.astype(dtype)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float,
          dtype: str = "float32", init: str = "normal") -> nnx.Param:
    """An ``nnx.Param`` initialised N(0, std²) (docs/architecture.md §8: std 0.006) or to ones, tagged with logical axes."""
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
        if cfg.fp8_weights:  # release-format storage (docs/architecture.md §6), e.g. from `convert --keep-fp8`
            self.kernel = fp8_param(self.in_shape + self.out_shape, 0, len(self.in_shape), axes)
        else:
            self.kernel = param(rngs, self.in_shape + self.out_shape, axes, std=cfg.init_std, dtype=cfg.param_dtype)
        self.compute_dtype = dtype_of(rt.compute_dtype)
        self.quant = rt.quant
        self.ex = rt

    def weight(self, dtype=None) -> jax.Array:
        """The kernel as ``dtype`` (FP8 storage dequantised; default: the compute dtype)."""
        return as_float(self.kernel[...], dtype or self.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if self.quant == "fp8":
            # docs/architecture.md §6: FP8 GEMMs, per shard of tokens on a mesh, the weight whole on every shard (its wgrad
            # summed over the mesh). A float master weight is quantized per 128×128 block (forward, dgrad,
            # wgrad in FP8); stored FP8 blocks (QuantArray) are used as stored, as DeepSeek's inference does.
            ex = self.ex
            k, n = math.prod(self.in_shape), math.prod(self.out_shape)
            w = self.kernel[...]
            w = w.as_matrix() if isinstance(w, fp8.QuantArray) else w.reshape(k, n)
            lin = lambda x2, w: fp8.linear(x2, w, backend=ex.fp8_backend, interpret=ex.interpret)  # noqa: E731
            x2 = x.astype(self.compute_dtype).reshape(-1, k)
            y = per_shard(lin, ex.mesh, ex.rules, (("batch", None), None), ("batch", None))(x2, w)
            return y.reshape(*x.shape[:x.ndim - n_in], *self.out_shape)
        return jax.lax.dot_general(x.astype(self.compute_dtype), self.weight(),
                                   ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale``, computed in fp32 (as the reference implementations).
    ``eps``: ``cfg.rms_norm_eps`` unless given (the MLA latent norms fix it: docs/architecture.md §2)."""

    def __init__(self, dim: int, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs, axis_name: str = "norm",
                 eps: float | None = None):
        self.scale = param(rngs, (dim,), (axis_name,), std=0.0, dtype=cfg.param_dtype, init="ones")
        self.eps = cfg.rms_norm_eps if eps is None else eps
        self.compute_dtype = dtype_of(rt.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return checkpoint_name((self.scale[...].astype(jnp.float32) * xf).astype(self.compute_dtype), "norm")


class MLP(nnx.Module):
    """SwiGLU FFN ``W2(silu(W1 x) * W3 x)`` (docs/architecture.md §4): dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs):
        self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), cfg, rt, rngs)
        self.up_proj = Linear(dim, hidden, ("embed", "mlp"), cfg, rt, rngs)
        self.down_proj = Linear(hidden, dim, ("mlp", "embed"), cfg, rt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
