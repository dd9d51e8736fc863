"""The DeepSeek-V3 model: embedding, scanned dense and MoE block stacks, head, MTP (SPEC §1, §5).

Layers of one kind are stored stacked (leading ``layers`` axis) and run with ``jax.lax.scan``, so
compile time does not grow with depth (DESIGN.md "Scan the stack").
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from .layers import MLP, RMSNorm, dtype_of, param
from .mla import MLA
from .moe import MoE, RouterStats
from .rope import rope_angles


class Block(nnx.Module):
    """Pre-norm transformer block: ``h += MLA(norm(h)); h += FFN(norm(h))`` (FFN dense or MoE)."""

    def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.attn = MLA(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg, rngs)
        self.is_moe = moe

    def __call__(self, h, cos, sin, segment_ids, valid):
        h = h + self.attn(self.attn_norm(h), cos, sin, segment_ids)
        if self.is_moe:
            y, stats = self.mlp(self.mlp_norm(h), valid)
        else:
            y, stats = self.mlp(self.mlp_norm(h)), None
        return h + y, stats


def _stacked_blocks(cfg: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs) -> Block:
    """``n`` blocks with every variable stacked on a leading ``layers`` axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, moe, r)
    return make(rngs)


def _remat_policy(name: str):
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # SPEC §8: keep everything but the RMSNorm outputs and the MLA up-projections (tagged with
    # checkpoint_name "norm" / "mla_up"), which the backward pass recomputes.
    return jax.checkpoint_policies.save_anything_except_these_names("norm", "mla_up")


def run_stack(blocks: Block, h, cos, sin, segment_ids, valid, remat: str, scan: bool = True):
    """Apply stacked ``blocks`` in sequence; returns final hidden and the per-layer stats stacked."""
    graphdef, state = nnx.split(blocks)

    def body(carry, layer_state):
        block = nnx.merge(graphdef, layer_state)
        return block(carry, cos, sin, segment_ids, valid)

    if remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(remat), prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, h, state)
    n = jax.tree.leaves(state)[0].shape[0]
    outs = []
    for i in range(n):
        h, s = body(h, jax.tree.map(lambda a: a[i], state))
        outs.append(s)
    stats = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return h, stats


class MTPLayer(nnx.Module):
    """One MTP depth (SPEC §5): ``h' = W_eh [enorm(Emb(t_{i+k})) ; hnorm(h_i)]``, a full MoE block,
    its own final norm; the embedding and output head are the main model's."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg, rngs)
        self.hnorm = RMSNorm(D, cfg, rngs)
        self.eh_proj = param(rngs, (2 * D, D), ("mtp_concat", "embed"), std=cfg.init_std, dtype=cfg.param_dtype)
        self.block = _stacked_blocks(cfg, 1, cfg.num_moe_layers > 0, rngs)
        self.norm = RMSNorm(D, cfg, rngs)
        self.cfg = cfg

    def __call__(self, h, emb_next, cos, sin, segment_ids, valid):
        cdt = dtype_of(self.cfg.compute_dtype)
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h)], axis=-1)  # embedding first
        x = x @ self.eh_proj[...].astype(cdt)
        x, stats = run_stack(self.block, x, cos, sin, segment_ids, valid, self.cfg.remat)
        return x, self.norm(x), stats


class ModelOutput(NamedTuple):
    logits: jax.Array                    # [B, S, V] fp32
    mtp_logits: Optional[jax.Array]      # [Dmtp, B, S, V] fp32; depth k predicts t_{i+1+k}
    router: Optional[RouterStats]        # stacked over MoE layers: counts [Lm, E], ...
    mtp_router: Optional[RouterStats]    # stacked over MTP depths
    hidden: jax.Array                    # [B, S, D] main model final hidden state, after final norm


class TokenRangeError(ValueError):
    """A token id outside ``[0, vocab_size)`` reached the model."""


def check_tokens(tokens: Any, vocab_size: int, what: str = "tokens") -> None:
    """Raise when concrete ``tokens`` hold ids outside ``[0, vocab_size)``. JAX gathers clamp
    out-of-range indices silently, so this check is the only thing between a bad id and a wrong answer."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenRangeError(f"{what} must be integer token ids, got dtype {arr.dtype} (fix: cast to int32).")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        pos = tuple(int(i) for i in np.argwhere(arr == bad)[0])
        raise TokenRangeError(
            f"{what} contain id {bad} at index {pos}, outside the vocabulary [0, {vocab_size}) "
            f"(fix: use the model's own tokenizer, or a config whose vocab_size covers your ids).")


