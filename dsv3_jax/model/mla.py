"""Multi-head Latent Attention (docs/architecture.md §2).

Queries go through an optional low-rank bottleneck (q-LoRA); keys and values are compressed into one
latent ``c_kv`` (L = kv_lora_rank) plus a single rope key shared by all heads.

One forward serves training, prompt prefill and decoding. Without a cache, or with a cache and no
``positions`` (a prompt written into an empty cache at 0..S-1), the latent is up-projected to
per-head K/V and attention runs in the flash prefill kernel. With a cache and ``positions`` (decode:
one token; speculative verify: two) only ``[c_kv | k_rope]`` is read from the cache and attention
uses the absorbed form, one latent stream shared by all heads:

    q_lat = q_nope · W_kvb[k part]        (per head, Dn → L)
    score = (q_lat · c_kv + q_rope · k_rope) · scale
    o     = (Σ p · c_kv) · W_kvb[v part]  (L → Dv per head)

Each query attends to cache entries at positions ≤ its own, so padding and rejected draft entries
beyond a sequence's length are never read.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import mla as mla_ops

from sharding.kernels import per_shard, platform_of

from ..config import ModelConfig
from .execution import Execution
from .layers import Linear, RMSNorm
from .rope import apply_rope


class LatentCache(NamedTuple):
    """What decoding keeps per token: normed ``ckv [..., B, T, L]`` and rotated ``krope [..., B, T, R]``
    (a leading ``layers`` axis for a stack)."""
    ckv: jax.Array
    krope: jax.Array


# The two latent norms use a fixed eps, not ``rms_norm_eps``: the reference implementations (transformers,
# DeepSeek's own) build them with the RMSNorm default, so a config with another eps differs only in the
# other norms (docs/architecture.md §2).
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs):
        self.cfg, self.rt = cfg, rt
        D, H = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, (H, cfg.qk_head_dim), ("embed", "heads", "qk_dim"), cfg, rt, rngs)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, ("embed", "q_lora"), cfg, rt, rngs)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg, rt, rngs, axis_name="q_lora", eps=LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, (H, cfg.qk_head_dim), ("q_lora", "heads", "qk_dim"), cfg, rt, rngs)
        self.kv_a_proj = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora"), cfg, rt, rngs)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg, rt, rngs, axis_name="kv_lora", eps=LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, (H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads", "qkv_dim"), cfg, rt, rngs)
        self.o_proj = Linear((H, cfg.v_head_dim), D, ("heads", "v_dim", "embed"), cfg, rt, rngs)

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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: Optional[jax.Array] = None, *,
                 cache: Optional[LatentCache] = None, positions: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, Optional[LatentCache]]:
        """``x: [B, S, D]``, cos/sin ``[B, S, R/2]`` → (``[B, S, D]``, updated cache or None).
        ``cache``: this layer's ``[B, T, ·]`` latent cache; ``positions [B, S]``: where the new tokens
        go in it (None: the sequence starts at 0 in an empty cache — prompt prefill)."""
        q = self.queries(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        if cache is not None:
            cache = self._write(cache, c_kv, k_rope, positions)
            if positions is not None:
                return self._absorbed(q, cache, positions), cache
        return self._flash(q, c_kv, k_rope, segment_ids), cache

    @staticmethod
    def _write(cache: LatentCache, c_kv, k_rope, positions) -> LatentCache:
        if positions is None:
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), 0, axis=1)  # noqa: E731
            return LatentCache(put(cache.ckv, c_kv), put(cache.krope, k_rope))
        b = jnp.arange(c_kv.shape[0])[:, None]
        return LatentCache(cache.ckv.at[b, positions].set(c_kv.astype(cache.ckv.dtype)),
                           cache.krope.at[b, positions].set(k_rope.astype(cache.krope.dtype)))

    def _flash(self, q, c_kv, k_rope, segment_ids):
        """Causal attention within the chunk over up-projected per-head K/V (the flash prefill kernel)."""
        cfg = self.cfg
        kv = checkpoint_name(self.kv_b_proj(c_kv), "mla_up")  # [B, S, H, Dn + Dv]
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:-1] + (cfg.qk_rope_head_dim,))
        k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)
        ex = self.rt
        attend = lambda q, k, v, seg: mla_ops.prefill(  # noqa: E731
            q, k, v, scale=cfg.softmax_scale, segment_ids=seg, causal=True, backend=ex.attention_impl,
            interpret=ex.interpret)
        heads = ("batch", "seq", "heads", None)   # per shard of sequences and heads, never of positions
        out = per_shard(attend, ex.mesh, ex.rules, (heads, heads, heads, ("batch", "seq")), heads)(
            q, k, v, segment_ids)
        return self.o_proj(checkpoint_name(out, "attn_out"))

    def _absorbed(self, q, cache: LatentCache, positions):
        """New queries at ``positions`` against the whole latent cache, absorbed form (module doc)."""
        cfg = self.cfg
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        w = self.kv_b_proj.weight(q.dtype)                               # [L, H, Dn + Dv]
        w_k, w_v = w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]
        q_lat = jnp.einsum("bshn,lhn->bshl", q_nope, w_k)
        # attention runs in the cache's dtype (bf16 by default) with fp32 accumulation and softmax: the
        # cache is read as stored (docs/design.md §Latent cache dtype)
        ckv, krope = cache.ckv, cache.krope
        if platform_of(self.rt.mesh) == "cpu" and ckv.dtype != jnp.float32:
            # XLA:CPU has no bf16 x bf16 -> fp32 dot: the cache is read up to fp32 there (still stored narrow)
            ckv, krope = ckv.astype(jnp.float32), krope.astype(jnp.float32)
        adt = ckv.dtype
        q_lat, q_rope = q_lat.astype(adt), q_rope.astype(adt)
        if q.shape[1] == 1:  # one new token per sequence: the decode kernel (pallas_kernels.mla.decode)
            ex = self.rt
            attend = lambda ql, qr, c, kr, n: mla_ops.decode(  # noqa: E731
                ql, qr, c, kr, n, scale=cfg.softmax_scale, backend=ex.attention_impl, interpret=ex.interpret)
            q_ax, c_ax = ("batch", "heads", None), ("batch", None, None)
            o_lat = per_shard(attend, ex.mesh, ex.rules, (q_ax, q_ax, c_ax, c_ax, ("batch",)), q_ax)(
                q_lat[:, 0], q_rope[:, 0], ckv, krope, positions[:, 0] + 1)
            o = jnp.einsum("bhl,lhv->bhv", o_lat.astype(q.dtype), w_v)[:, None]
            return self.o_proj(o)
        # several new tokens (speculative verify: two): the S·H queries of a sequence are one axis, as the
        # decode kernel's H, so both dots keep the cache's [T, ·] layout (a [B, H, S, T] layout made XLA:CPU
        # transpose the cache and fall back to a naive dot: 2.4x slower at B=16, S=2; docs/design.md
        # §Speculative decoding); each query sees the cache up to its own position
        B, S, H = q_lat.shape[:3]
        q_lat, q_rope = q_lat.reshape(B, S * H, -1), q_rope.reshape(B, S * H, -1)
        scores = (jnp.einsum("bql,btl->bqt", q_lat, ckv, preferred_element_type=jnp.float32)
                  + jnp.einsum("bqr,btr->bqt", q_rope, krope, preferred_element_type=jnp.float32))
        scores = scores * cfg.softmax_scale
        visible = jnp.arange(ckv.shape[1])[None, None, :] <= jnp.repeat(positions, H, axis=1)[:, :, None]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)              # [B, S·H, T]
        p = jax.nn.softmax(scores, axis=-1).astype(adt)
        o_lat = jnp.einsum("bqt,btl->bql", p, ckv, preferred_element_type=jnp.float32).astype(q.dtype)
        return self.o_proj(jnp.einsum("bshl,lhv->bshv", o_lat.reshape(B, S, H, -1), w_v))
