"""DeepSeekMoE (SPEC §4): routed experts with group-limited top-k, shared experts, dropless.

``out = Σ shared FFN(u) + Σ_i g_i FFN_i(u)`` (the residual ``u +`` is added by the block).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .grouped_gemm import expert_ffn, sort_by_expert
from .layers import MLP, RouterBias, dequantize_fp8, dtype_of, fp8_storage, param


class Routing(NamedTuple):
    weights: jax.Array  # [T, K] fp32 gate values g_i (normalised, × routed_scaling_factor)
    experts: jax.Array  # [T, K] int32 chosen expert ids
    scores: jax.Array   # [T, E] fp32 unbiased affinities s_i (sigmoid or softmax)


class RouterStats(NamedTuple):
    """Per-layer statistics the training loop needs (SPEC §4).

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
    """Expert selection from fp32 router logits ``[T, E]`` (SPEC §4).

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
    if cfg.norm_topk_prob and K > 1:
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
        # The MoE gate stays in fp32 (SPEC §6).
        logits = x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
        return route(logits, None if self.bias is None else self.bias[...], self.cfg)


class Experts(nnx.Module):
    """Stacked routed expert weights ``[E, D, I]`` / ``[E, I, D]`` (with ``fp8_weights``: e4m3 plus
    per-expert 128×128 block scales ``gate_scale``/``up_scale``/``down_scale``, SPEC §6)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.fp8_weights = cfg.fp8_weights
        for name, shape, axes in (("gate", (E, D, I), ("expert", "embed", "moe_mlp")),
                                  ("up", (E, D, I), ("expert", "embed", "moe_mlp")),
                                  ("down", (E, I, D), ("expert", "moe_mlp", "embed"))):
            if cfg.fp8_weights:
                q, s = fp8_storage(shape, 1, 1, axes)
                setattr(self, name, q)
                setattr(self, f"{name}_scale", s)
            else:
                setattr(self, name, param(rngs, shape, axes, std=cfg.init_std, dtype=cfg.param_dtype))

    def weights(self, dtype=None) -> list[jax.Array]:
        """``[gate, up, down]`` as ``dtype`` (FP8 storage dequantised in fp32; ``None``: the stored
        dtype, or fp32 for FP8 storage — what the FP8 training path quantizes)."""
        if self.fp8_weights:
            return [dequantize_fp8(getattr(self, n)[...], getattr(self, f"{n}_scale")[...], 1, dtype or jnp.float32)
                    for n in ("gate", "up", "down")]
        return [w[...] if dtype is None else w[...].astype(dtype) for w in (self.gate, self.up, self.down)]


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = Router(cfg, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg, rngs)
                       if cfg.n_shared_experts else None)
        self.ep = None  # sharding.expert_parallel.ExpertParallel when run expert-parallel on a mesh

    def routed(self, x: jax.Array, routing: Routing) -> jax.Array:
        """Dropless routed-expert output for flat tokens ``x: [T, D]`` → ``[T, D]``."""
        cfg = self.cfg
        T, K = routing.experts.shape
        order, group_sizes = sort_by_expert(routing.experts, cfg.n_routed_experts)
        cdt = dtype_of(cfg.compute_dtype)
        x_sorted = x.astype(cdt)[order // K]
        # FP8 (SPEC §6) quantizes the fp32 master weights and returns fp32 weight gradients.
        ws = self.experts.weights(None if cfg.quant == "fp8" else cdt)
        y_sorted = expert_ffn(x_sorted, group_sizes, *ws, impl=cfg.moe_impl, block=cfg.moe_block_size,
                              quant=cfg.quant)
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True).reshape(T, K, -1)
        return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), routing.weights).astype(cdt)

    def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> tuple[jax.Array, RouterStats]:
        """``x: [B, S, D]``, ``valid: [B, S]`` bool (padding excluded from statistics)."""
        B, S, D = x.shape
        if self.ep is None:
            flat = x.reshape(B * S, D)
            routing = self.router(flat)
            out = self.routed(flat, routing).reshape(B, S, D)
            dropped = jnp.zeros((), jnp.int32)
        else:  # expert-parallel over a mesh (sharding/expert_parallel.py)
            from sharding.expert_parallel import moe_forward
            cdt = dtype_of(self.cfg.compute_dtype)
            r = self.router
            out, routing, dropped = moe_forward(
                self.ep, self.cfg, x.astype(cdt), r.kernel[...], None if r.bias is None else r.bias[...],
                *self.experts.weights(None if self.cfg.quant == "fp8" else cdt))
        if self.shared is not None:
            out = out + self.shared(x)
        return out, router_stats(routing, B, S, self.cfg.n_routed_experts, valid)._replace(dropped=dropped)


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
