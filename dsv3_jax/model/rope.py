"""Rotary position embedding with YaRN context extension (docs/architecture.md §3).

RoPE rotates consecutive channel pairs ``(2i, 2i+1)`` as in the released weights (HF calls this
``rope_interleave``); only the 64 rope channels of queries and the shared rope key are rotated.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # docs/architecture.md §3: corr(n) = dim·ln(max_pos/(n·2π)) / (2·ln θ)
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """``[R/2]`` inverse frequencies, YaRN-blended when the config's rope scaling is YaRN."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if not rs.enabled:
        return freqs.astype(np.float32)
    low = math.floor(_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings))
    high = math.ceil(_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings))
    # Clamp to [0, dim-1] as both reference implementations do (the clamp never binds for V3).
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    smooth = 1.0 - ramp
    freqs = freqs / rs.factor * (1 - smooth) + freqs * smooth
    return freqs.astype(np.float32)


def cos_sin_scale(cfg: ModelConfig) -> float:
    """Scale applied to cos/sin: ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` (1 for V3)."""
    rs = cfg.rope_scaling
    if not rs.enabled:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``[..., R/2]`` for integer ``positions`` of shape ``[...]`` (fp32)."""
    inv = jnp.asarray(inv_frequencies(cfg))
    ang = positions.astype(jnp.float32)[..., None] * inv
    s = cos_sin_scale(cfg)
    return jnp.cos(ang) * s, jnp.sin(ang) * s


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive pairs of the last dim of ``x: [B, S, (H,) R]`` with ``cos/sin: [B, S, R/2]``."""
    if x.ndim == cos.ndim + 1:  # per-head tensor: broadcast over heads
        cos, sin = cos[..., None, :], sin[..., None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
