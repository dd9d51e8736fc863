"""The model run over a latent KV cache (SPEC §2): only ``c_kv`` (normed, L) and the rotated
``k_rope`` (R) are stored per token and layer; attention uses the absorbed form, one latent stream
shared by all heads:

    q_lat = q_nope · W_kvb[k part]        (per head, Dn → L)
    score = (q_lat · c_kv + q_rope · k_rope) · scale
    o     = (Σ p · c_kv) · W_kvb[v part]  (L → Dv per head)

A call processes a chunk of new tokens per sequence at absolute cache ``positions`` (prefill: the
whole prompt; decode: one token; speculative verify: two). Each query attends to cache entries at
positions ≤ its own, so padding and rejected draft entries beyond a sequence's length are never read.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import mla as mla_ops

from ..model.mla import MLA
from ..model.rope import rope_angles
from ..model.transformer import Block, DeepSeekV3, MTPLayer


class LatentCache(NamedTuple):
    """Latent cache of one layer stack: ``ckv [n_layers, B, T, L]``, ``krope [n_layers, B, T, R]``."""
    ckv: jax.Array
    krope: jax.Array


class ModelCache(NamedTuple):
    dense: Optional[LatentCache]
    moe: Optional[LatentCache]
    mtp: tuple  # one LatentCache (n_layers = 1) per MTP depth


def _stack_cache(n: int, batch: int, max_len: int, cfg, dtype) -> Optional[LatentCache]:
    if n == 0:
        return None
    return LatentCache(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                       jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32, mtp: bool = True) -> ModelCache:
    return ModelCache(_stack_cache(cfg.first_k_dense, batch, max_len, cfg, dtype),
                      _stack_cache(cfg.num_moe_layers, batch, max_len, cfg, dtype),
                      tuple(_stack_cache(1, batch, max_len, cfg, dtype) for _ in range(cfg.num_mtp_layers if mtp else 0)))


def cache_bytes_per_token(cache: ModelCache, include_mtp: bool = False) -> int:
    """Bytes one token occupies in the main model's cache (all layers)."""
    stacks = [c for c in (cache.dense, cache.moe) if c is not None] + (list(cache.mtp) if include_mtp else [])
    return sum(c.ckv.shape[0] * (c.ckv.shape[-1] + c.krope.shape[-1]) * c.ckv.dtype.itemsize for c in stacks)


def mla_cached(attn: MLA, x, cos, sin, positions, ckv, krope):
    """``x: [B, S, D]`` new tokens at ``positions: [B, S]``; ``ckv/krope: [B, T, ·]`` → (out, ckv, krope)."""
    cfg = attn.cfg
    q = attn.queries(x, cos, sin)                                    # [B, S, H, Dn + R]
    q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
    c_kv, k_rope = attn.latent(x, cos, sin)                          # [B, S, L], [B, S, R]
    b = jnp.arange(x.shape[0])[:, None]
    ckv = ckv.at[b, positions].set(c_kv.astype(ckv.dtype))
    krope = krope.at[b, positions].set(k_rope.astype(krope.dtype))
    w = attn.kv_b_proj.weight(q.dtype)                               # [L, H, Dn + Dv]
    w_k, w_v = w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]
    q_lat = jnp.einsum("bshn,lhn->bshl", q_nope, w_k)
    if x.shape[1] == 1:  # one new token per sequence: the decode kernel (pallas_kernels.mla.decode)
        o_lat = mla_ops.decode(q_lat[:, 0], q_rope[:, 0], ckv.astype(q.dtype), krope.astype(q.dtype),
                               positions[:, 0] + 1, scale=cfg.softmax_scale, backend=cfg.attention_impl)
        o = jnp.einsum("bhl,lhv->bhv", o_lat.astype(q.dtype), w_v)[:, None]
        return attn.o_proj(o), ckv, krope
    scores = (jnp.einsum("bshl,btl->bhst", q_lat, ckv.astype(q.dtype), preferred_element_type=jnp.float32)
              + jnp.einsum("bshr,btr->bhst", q_rope, krope.astype(q.dtype), preferred_element_type=jnp.float32))
    scores = scores * cfg.softmax_scale
    visible = jnp.arange(ckv.shape[1])[None, None, :] <= positions[:, :, None]   # [B, S, T]
    scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    o_lat = jnp.einsum("bhst,btl->bshl", p, ckv.astype(q.dtype))
    o = jnp.einsum("bshl,lhv->bshv", o_lat, w_v)
    return attn.o_proj(o), ckv, krope


def block_cached(block: Block, h, cos, sin, positions, ckv, krope):
    a, ckv, krope = mla_cached(block.attn, block.attn_norm(h), cos, sin, positions, ckv, krope)
    h = h + a
    if block.is_moe:
        y, _ = block.mlp(block.mlp_norm(h))
    else:
        y = block.mlp(block.mlp_norm(h))
    return h + y, ckv, krope


def stack_cached(blocks: Block, h, cos, sin, positions, cache: LatentCache):
    graphdef, state = nnx.split(blocks)

    def body(h, xs):
        layer_state, ckv, krope = xs
        h, ckv, krope = block_cached(nnx.merge(graphdef, layer_state), h, cos, sin, positions, ckv, krope)
        return h, (ckv, krope)

    h, (ckv, krope) = jax.lax.scan(body, h, (state, cache.ckv, cache.krope))
    return h, LatentCache(ckv, krope)


def model_cached(model: DeepSeekV3, tokens, positions, cache: ModelCache):
    """Main model over new ``tokens: [B, S]`` at ``positions``: (fp32 logits [B, S, V], final-normed
    hidden [B, S, D], updated cache)."""
    cos, sin = rope_angles(model.cfg, positions)
    h = model.embed_tokens(tokens)
    dense, moe = cache.dense, cache.moe
    if model.dense_layers is not None:
        h, dense = stack_cached(model.dense_layers, h, cos, sin, positions, dense)
    if model.moe_layers is not None:
        h, moe = stack_cached(model.moe_layers, h, cos, sin, positions, moe)
    h = model.final_norm(h)
    return model.head(h), h, cache._replace(dense=dense, moe=moe)


def mtp_cached(model: DeepSeekV3, hidden, next_tokens, positions, cache: ModelCache, depth: int = 0):
    """MTP depth ``depth`` at ``positions``: combines the main model's hidden state at position i with
    the embedding of token ``t_{i+1}`` (``next_tokens``) and predicts ``t_{i+2}`` (SPEC §5)."""
    layer: MTPLayer = model.mtp[depth]
    cos, sin = rope_angles(model.cfg, positions)
    cdt = hidden.dtype
    x = jnp.concatenate([layer.enorm(model.embed_tokens(next_tokens)), layer.hnorm(hidden)], axis=-1)
    x = x @ layer.eh_proj[...].astype(x.dtype)
    x, c = stack_cached(layer.block, x.astype(cdt), cos, sin, positions, cache.mtp[depth])
    mtp = list(cache.mtp)
    mtp[depth] = c
    return model.head(layer.norm(x)), cache._replace(mtp=tuple(mtp))
