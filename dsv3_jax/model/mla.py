"""Multi-head Latent Attention (SPEC §2).

Queries go through an optional low-rank bottleneck (q-LoRA); keys and values are compressed into one
latent ``c_kv`` (L = kv_lora_rank) plus a single rope key shared by all heads. Training/prefill
up-projects the latent to per-head K/V; decoding (M7) caches only ``[c_kv | k_rope]``.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import mla as mla_ops

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .rope import apply_rope


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, (H, cfg.qk_head_dim), ("embed", "heads", "qk_dim"), cfg, rngs)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, ("embed", "q_lora"), cfg, rngs)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg, rngs, axis_name="q_lora")
            self.q_b_proj = Linear(cfg.q_lora_rank, (H, cfg.qk_head_dim), ("q_lora", "heads", "qk_dim"), cfg, rngs)
        self.kv_a_proj = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora"), cfg, rngs)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg, rngs, axis_name="kv_lora")
        self.kv_b_proj = Linear(cfg.kv_lora_rank, (H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads", "qkv_dim"), cfg, rngs)
        self.o_proj = Linear((H, cfg.v_head_dim), D, ("heads", "v_dim", "embed"), cfg, rngs)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """``x: [B, S, D]`` → ``q: [B, S, H, Dn + R]`` with RoPE applied to the rope channels."""
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            c_q = checkpoint_name(self.q_a_proj(x), "mla_down")
            q = self.q_b_proj(self.q_a_norm(c_q))
        q = checkpoint_name(q, "mla_up")
        q_nope, q_rope = jnp.split(q, [self.cfg.qk_nope_head_dim], axis=-1)
        return jnp.concatenate([q_nope, apply_rope(q_rope, cos, sin)], axis=-1)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What decoding caches: normed ``c_kv: [B, S, L]`` and rotated ``k_rope: [B, S, R]``."""
        kv = checkpoint_name(self.kv_a_proj(x), "mla_down")
        c_kv, k_rope = jnp.split(kv, [self.cfg.kv_lora_rank], axis=-1)
        return self.kv_a_norm(c_kv), apply_rope(k_rope, cos, sin)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 segment_ids: Optional[jax.Array] = None) -> jax.Array:
        """Full-sequence causal attention. ``x: [B, S, D]``, cos/sin ``[B, S, R/2]`` → ``[B, S, D]``."""
        cfg = self.cfg
        q = self.queries(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        kv = checkpoint_name(self.kv_b_proj(c_kv), "mla_up")  # [B, S, H, Dn + Dv]
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:-1] + (cfg.qk_rope_head_dim,))
        k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)
        out = mla_ops.prefill(q, k, v, scale=cfg.softmax_scale, segment_ids=segment_ids, causal=True,
                              backend=cfg.attention_impl)
        return self.o_proj(checkpoint_name(out, "attn_out"))
