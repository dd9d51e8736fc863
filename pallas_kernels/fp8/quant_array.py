"""``QuantArray``: a block-FP8 weight as one pytree — e4m3 values and their 128×128 block scales.

The released DeepSeek-V3 stores each linear weight as e4m3 ``[out, in]`` plus ``weight_scale_inv``
``[ceil(out/128), ceil(in/128)]`` (docs/architecture.md §6). The model keeps weights ``[in, out]``
(possibly with leading expert axes and multi-dimensional in/out parts, e.g. ``[heads, head_dim]``),
so a ``QuantArray`` holds

* ``values`` e4m3 ``[*lead, *in, *out]``, the release bits transposed, and
* ``scale``  fp32 ``[*lead, ceil(K/128), ceil(N/128)]`` with ``K = prod(in)``, ``N = prod(out)``:
  the scale of each 128×128 block of the flattened ``[K, N]`` matrix.

Being a pytree, it travels through ``jit``, ``nnx.split``/``merge``, sharding and checkpoints as one
value (an ``nnx.Param`` holds it), and ``linear`` multiplies activations with it directly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from .reference import BLOCK, E4M3, dequantize_weight, quantize_weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray:
    values: jax.Array                                               # e4m3 [*lead, *in, *out]
    scale: jax.Array                                                # fp32 [*lead, Kb, Nb]
    n_in: int = dataclasses.field(default=1, metadata=dict(static=True))  # how many value axes are "in"

    @property
    def n_lead(self) -> int:
        """Leading axes (experts; a stacked ``layers`` axis under ``nnx.vmap``/``scan`` adds one):
        read off the scales, so stacking and slicing a ``QuantArray`` keep it consistent."""
        return self.scale.ndim - 2

    # ---- array-like surface (what code that only looks at shapes needs) -------------------------
    @property
    def shape(self) -> tuple:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index):
        """``w[...]`` is ``w`` (how NNX reads a variable's value); other indexing would cut blocks apart."""
        if index is Ellipsis:
            return self
        raise TypeError("a QuantArray can only be read whole (w[...]); dequantize() it to index it")

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(K, N)``: the flattened in/out sizes the 128×128 blocks tile."""
        s = self.shape
        return math.prod(s[self.n_lead:self.n_lead + self.n_in]), math.prod(s[self.n_lead + self.n_in:])

    @staticmethod
    def scale_shape(shape: Sequence[int], n_lead: int, n_in: int) -> tuple:
        k, n = math.prod(shape[n_lead:n_lead + n_in]), math.prod(shape[n_lead + n_in:])
        return (*shape[:n_lead], -(-k // BLOCK), -(-n // BLOCK))

    @staticmethod
    def scale_axes(axes: Sequence, n_lead: int) -> tuple:
        """Logical axes of the scales for values with logical ``axes`` and ``n_lead`` leading axes
        (experts, and a stacked ``layers`` axis: ``scale.ndim - 2``): those shard like the values';
        the block axes are small and replicated."""
        return tuple(axes[:n_lead]) + (None, None)

    # ---- construction / conversion --------------------------------------------------------------
    @classmethod
    def zeros(cls, shape: Sequence[int], n_lead: int = 0, n_in: int = 1) -> "QuantArray":
        """Placeholder storage of ``shape`` (all-zero values, unit scales), e.g. before a restore."""
        return cls(jnp.zeros(tuple(shape), E4M3), jnp.ones(cls.scale_shape(shape, n_lead, n_in), jnp.float32), n_in)

    @classmethod
    def quantize(cls, w: jax.Array, n_lead: int = 0, n_in: int = 1, *, pow2_scale: bool = False) -> "QuantArray":
        """Quantize a float weight ``[*lead, *in, *out]`` the way the release is quantized (128×128
        blocks of ``amax/448``)."""
        lead = w.shape[:n_lead]
        k = math.prod(w.shape[n_lead:n_lead + n_in])

        fn = lambda m: quantize_weight(m, pow2_scale=pow2_scale)  # noqa: E731  (128×128 blocks either way round)
        for _ in range(n_lead):
            fn = jax.vmap(fn)
        q, s = fn(w.reshape(*lead, k, -1))
        return cls(q.reshape(w.shape), s, n_in)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``[*lead, *in, *out]``: ``values × scale`` per 128×128 block."""
        k, n = self.matrix_shape
        lead = self.shape[:self.n_lead]
        deq = lambda q, s: dequantize_weight(q, s, dtype=jnp.dtype(dtype))  # noqa: E731
        for _ in range(self.n_lead):
            deq = jax.vmap(deq)
        return deq(self.values.reshape(*lead, k, n), self.scale).reshape(self.shape)

    def as_matrix(self) -> "QuantArray":
        """The same storage viewed as ``[*lead, K, N]`` (scales unchanged)."""
        k, n = self.matrix_shape
        return QuantArray(self.values.reshape(*self.shape[:self.n_lead], k, n), self.scale, 1)


__all__ = ["QuantArray"]
