"""``dsv3 train`` with ``train.objective: grpo``: the GRPO loop (objective in ``train/grpo.py``, rewards in
``train/rewards.py``; docs/design.md §Post-training).

    prompts (JSONL: {"messages": [...], "answer": "..."}) ─ per step: data.batch_size prompts ─ G samples
    each with the project's latent-cache Generator (train.temperature, train.max_new_tokens, stop at EOS)
    ─ rewards (train.reward, time-limited) ─ group advantages ─ log-probs under π_old and the frozen
    π_ref ─ train.policy_updates AdamW steps on the clipped objective ─ metrics ─ checkpoint

The policy starts from ``train.init_from`` (weights and tokenizer), which also stays in memory as the
reference. Each step's prompts and sampling key are functions of (``data.seed``, step), so a run
resumed after ``kill -9`` from its last checkpoint continues exactly as the uninterrupted run.
A rollout row is ``data.seq_len + 1`` tokens: prompt + completion, right-padded (one compiled shape).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding import DEFAULT_RULES, make_mesh

from ..checkpoint.orbax_io import Checkpointer, check_writable
from ..config import ConfigError
from ..data.conversations import open_conversations
from ..data.pipeline import split_document_ids
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..inference.generate import Generator
from .config import RunConfig
from .grpo import group_advantages, make_grpo_step, make_logprob_fn
from .program import train_program
from .rewards import load_reward, score
from .stages import check_init_from, init_checkpoint, restore_model_states
from .trainer import _truncate_metrics, check_resume

PASS = 1.0   # a completion "passes" when its reward reaches this (exact_answer's 1)


def encode_prompts(tok: Tokenizer, records: Sequence[dict]) -> list[list[int]]:
    """Chat-template ids of each record's messages, ending with ``<｜Assistant｜>`` (what the policy continues)."""
    return [tok.encode_chat(r["messages"], add_generation_prompt=True)[0] for r in records]


def rollout_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int) -> dict:
    """Rows ``[N, seq_len]`` of prompt + completion: ``inputs/targets`` shifted, ``segment_ids`` 1 on real
    tokens, ``positions`` 0.., ``mask`` 1 on the targets the policy sampled (the completion, EOS included)."""
    N = len(prompts)
    rows = np.zeros((N, seq_len + 1), np.int32)
    mask = np.zeros((N, seq_len), np.int32)
    seg = np.zeros((N, seq_len), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = list(p) + list(c)
        if len(ids) > seq_len + 1:
            raise ConfigError(f"a prompt of {len(p)} tokens + a completion of {len(c)} exceeds data.seq_len + 1 = "
                              f"{seq_len + 1} (fix: raise data.seq_len or lower train.max_new_tokens).")
        rows[i, :len(ids)] = ids
        seg[i, :len(ids) - 1] = 1
        mask[i, len(p) - 1:len(ids) - 1] = 1
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (N, seq_len)).copy(), "mask": mask}


