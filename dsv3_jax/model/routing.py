"""DeepSeekMoE routing (docs/architecture.md §4): sigmoid (V3) or softmax (V2) affinities, the aux-loss-free
correction bias that only chooses, group-limited top-k, normalised gates × routed_scaling_factor,
and the per-layer statistics the training loop needs. Pure functions of fp32 router logits, so the
dense MoE and the expert-parallel path (which routes each device's own tokens inside ``shard_map``)
share them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .layers import RouterBias, param


class Routing(NamedTuple):
    weights: jax.Array  # [T, K] fp32 gate values g_i (normalised, × routed_scaling_factor)
    experts: jax.Array  # [T, K] int32 chosen expert ids
    scores: jax.Array   # [T, E] fp32 unbiased affinities s_i (sigmoid or softmax)


class RouterStats(NamedTuple):
    """Per-layer statistics the training loop needs (docs/architecture.md §4).

    counts:     [E]    token-slots routed to each expert (valid tokens only) — drives the bias update.
    seq_counts: [B, E] per-sequence counts Σ_t 1[i ∈ TopK_t] — the f_i of the balance loss.
    seq_probs:  [B, E] per-sequence Σ_t s'_{i,t} with s' = s / Σ_j s_j — the P_i (differentiable).
    seq_tokens: [B]    valid tokens per sequence (T of the balance loss).
    dropped:    []     token-slots dropped (always 0 except for the opt-in ``a2a_capacity`` strategy).
    experts:    [B, S, K] int32 the experts each token was sent to (for looking at routing; padding too).
    gates:      [B, S, K] fp32  their gate values g (normalised, × routed_scaling_factor).

    The model output stacks these over MoE layers (a leading ``[L]`` axis on every field).
    """
    counts: jax.Array
    seq_counts: jax.Array
    seq_probs: jax.Array
    seq_tokens: jax.Array
    dropped: jax.Array
    experts: jax.Array
    gates: jax.Array


def route(logits: jax.Array, bias: Optional[jax.Array], cfg: ModelConfig) -> Routing:
    """Expert selection from fp32 router logits ``[T, E]`` (docs/architecture.md §4).

    The bias only chooses; gate values come from the unbiased scores. Group-limited routing keeps
    the ``topk_group`` best of ``n_group`` groups (a group's score: sum of its top-2 biased scores for
    ``noaux_tc``, its max score for V2's ``group_limited_greedy``); masked experts get -inf.
    """
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.reshape(-1, cfg.n_group, E // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros(group_scores.shape, bool).at[jnp.arange(keep.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, E // cfg.n_group, axis=-1), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, K)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:  # also for K = 1 (gate 1 · factor), as transformers and DeepSeek's inference code
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernel = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "expert_gate"),
                            std=cfg.init_std, dtype=cfg.param_dtype)
        # Only V3's noaux_tc routing has a correction bias; it lives outside nnx.Param on purpose.
        self.bias = (RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32),
                                out_sharding=("expert_gate",), eager_sharding=False)
                     if cfg.topk_method == "noaux_tc" else None)

    def __call__(self, x: jax.Array) -> Routing:
        # The MoE gate stays in fp32 (docs/architecture.md §6).
        logits = x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
        return route(logits, None if self.bias is None else self.bias[...], self.cfg)


def router_stats(routing: Routing, B: int, S: int, E: int, valid: Optional[jax.Array]) -> RouterStats:
    valid = jnp.ones((B, S), jnp.float32) if valid is None else valid.astype(jnp.float32)
    chosen = jax.nn.one_hot(routing.experts, E, dtype=jnp.float32).sum(1).reshape(B, S, E)
    chosen = chosen * valid[..., None]
    s = routing.scores.reshape(B, S, E)
    s_norm = s / s.sum(-1, keepdims=True)
    seq_counts = chosen.sum(1)
    K = routing.experts.shape[-1]
    return RouterStats(counts=seq_counts.sum(0), seq_counts=seq_counts,
                       seq_probs=(s_norm * valid[..., None]).sum(1), seq_tokens=valid.sum(1),
                       dropped=jnp.zeros((), jnp.int32), experts=routing.experts.reshape(B, S, K),
                       gates=routing.weights.reshape(B, S, K))
