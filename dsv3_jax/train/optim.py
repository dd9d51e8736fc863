"""Optimizer (docs/architecture.md §8): AdamW β=(0.9, 0.95), weight decay 0.1, global-norm clip 1.0, and the
DeepSeek-V3 learning-rate schedule scaled to the run length.

Schedule, in fractions of the run (the report's 14.8T tokens): linear warm-up to ``lr`` (2K steps there;
``warmup_steps``, default 2% of the run here), constant until 10T/14.8T, cosine down to ``0.1·lr`` until
14.3T/14.8T, then ``0.1·lr`` (the report's 2.2e-5 for 333B tokens) and ``lr·7.3/220`` for the last
167B tokens.

The other step-dependent settings, at the same fractions of the run (docs/design.md §Recipe schedules):
the rows that train (batch 3072 → 15360 over the first 469B tokens: ``batch_ramp_start`` of the batch
rising linearly to all of it), γ (0 for the last 500B tokens) and λ (0.3, then 0.1 after 10T tokens).

Weight-decay mask (our choice; the report does not say): decay every matrix — attention, FFN and
expert weights, the MoE gate, ``eh_proj`` and the output head — but not the RMSNorm scales (1-D) nor
the embedding table (a lookup; decaying rare tokens' rows towards 0 only hurts them). The router bias
is not a parameter and never reaches the optimizer (docs/architecture.md §4).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .config import TrainConfig

# docs/architecture.md §8 phase boundaries as fractions of 14.8T tokens.
CONSTANT_END = 10.0 / 14.8
COSINE_END = 14.3 / 14.8
TAIL_END = (14.3 + 0.333) / 14.8
COSINE_FLOOR = 2.2e-5 / 2.2e-4
FINAL = 7.3e-6 / 2.2e-4
RAMP_END = 0.469 / 14.8          # batch 3072 → 15360 sequences over the first 469B tokens
BIAS_FREEZE = (14.8 - 0.5) / 14.8  # γ = 0 for the last 500B tokens (= COSINE_END)
MTP_SWITCH = CONSTANT_END        # λ 0.3 → 0.1 after the first 10T tokens


def warmup_steps(t: TrainConfig) -> int:
    return t.warmup_steps if t.warmup_steps >= 0 else max(1, math.ceil(0.02 * t.steps))


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    """``step -> lr`` for update ``step`` (0-based). ``lr_schedule: constant``: ``lr`` throughout (the
    report's long-context stages run at the final pre-training LR, docs/architecture.md §3)."""
    if t.lr_schedule == "constant":
        return lambda step: jnp.full((), t.lr, jnp.float32)
    total, peak, warm = t.steps, t.lr, warmup_steps(t)
    if t.lr_schedule == "finetune":  # post-training: warm-up, one cosine to 0.1·lr (docs/design.md §Post-training)
        return optax.join_schedules([optax.linear_schedule(peak / max(warm, 1), peak, max(warm - 1, 0)),
                                     optax.cosine_decay_schedule(peak, max(total - warm, 1), alpha=0.1)], [warm])
    c_end = max(warm, round(CONSTANT_END * total))
    cos_end = max(c_end + 1, round(COSINE_END * total))
    tail_end = max(cos_end, round(TAIL_END * total))

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warmup = peak * jnp.minimum(1.0, (s + 1) / max(warm, 1))
        frac = jnp.clip((s - c_end) / (cos_end - c_end), 0.0, 1.0)
        cosine = peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
        lr = jnp.where(s < warm, warmup, jnp.where(s < c_end, peak, cosine))
        lr = jnp.where(s >= cos_end, peak * COSINE_FLOOR, lr)
        return jnp.where(s >= tail_end, peak * FINAL, lr)
    return schedule


def phase_step(t: TrainConfig, fraction: float) -> int:
    """The first update of the phase that starts at ``fraction`` of the report's 14.8T tokens, in this
    run's steps (rounded like the LR schedule's boundaries)."""
    return round(fraction * t.steps)


def active_rows(t: TrainConfig, batch_size: int) -> Callable:
    """``step -> rows of the batch that train`` (int32): the batch-size ramp (docs/architecture.md §8),
    ``batch_ramp_start·B`` rows at update 0 rising linearly to ``B`` at ``RAMP_END`` of the run (floor,
    at least 1), then ``B``. ``batch_ramp_start = 1`` switches it off."""
    ramp = phase_step(t, RAMP_END)
    start = t.batch_ramp_start

    def rows(step):
        if start >= 1 or ramp == 0:
            return jnp.full((), batch_size, jnp.int32)
        s = jnp.asarray(step, jnp.float32)
        frac = start + (1.0 - start) * jnp.minimum(s / ramp, 1.0)
        return jnp.clip(jnp.floor(batch_size * frac + 1e-4), 1, batch_size).astype(jnp.int32)
    return rows


def bias_rate_schedule(t: TrainConfig) -> Callable:
    """``step -> γ``: ``bias_rate`` until the last 500B-token phase (``BIAS_FREEZE`` of the run), then 0
    (docs/architecture.md §4), unless ``bias_freeze`` is off."""
    stop = phase_step(t, BIAS_FREEZE) if t.bias_freeze else None
    return lambda step: (jnp.float32(t.bias_rate) if stop is None else
                         jnp.where(jnp.asarray(step) < stop, t.bias_rate, 0.0).astype(jnp.float32))


def mtp_weight_schedule(t: TrainConfig) -> Callable:
    """``step -> λ``: ``mtp_weight`` for the first 10T/14.8T of the run, then ``mtp_weight_final``
    (docs/architecture.md §5)."""
    switch, (first, final) = phase_step(t, MTP_SWITCH), mtp_weights(t)
    return lambda step: jnp.where(jnp.asarray(step) < switch, first, final).astype(jnp.float32)


def mtp_weights(t: TrainConfig) -> tuple[float, float]:
    """``(λ before the switch, λ after)``; ``mtp_weight_final = -1`` keeps the report's ratio (0.3 → 0.1)."""
    return t.mtp_weight, (t.mtp_weight_final if t.mtp_weight_final >= 0 else t.mtp_weight / 3)


def decay_mask(params) -> Any:
    """True for leaves that get weight decay (see module doc). ``params``: the model's Param state."""
    def one(path, x):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path if hasattr(k, "key") or hasattr(k, "idx")]
        return names[-1] != "scale" and names != ["embed"]  # RMSNorm scales (stacked: 2-D) and the embedding
    return jax.tree_util.tree_map_with_path(one, params)


class LowpAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_lowp(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
    """Adam's moment estimates stored in ``dtype`` (bf16: docs/architecture.md §6), computed in fp32."""
    dtype = jnp.dtype(dtype)

    def init(params):
        z = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return LowpAdamState(jnp.zeros([], jnp.int32), jax.tree.map(z, params), jax.tree.map(z, params))

    def update(g, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, x: b1 * m.astype(jnp.float32) + (1 - b1) * x, state.mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v.astype(jnp.float32) + (1 - b2) * x * x, state.nu, g)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        upd = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
        return upd, LowpAdamState(count, cast(mu), cast(nu))
    return optax.GradientTransformation(init, update)


def make_optimizer(t: TrainConfig, params) -> optax.GradientTransformation:
    """clip → Adam (fp32 or bf16 moments) → decoupled weight decay (masked) → −lr(step)."""
    parts = []
    if t.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(t.clip_norm))
    if t.moment_dtype == "float32":
        parts.append(optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps))
    else:
        parts.append(scale_by_adam_lowp(t.b1, t.b2, t.eps, t.moment_dtype))
    if t.weight_decay > 0:
        parts.append(optax.add_decayed_weights(t.weight_decay, mask=decay_mask(params)))
    parts.append(optax.scale_by_learning_rate(lr_schedule(t)))
    return optax.chain(*parts)


__all__ = ["active_rows", "bias_rate_schedule", "mtp_weight_schedule", "mtp_weights", "phase_step", "lr_schedule", "warmup_steps", "decay_mask", "make_optimizer", "scale_by_adam_lowp"]
