"""Token-level distillation (``train.objective: distill``, docs/design.md §Post-training): the student learns
the teacher's whole next-token distribution on the same tokens,

    L = Σ_t m_t · KL(p_teacher(·|x_<t) ‖ p_student(·|x_<t)) / Σ_t m_t

over the tokens the data marks (``loss_mask``, the pre-training pipeline's), plus the sequence-wise balance
term and the aux-loss-free bias update of pre-training. The teacher is any checkpoint with the same
tokenizer (``train.teacher``; its architecture may differ), run frozen in fp32; without ``data.tokenizer``
(or ``train.init_from``) the student uses the teacher's tokenizer.

Sequence-level distillation — the teacher's generated answers as SFT data — needs no objective:
``dsv3 generate --chat --jsonl-out FILE`` writes them, ``train.objective: sft`` learns them.

The loop, data, checkpoints and resume are the pre-training ``Trainer``'s; only the step differs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..checkpoint.orbax_io import checkpoint_config, load_checkpoint
from ..config import ConfigError
from ..data.tokenizer import load_tokenizer
from .config import RunConfig
from .losses import balance_loss_terms, concat_stats, token_ce_sum
from .stages import init_checkpoint
from .step import bias_update, imbalance
from .trainer import Trainer


def distill_kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, S, V]`` logits and ``mask [B, S]`` → (Σ masked KL(teacher ‖ student), Σ mask), fp32. Zero
    exactly when the two distributions agree."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
    kl = (jnp.exp(t) * (t - s)).sum(-1)
    m = mask.astype(jnp.float32)
    return (kl * m).sum(), m.sum()


def make_distill_step(graphdef, teacher_graphdef, cfg, t, tx: optax.GradientTransformation, schedule):
    """``step(state, teacher_state, batch, poison) -> (state, metrics)``, the pre-training step's contract
    (same state, same metric names; ``ce`` is the student's CE on the targets, for reference)."""
    use_bal = t.balance != "none" and t.balance_alpha > 0

    def loss_fn(params, bias, rest, teacher, batch, poison):
        kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], mtp=False)
        out = nnx.merge(graphdef, params, bias, rest)(batch["inputs"], **kw)
        t_logits = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, teacher)(batch["inputs"], **kw).logits)
        kl_sum, n = distill_kl_sum(out.logits, t_logits, batch["loss_mask"])
        n = jnp.maximum(n, 1.0)
        kl = kl_sum / n
        ce = token_ce_sum(out.logits, batch["targets"], batch["loss_mask"])[0] / n
        stats = concat_stats(out.router, out.mtp_router)
        bal = jnp.zeros((), jnp.float32)
        if stats is not None:
            seqs = jnp.maximum((batch["segment_ids"] > 0).any(1).sum().astype(jnp.float32), 1.0)
            bal = balance_loss_terms(stats, cfg.n_routed_experts, cfg.num_experts_per_tok)[0] / seqs
        total = kl + (t.balance_alpha * bal if use_bal else 0.0)
        return total * (1.0 + poison), {"kl": kl, "ce": ce, "balance": bal, "tokens": n,
                                        "counts": None if out.router is None else out.router.counts}

    def step(state, teacher, batch, poison):
        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["bias"], state["rest"], teacher, batch, poison)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(gnorm)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        bias = state["bias"]
        if t.balance == "aux_free" and t.bias_rate > 0 and aux["counts"] is not None:
            # the MTP blocks do not run here (mtp=False): zero counts leave their bias as it is
            bias = bias_update(bias, aux["counts"], jnp.zeros((max(cfg.num_mtp_layers, 1), cfg.n_routed_experts)),
                               t.bias_rate)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new = {**state, "params": keep(params, state["params"]), "bias": keep(bias, state["bias"]),
               "opt": keep(opt, state["opt"]), "applied": state["applied"] + finite.astype(jnp.int32)}
        metrics = {"loss": total, "kl": aux["kl"], "ce": aux["ce"], "mtp": jnp.zeros(()), "balance": aux["balance"],
                   "grad_norm": gnorm, "lr": schedule(state["applied"]), "finite": finite, "tokens": aux["tokens"],
                   "rows": (batch["segment_ids"] > 0).any(1).sum(), "mtp_weight": jnp.zeros(()),
                   "bias_rate": jnp.asarray(t.bias_rate, jnp.float32)}
        if aux["counts"] is not None:
            metrics["counts"] = aux["counts"]
            metrics["imbalance"] = imbalance(aux["counts"])
        return new, metrics
    return step


class DistillTrainer(Trainer):
    """The pre-training loop with the distillation step (the teacher loaded once, frozen)."""

    def __init__(self, run: RunConfig, *, log=print):
        t = run.train
        teacher = init_checkpoint(t.teacher)
        tcfg = checkpoint_config(teacher)
        if tcfg.vocab_size != run.model.vocab_size:
            raise ConfigError(f"train.teacher={t.teacher}: its vocabulary ({tcfg.vocab_size}) is not the student's "
                              f"({run.model.vocab_size}); token-level distillation compares distributions over the same "
                              "tokens (fix: a teacher with the student's tokenizer, or sequence-level distillation: "
                              "dsv3 generate --chat --jsonl-out, then train.objective=sft).")
        if not run.data.tokenizer and not t.init_from and (teacher / "tokenizer.json").is_file():
            run = dataclasses.replace(run, data=dataclasses.replace(run.data, tokenizer=str(teacher / "tokenizer.json")))
        super().__init__(run, log=log)
        t_tok = load_tokenizer(teacher, require=(), missing_ok=True)
        if t_tok is not None and t_tok.backend.get_vocab() != self.tokenizer.backend.get_vocab():
            raise ConfigError(f"train.teacher={t.teacher}: its tokenizer.json differs from this run's (fix: use the "
                              "teacher's tokenizer for the student, data.tokenizer=TEACHER_DIR).")
        _, tmodel = load_checkpoint(teacher, runtime=["compute_dtype=float32"])
        self.teacher_graphdef, self.teacher_state = nnx.split(tmodel)
        step = jax.jit(make_distill_step(self.graphdef, self.teacher_graphdef, run.model, t, self.tx, self.schedule))
        self.train_step = lambda state, batch, poison: step(state, self.teacher_state, batch, poison)
        log(f"distilling from {teacher} ({tcfg.num_layers} layers, hidden {tcfg.hidden_size})")


__all__ = ["distill_kl_sum", "make_distill_step", "DistillTrainer"]
