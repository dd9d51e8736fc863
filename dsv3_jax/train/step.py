"""The train and eval steps: pure jitted functions of ``(graphdef, state, batch)``
(docs/design.md §Functional at the boundary).

``state`` is a dict of pytrees: ``params`` (every ``nnx.Param``), ``bias`` (the ``RouterBias``
variables), ``rest`` (any other model variable), ``opt`` (optax state). One step:

1. loss and gradient over ``grad_accum`` micro-batches (``lax.scan``), each loss term a sum divided
   by the *global* batch's denominators, so accumulation equals the full-batch gradient;
2. AdamW update (clip, schedule) — skipped, with the state left untouched, when the loss or the
   gradient norm is not finite;
3. aux-loss-free bias update outside the optimizer (docs/architecture.md §4): ``b_i -= γ·sign(load_i − mean load)``
   from the per-expert counts of the whole global batch (under a mesh the counts are global arrays:
   XLA inserts the reduction), for every MoE layer and MTP block.

The recipe's step-dependent settings (docs/design.md §Recipe schedules) are functions of the applied
update count: the rows that train (batch-size ramp), λ and γ.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config import ModelConfig
from .config import TrainConfig
from ..model import DeepSeekV3
from .optim import active_rows, bias_rate_schedule, mtp_weight_schedule, mtp_weights
from .losses import balance_loss_terms, concat_stats, mtp_targets, token_ce_sum


MOE_STACK = DeepSeekV3.STACKS[1]  # the stack whose router counts drive the bias update


def denominators(batch: dict, n_mtp: int) -> dict:
    """Global normalisers of each loss term, from the whole (un-split) batch."""
    mask = batch["loss_mask"]
    d = {"tokens": jnp.maximum(mask.sum().astype(jnp.float32), 1.0),
         "seqs": jnp.maximum((batch["segment_ids"] > 0).any(1).sum().astype(jnp.float32), 1.0)}
    d["mtp"] = jnp.stack([jnp.maximum(mtp_targets(batch["targets"], mask, k)[1].sum().astype(jnp.float32), 1.0)
                          for k in range(1, n_mtp + 1)]) if n_mtp else jnp.zeros((0,), jnp.float32)
    return d


def make_loss_fn(graphdef, cfg: ModelConfig, t: TrainConfig) -> Callable:
    """``loss(params, bias, rest, batch, denoms, poison) -> (total, aux)``; ``poison`` (0 or NaN) is
    the NaN-injection test hook: ``total · (1 + poison)``."""
    n_mtp = cfg.num_mtp_layers if max(mtp_weights(t)) > 0 else 0
    use_bal = t.balance != "none" and t.balance_alpha > 0

    def loss_fn(params, bias, rest, batch, denoms, poison):
        model = nnx.merge(graphdef, params, bias, rest)
        out = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                    mtp=n_mtp > 0)
        ce_sum, _ = token_ce_sum(out.logits, batch["targets"], batch["loss_mask"])
        ce = ce_sum / denoms["tokens"]
        total = ce
        mtp = jnp.zeros((), jnp.float32)
        for k in range(n_mtp):
            tgt, m = mtp_targets(batch["targets"], batch["loss_mask"], k + 1)
            s, _ = token_ce_sum(out.mtp_logits[k], tgt, m)
            mtp = mtp + s / denoms["mtp"][k] / n_mtp
        total = total + denoms.get("mtp_weight", t.mtp_weight) * mtp  # λ(step), see make_train_step
        stats = concat_stats(out.router, out.mtp_router)
        bal = jnp.zeros((), jnp.float32)
        if stats is not None:
            bal_sum, _ = balance_loss_terms(stats, cfg.n_routed_experts, cfg.num_experts_per_tok)
            bal = bal_sum / denoms["seqs"]
            if use_bal:
                total = total + t.balance_alpha * bal
        aux = {"ce": ce, "mtp": mtp, "balance": bal,
               "counts": None if out.router is None else out.router.counts,
               "mtp_counts": None if out.mtp_router is None else out.mtp_router.counts}
        return total * (1.0 + poison), aux
    return loss_fn


def bias_update(bias: nnx.State, counts: Optional[jax.Array], mtp_counts: Optional[jax.Array],
                rate: float) -> nnx.State:
    """``b -= γ·sign(c − mean c)`` per layer (docs/architecture.md §4): over-loaded experts lose γ, under-loaded gain γ."""
    def one(path, b):
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        if keys[0] == MOE_STACK:
            c = counts
        elif keys[0] == DeepSeekV3.MTP:
            if mtp_counts is None:   # MTP not run (λ = 0): its routers saw no tokens, their bias stays
                return b
            k = int(keys[1])
            c = mtp_counts[k:k + 1]
        else:
            return b
        c = c.astype(jnp.float32).reshape(b.shape)
        return b - rate * jnp.sign(c - c.mean(-1, keepdims=True))
    return jax.tree_util.tree_map_with_path(one, bias)


def imbalance(counts: jax.Array) -> jax.Array:
    """Per-layer max/mean expert load ``[L]`` (1 = perfectly balanced)."""
    c = counts.astype(jnp.float32)
    return c.max(-1) / jnp.maximum(c.mean(-1), 1e-9)


def make_train_step(graphdef, cfg: ModelConfig, t: TrainConfig, tx: optax.GradientTransformation,
                    schedule: Callable, grad_fn: Optional[Callable] = None, layer_rows=None) -> Callable:
    """``step(state, batch, poison) -> (state, metrics)``, not yet jitted (the trainer jits it with
    shardings). ``batch``: dict of ``[B, S]`` int32 arrays. ``grad_fn``: what computes ``(total, aux),
    grads`` (default: ``value_and_grad`` of ``make_loss_fn``; the pipelined step passes its own,
    docs/design.md §Pipeline). ``layer_rows``: with an uneven pipeline split the MoE stack is stored in
    the staged layout; the stored row of each layer (``StageMap.rows``), so the bias metrics stay per
    layer, and ``aux["stack_counts"]`` (row for row, padding zero) drives the bias update."""
    grad_fn = grad_fn or jax.value_and_grad(make_loss_fn(graphdef, cfg, t), has_aux=True)
    A = t.grad_accum
    n_mtp = cfg.num_mtp_layers if max(mtp_weights(t)) > 0 else 0
    gamma_fn, lam_fn = bias_rate_schedule(t), mtp_weight_schedule(t)

    def step(state: dict, batch: dict, poison: jax.Array):
        params, bias, rest = state["params"], state["bias"], state["rest"]
        # batch-size ramp (docs/design.md §Recipe schedules): rows past the active count become padding
        # (segment 0, no loss, not routed into the counts); rows are ranked micro-batch by micro-batch
        # (micro-batch j = rows j, j+A, ...), so a micro-batch with no active row is skipped below.
        B = batch["inputs"].shape[0]
        rows = active_rows(t, B)(state["applied"])
        rank = (jnp.arange(B) % A) * (B // A) + jnp.arange(B) // A
        live = (rank < rows).astype(jnp.int32)[:, None]
        batch = {**batch, "loss_mask": batch["loss_mask"] * live, "segment_ids": batch["segment_ids"] * live}
        denoms = {**denominators(batch, n_mtp), "mtp_weight": lam_fn(state["applied"])}
        if A == 1:
            (total, aux), grads = grad_fn(params, bias, rest, batch, denoms, poison)
        else:
            # micro-batch j = rows j, j+A, ...: the (sharded) leading dim stays put
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)
            zero = jax.eval_shape(lambda: grad_fn(params, bias, rest, jax.tree.map(lambda x: x[0], micro),
                                                  denoms, poison))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ((zero[0][0], zero[0][1], zero[1])))

            def body(carry, xs):
                mb, j = xs
                (tot, aux), g = jax.lax.cond(j * (B // A) < rows,  # an all-padding micro-batch costs nothing
                                             lambda: grad_fn(params, bias, rest, mb, denoms, poison),
                                             lambda: ((zero[0], zero[1]), zero[2]))
                return jax.tree.map(jnp.add, carry, (tot, aux, g)), None
            (total, aux, grads), _ = jax.lax.scan(body, zero, (micro, jnp.arange(A)))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        new_bias = bias
        if t.balance == "aux_free" and t.bias_rate > 0 and aux["counts"] is not None:
            # padding rows count zero for every expert: sign(0 - 0) = 0 leaves their bias at zero
            new_bias = bias_update(bias, aux.get("stack_counts", aux["counts"]), aux["mtp_counts"],
                                   gamma_fn(state["applied"]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {"params": keep(new_params, params), "bias": keep(new_bias, bias), "rest": rest,
                     "opt": keep(new_opt, state["opt"]), "applied": state["applied"] + finite.astype(jnp.int32)}
        metrics = {"loss": total, "ce": aux["ce"], "mtp": aux["mtp"], "balance": aux["balance"],
                   "grad_norm": grad_norm, "lr": schedule(state["applied"]), "finite": finite,
                   "tokens": denoms["tokens"], "rows": rows, "mtp_weight": denoms["mtp_weight"],
                   "bias_rate": gamma_fn(state["applied"])}
        for k in ("activations", "busy_ticks"):   # pipelined: per stage, measured (docs/design.md §Pipeline)
            if k in aux:
                metrics[k] = aux[k]
        if aux["counts"] is not None:
            metrics["counts"] = aux["counts"]
            metrics["imbalance"] = imbalance(aux["counts"])
            b = [x for x in jax.tree.leaves(new_state["bias"])]
            if b:
                main_b = [x for p, x in jax.tree_util.tree_leaves_with_path(new_state["bias"])
                          if getattr(p[0], "key", None) == MOE_STACK]
                if main_b:
                    if layer_rows is not None:
                        main_b = [main_b[0][jnp.asarray(layer_rows)]]
                    metrics["bias_absmean"] = jnp.abs(main_b[0]).mean(-1)
                    metrics["bias_min"] = main_b[0].min(-1)
                    metrics["bias_max"] = main_b[0].max(-1)
        return new_state, metrics
    return step


def make_eval_step(graphdef) -> Callable:
    """``eval(params, bias, rest, batch) -> (Σ CE, Σ mask, counts or None)`` of the main head."""
    def ev(params, bias, rest, batch):
        model = nnx.merge(graphdef, params, bias, rest)
        out = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"], mtp=False)
        s, n = token_ce_sum(out.logits, batch["targets"], batch["loss_mask"])
        return s, n, (None if out.router is None else out.router.counts)
    return ev


__all__ = ["make_train_step", "make_eval_step", "make_loss_fn", "bias_update", "denominators", "imbalance"]