class GRPOTrainer:
    def __init__(self, run: RunConfig, *, log=print):
        t, d = run.train, run.data
        if not d.tokenizer and (init_checkpoint(t.init_from) / "tokenizer.json").is_file():
            run = dataclasses.replace(run, data=dataclasses.replace(d, tokenizer=str(init_checkpoint(t.init_from)
                                                                                      / "tokenizer.json")))
        self.run, self.log = run, log
        cfg, t, d = run.model, run.train, run.data
        if jax.process_count() > 1:
            raise ConfigError("train.objective=grpo runs in one process (fix: run it without a cluster; its mesh "
                              "may span this host's devices).")
        self.out = Path(t.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        check_writable(self.ckpt_dir, 1 << 20)
        check_resume(run, self.ckpt_dir, log)
        init = check_init_from(run)
        self.tokenizer = load_tokenizer(d.tokenizer)
        self.reward = load_reward(t.reward)
        self.prompts = open_conversations(d.path, d.glob)
        self.train_ids, self.val_ids = split_document_ids(len(self.prompts), d.val_fraction)
        self.mesh = make_mesh(t.mesh) if t.mesh else make_mesh(None, devices=jax.devices()[:1])
        # one optimizer update per policy update: the schedule spans steps × policy_updates updates
        prog = train_program(cfg, run.runtime, dataclasses.replace(t, steps=t.steps * t.policy_updates),
                             self.mesh, DEFAULT_RULES, seed=t.seed)
        # GRPO's own step is not pipelined: it takes the model layout (docs/design.md §Pipeline)
        self.graphdef, sh = prog.graphdef, prog.model_shardings
        a = {k: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), prog.model_abstract[k],
                             sh[k])
             for k in ("params", "bias", "rest")}
        p, b, r = restore_model_states(init, (a["params"], a["bias"], a["rest"]))
        self.ref = (p, b, r)                       # π_ref: the starting weights, never updated
        opt = jax.jit(prog.tx.init, out_shardings=sh["opt"])(p)
        self.state = {"params": p, "bias": b, "rest": r, "opt": opt,
                      "applied": jax.device_put(jnp.zeros((), jnp.int32), sh["applied"])}
        self.shardings = sh
        self.schedule = prog.schedule
        self.step_fn = jax.jit(make_grpo_step(self.graphdef, prog.tx, prog.schedule, t.clip_eps, t.kl_coef))
        self.logprob = jax.jit(make_logprob_fn(self.graphdef))
        self.generator = Generator(nnx.merge(self.graphdef, p, b, r))
        self.ckpt = Checkpointer(self.ckpt_dir, cfg, t.keep_checkpoints, t.async_checkpoint,
                                 tokenizer_file=Path(d.tokenizer))

    # -- pieces ---------------------------------------------------------------------------------------
    def policy_generator(self) -> Generator:
        """The generator with the current policy's weights (same compiled steps)."""
        s = self.state
        self.generator.state = nnx.split(nnx.merge(self.graphdef, s["params"], s["bias"], s["rest"]))[1]
        return self.generator

    def step_prompts(self, step: int) -> list[dict]:
        """The ``data.batch_size`` prompt records of ``step`` (0-based): a function of (data.seed, step)."""
        rng = np.random.default_rng([self.run.data.seed, step])
        n = self.run.data.batch_size
        idx = rng.choice(self.train_ids, n, replace=len(self.train_ids) < n)
        return [self.prompts.record(int(i)) for i in idx]

    def complete(self, gen: Generator, prompt_ids, *, temperature: float, seed: int) -> list[list[int]]:
        t = self.run.train
        return gen(prompt_ids, max_new_tokens=t.max_new_tokens, temperature=temperature, seed=seed,
                   stop_tokens=[self.tokenizer.eos_id]).tokens

    def texts(self, completions) -> list[str]:
        eos = self.tokenizer.eos_id
        return [self.tokenizer.decode([x for x in c if x != eos], skip_special_tokens=True) for c in completions]

    def accuracy(self, records: Optional[Sequence[dict]] = None) -> float:
        """Greedy pass rate of the current policy on ``records`` (default: the validation prompts)."""
        records = records if records is not None else [self.prompts.record(int(i)) for i in self.val_ids]
        ids = encode_prompts(self.tokenizer, records)
        comp = self.complete(self.policy_generator(), ids, temperature=0.0, seed=0)
        items = [(self.tokenizer.decode(p), c, str(r.get("answer", ""))) for p, c, r in zip(ids, self.texts(comp), records)]
        rewards, _ = score(self.reward, items, self.run.train.reward_timeout)
        return float(np.mean([x >= PASS for x in rewards]))

    # -- loop -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        run, t, d = self.run, self.run.train, self.run.data
        G = t.group_size
        step = 0
        latest = self.ckpt.latest_step()
        if latest is not None:
            ms = (self.state["params"], self.state["bias"], self.state["rest"])
            (p, b, r), opt, meta = self.ckpt.restore(latest, ms, self.state["opt"])
            self.state = {"params": p, "bias": b, "rest": r, "opt": opt,
                          "applied": jax.device_put(jnp.asarray(meta["applied"], jnp.int32), self.shardings["applied"])}
            step = int(meta["step"])
            self.log(f"resumed from {self.ckpt_dir / str(latest)} (step {step})")
        metrics_path = self.out / "metrics.jsonl"
        _truncate_metrics(metrics_path, step)
        last: dict = {}
        with open(metrics_path, "a") as mf:
            while step < t.steps:
                t0 = time.perf_counter()
                records = self.step_prompts(step)
                prompt_ids = encode_prompts(self.tokenizer, records)
                rows = [p for p in prompt_ids for _ in range(G)]
                comp = self.complete(self.policy_generator(), rows, temperature=t.temperature,
                                     seed=int(np.random.default_rng([d.seed, step, 1]).integers(2 ** 31)))
                texts = self.texts(comp)
                items = [(self.tokenizer.decode(rows[i]), texts[i], str(records[i // G].get("answer", "")))
                         for i in range(len(rows))]
                rewards, failed = score(self.reward, items, t.reward_timeout)
                rw = np.asarray(rewards, np.float32).reshape(len(records), G)
                batch = rollout_batch(rows, comp, d.seq_len)
                batch["adv"] = np.asarray(group_advantages(jnp.asarray(rw))).reshape(-1)
                s = self.state
                batch["old_logp"] = self.logprob(s["params"], s["bias"], s["rest"], batch)
                batch["ref_logp"] = self.logprob(*self.ref, batch)
                first = None
                for _ in range(t.policy_updates):
                    self.state, m = self.step_fn(self.state, batch)
                    if first is None:   # loss, KL and load at the sampling policy
                        first = jax.device_get(m)
                m = jax.device_get(m)
                self.ckpt.poll()
                step += 1
                rec = {"kind": "grpo", "step": step, "loss": float(first["loss"]), "reward": float(rw.mean()),
                       "pass_rate": float((rw >= PASS).mean()), "kl": float(first["kl"]),
                       "kl_after": float(m["kl"]), "clip_frac": float(m["clip_frac"]),
                       "response_len": float(np.mean([len(c) for c in comp])), "reward_failures": failed,
                       "grad_norm": float(first["grad_norm"]), "lr": float(m["lr"]), "finite": bool(m["finite"]),
                       "step_s": time.perf_counter() - t0}
                if "imbalance" in first:
                    rec["imbalance"] = [round(float(x), 4) for x in first["imbalance"]]
                    rec["expert_load"] = np.asarray(first["counts"]).tolist()
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                last = rec
                self.log(f"grpo step {step}/{t.steps}: reward {rec['reward']:.3f} pass {rec['pass_rate']:.2f} "
                         f"kl {rec['kl']:.4f} len {rec['response_len']:.1f}")
                if step % t.checkpoint_every == 0 or step == t.steps:
                    s = self.state
                    self.ckpt.save(step, (s["params"], s["bias"], s["rest"]), s["opt"],
                                   {"step": step, "applied": int(s["applied"]), "seed": t.seed,
                                    "config": run.to_dict()})
        self.ckpt.close()
        return {**last, "step": step, "checkpoint": str(self.ckpt.directory / str(step))}


def train_grpo(run: RunConfig, log=print) -> dict:
    return GRPOTrainer(run, log=log).train()


__all__ = ["GRPOTrainer", "train_grpo", "rollout_batch", "encode_prompts"]
