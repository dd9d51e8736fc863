"""Group Relative Policy Optimization (DeepSeekMath's GRPO, the RL stage of docs/architecture.md §11 and
docs/design.md §Post-training): the objective, its advantages, and the jitted policy update.

For each prompt q, G completions o_1..o_G are sampled from the policy before the update (π_old) and
scored with a rule-based reward r_i. No critic: the baseline is the group's mean,

    A_i = (r_i − mean(r)) / (std(r) + ε)                    (population std over the group)

and every token t of o_i carries A_i. With the ratio ρ_{i,t} = π_θ(o_{i,t}) / π_old(o_{i,t}):

    J(θ) = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ A_i, clip(ρ, 1−ε_c, 1+ε_c) A_i) − β KL_{i,t} ]
    KL_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1               (the k3 estimator: unbiased, always ≥ 0)

against a frozen reference π_ref (the starting checkpoint). The loss is −J averaged over prompts; the
same batch of samples is used for ``train.policy_updates`` optimizer steps (π_old stays the sampling
policy, so the ratio and its clipping matter from the second update on).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .step import imbalance

ADV_EPS = 1e-4   # keeps a group whose rewards are all equal at advantage 0 (not 0/0)


def group_advantages(rewards: jax.Array, eps: float = ADV_EPS) -> jax.Array:
    """``rewards [P, G]`` (P prompts, G samples each) → advantages ``[P, G]``, normalised per group."""
    r = rewards.astype(jnp.float32)
    return (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) from the sampled tokens' log-probabilities."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_objective(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, adv: jax.Array, mask: jax.Array,
                   clip_eps: float, kl_coef: float) -> tuple[jax.Array, dict]:
    """The GRPO loss (−J, see module doc) and its parts. ``logp/old_logp/ref_logp/mask [N, T]`` (N = P·G
    sequences, mask 1 on completion tokens), ``adv [N]``. Sequences without a completion token count as
    empty (they add 0 and are left out of the mean)."""
    m = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    a = adv[:, None].astype(jnp.float32)
    surr = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    kl = k3_kl(logp, ref_logp)
    n_tok = m.sum(-1)
    per_seq = ((surr - kl_coef * kl) * m).sum(-1) / jnp.maximum(n_tok, 1.0)
    live = (n_tok > 0).astype(jnp.float32)
    n_seq = jnp.maximum(live.sum(), 1.0)
    loss = -(per_seq * live).sum() / n_seq
    clipped = ((ratio < 1.0 - clip_eps) & (a < 0)) | ((ratio > 1.0 + clip_eps) & (a > 0))
    parts = {"kl": ((kl * m).sum(-1) / jnp.maximum(n_tok, 1.0) * live).sum() / n_seq,
             "clip_frac": (clipped * m).sum() / jnp.maximum(m.sum(), 1.0),
             "ratio_mean": (ratio * m).sum() / jnp.maximum(m.sum(), 1.0)}
    return loss, parts


def token_logprobs(model, batch: dict) -> tuple[jax.Array, jax.Array | None]:
    """``log π(targets)`` ``[N, T]`` (fp32) of ``model`` on a rollout batch, and the router counts."""
    out = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"], mtp=False)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), -1)
    lp = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return lp, (None if out.router is None else out.router.counts)


def make_logprob_fn(graphdef) -> Callable:
    """``(params, bias, rest, batch) -> [N, T]`` log-probabilities (the π_old and π_ref passes)."""
    def f(params, bias, rest, batch):
        return token_logprobs(nnx.merge(graphdef, params, bias, rest), batch)[0]
    return f


def make_grpo_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, clip_eps: float,
                   kl_coef: float) -> Callable:
    """``step(state, batch) -> (state, metrics)``: one optimizer update on the GRPO loss. ``batch``:
    ``inputs, targets, segment_ids, positions, mask [N, T]`` int32, ``old_logp, ref_logp [N, T]`` and
    ``adv [N]`` float32. ``state``: ``params, bias, rest, opt, applied`` as in pre-training; an update
    whose loss or gradient is not finite is skipped (the state is kept)."""
    def loss_fn(params, bias, rest, batch):
        lp, counts = token_logprobs(nnx.merge(graphdef, params, bias, rest), batch)
        loss, parts = grpo_objective(lp, batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"],
                                     clip_eps, kl_coef)
        return loss, {**parts, "counts": counts}

    def step(state, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["bias"],
                                                                       state["rest"], batch)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new = {**state, "params": keep(params, state["params"]), "opt": keep(opt, state["opt"]),
               "applied": state["applied"] + finite.astype(jnp.int32)}
        metrics = {"loss": loss, "kl": aux["kl"], "clip_frac": aux["clip_frac"], "ratio_mean": aux["ratio_mean"],
                   "grad_norm": gnorm, "finite": finite, "lr": schedule(state["applied"])}
        if aux["counts"] is not None:
            metrics["counts"] = aux["counts"]
            metrics["imbalance"] = imbalance(aux["counts"])
        return new, metrics
    return step


__all__ = ["group_advantages", "k3_kl", "grpo_objective", "token_logprobs", "make_logprob_fn", "make_grpo_step"]
