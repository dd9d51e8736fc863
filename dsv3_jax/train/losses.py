"""Training objective (docs/architecture.md §4, §5): next-token CE + λ·MTP CE + sequence-wise balance loss, all fp32.

Every loss is returned as a *sum* plus the denominator it is normalised by, so gradient accumulation
over micro-batches divides by the global batch's counts and equals the full-batch gradient exactly.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from ..model.moe import RouterStats


def token_ce_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``logits [B,S,V]``, ``targets/mask [B,S]`` → (Σ masked CE, Σ mask), fp32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    m = mask.astype(jnp.float32)
    return (ce * m).sum(), m.sum()


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask of MTP depth ``k`` (1-based): position i predicts t_{i+1+k} = ``targets[:, i+k]``;
    valid where ``loss_mask[:, i..i+k]`` are all set (same document, real tokens); the last k
    positions have no target."""
    S = targets.shape[1]
    tgt = jnp.pad(targets[:, depth:], ((0, 0), (0, depth)))
    mask = loss_mask.astype(jnp.int32)
    for j in range(1, depth + 1):
        mask = mask * jnp.pad(loss_mask[:, j:].astype(jnp.int32), ((0, 0), (0, j)))
    return tgt, mask * (jnp.arange(S) < S - depth)[None]


def balance_loss_terms(stats: RouterStats, n_experts: int, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Sequence-wise balance loss without α (docs/architecture.md §4), per layer and sequence:
    ``f_i = N_r/(K_r·T) Σ_t 1[i∈TopK_t]``, ``P_i = (1/T) Σ_t s'_{i,t}``, ``L = Σ_i f_i P_i``.

    ``stats`` is stacked over layers (``seq_counts/seq_probs [L,B,E]``, ``seq_tokens [L,B]``). Returns
    (Σ over layers and non-empty sequences of L, number of non-empty sequences) — the loss is the sum
    over layers of the mean over sequences. ``f`` carries no gradient (a count); ``P`` does."""
    T = stats.seq_tokens.astype(jnp.float32)                         # [L, B]
    safe_T = jnp.maximum(T, 1.0)
    f = n_experts / top_k * jax.lax.stop_gradient(stats.seq_counts) / safe_T[..., None]
    P = stats.seq_probs / safe_T[..., None]
    per_seq = (f * P).sum(-1) * (T > 0)                              # [L, B]
    return per_seq.sum(), (T[0] > 0).sum().astype(jnp.float32)


def concat_stats(a: Optional[RouterStats], b: Optional[RouterStats]) -> Optional[RouterStats]:
    if a is None:
        return b
    if b is None:
        return a
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


__all__ = ["token_ce_sum", "mtp_targets", "balance_loss_terms", "concat_stats"]