class DeepSeekV3(nnx.Module):
    """DeepSeek-V3 (and V2-family via config flags). Call with ``tokens: [B, S]`` int32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           std=cfg.init_std, dtype=cfg.param_dtype)
        self.dense_layers = _stacked_blocks(cfg, cfg.first_k_dense, False, rngs) if cfg.first_k_dense else None
        self.moe_layers = _stacked_blocks(cfg, cfg.num_moe_layers, True, rngs) if cfg.num_moe_layers else None
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                             std=cfg.init_std, dtype=cfg.param_dtype)
        self.mtp = nnx.List([MTPLayer(cfg, rngs) for _ in range(cfg.num_mtp_layers)])

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed[...].astype(dtype_of(self.cfg.compute_dtype))[tokens]

    def head(self, h: jax.Array) -> jax.Array:
        # The output head is kept out of FP8 and its logits are fp32 (SPEC §6).
        return jnp.dot(h.astype(jnp.float32), self.lm_head[...].astype(jnp.float32))

    def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, mtp: bool = True) -> ModelOutput:
        """``tokens, segment_ids, positions: [B, S]``. ``segment_ids`` > 0 marks documents of a packed
        row (0 = padding, excluded from router statistics); attention never crosses segments.
        ``positions`` default to ``0..S-1``; for packed rows pass per-document positions."""
        cfg = self.cfg
        check_tokens(tokens, cfg.vocab_size)
        B, S = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        valid = None if segment_ids is None else segment_ids > 0
        cos, sin = rope_angles(cfg, positions)
        h = self.embed_tokens(tokens)
        stats = None
        if self.dense_layers is not None:
            h, _ = run_stack(self.dense_layers, h, cos, sin, segment_ids, valid, cfg.remat, cfg.scan_layers)
        if self.moe_layers is not None:
            h, stats = run_stack(self.moe_layers, h, cos, sin, segment_ids, valid, cfg.remat, cfg.scan_layers)
        h = self.final_norm(h)
        logits = self.head(h)
        mtp_logits = mtp_stats = None
        if mtp and len(self.mtp):
            mtp_logits, mtp_stats = self.mtp_forward(h, tokens, cos, sin, segment_ids, valid)
        return ModelOutput(logits, mtp_logits, stats, mtp_stats, h)

    def mtp_forward(self, h, tokens, cos, sin, segment_ids, valid):
        """Depth k (1-based) combines the previous depth's hidden state at position i with the
        embedding of token ``t_{i+k}``; positions whose future token is beyond the row (or in another
        document) are garbage and must be masked by the loss. The shifted embedding at the last
        positions is zero, as the serving engines do at the sequence boundary."""
        logits, stats = [], []
        h_prev = h
        for k, layer in enumerate(self.mtp, start=1):
            nxt = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
            emb = self.embed_tokens(nxt)
            emb = jnp.where((jnp.arange(tokens.shape[1]) < tokens.shape[1] - k)[None, :, None], emb, 0)
            h_prev, normed, s = layer(h_prev, emb, cos, sin, segment_ids, valid)
            logits.append(self.head(normed))
            stats.append(s)
        stacked = None if stats[0] is None else jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
        return jnp.stack(logits), stacked
