"""``dsv3 train``: the pre-training loop, top to bottom (nanoGPT-style), on one CPU or a pod mesh.

    tokenizer ─ grain train/validation iterators ─ mesh (sharding.make_mesh) ─ model state created
    sharded (jit with out_shardings) ─ AdamW ─ restore the latest checkpoint (params, optimizer,
    router bias, step, data-iterator state) ─ loop: jitted step ─ metrics (progress bar, JSONL,
    TensorBoard) ─ eval every N ─ async checkpoint every N ─ stop after N non-finite steps in a row.

Resuming after ``kill -9`` restarts from the last complete checkpoint and reproduces the uninterrupted
run's losses exactly (same config, same device): the data iterator's state is saved with the step.

Several processes (``dsv3_jax.distributed``, joined before this runs): each reads only its virtual data
shards and the global batch is assembled with ``jax.make_array_from_process_local_data`` (the same rows
for any process count); process 0 trains the tokenizer and writes logs, metrics and TensorBoard;
checkpoints are written by all (each its shards) and committed by process 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding import DEFAULT_RULES, make_mesh

from .. import distributed
from ..data.conversations import SFTBatches
from ..data import ShardedBatches, document_ids, open_source, process_shards
from ..data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from ..checkpoint.orbax_io import (Checkpointer, abstract_state, check_writable, complete_steps, flat_arrays,
                                   read_train_state, state_bytes)
from ..config import ConfigError, model_config_from_stored
from ..errors import CheckpointError, Dsv3Error
from ..info import model_info
from ..model.layers import RouterBias
from ..pipeline.config import validate_pipeline
from .config import RunConfig
from .program import train_program
from .ema import HostEMA
from .stages import check_init_from, init_checkpoint, restore_model_states
from .step import make_eval_step


EAGER_INIT_BYTES = 1 << 30


class TrainingStopped(Dsv3Error, RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says why and what is intact."""


def measure_matmul_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one ``n×n @ n×n`` matmul on the default device (the MFU denominator)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def get_tokenizer(run: RunConfig, out: Path, log) -> Tokenizer:
    """``data.tokenizer`` when set; else ``<output_dir>/tokenizer.json``, trained once (BPE with
    ``model.vocab_size`` entries on the train split) and reused on resume."""
    if run.data.tokenizer:
        return load_tokenizer(run.data.tokenizer)
    path = out / "tokenizer.json"
    if distributed.is_primary() and not path.is_file():  # trained once, by process 0
        src = open_source(run.data.path, glob=run.data.glob, text_field=run.data.text_field)
        ids = document_ids(len(src), run.data, "train", shard_index=0, shard_count=1)
        n = run.train.tokenizer_documents or len(ids)
        log(f"training a {run.model.vocab_size}-token BPE tokenizer on {min(n, len(ids))} documents of {run.data.path} ...")
        tok = train_tokenizer((src[int(i)] for i in ids[:n]), run.model.vocab_size, length=min(n, len(ids)))
        tok.save(path)
    if distributed.process_count() > 1:  # shared with the others (their hosts may not see process 0's disk)
        data = distributed.broadcast(path.read_bytes() if distributed.is_primary() else None, "tokenizer")
        if not distributed.is_primary() and (not path.is_file() or path.read_bytes() != data):
            tmp = path.with_name(f".{path.name}.{distributed.process_index()}")
            tmp.write_bytes(data)
            tmp.replace(path)
    return load_tokenizer(path)


# Settings that may change between a run and its resume without a word: where and how often things are
# written or logged, and how the same computation is laid out or executed.
RESUME_QUIET = frozenset({
    "model.name", "train.output_dir", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
    "train.eval_every", "train.eval_batches", "train.log_every", "train.max_bad_steps", "train.progress",
    "train.tensorboard", "train.mesh", "train.inject_nan_steps", "train.tokenizer_documents", "data.read_threads",
    "data.prefetch_documents", "runtime.attention_impl", "runtime.moe_impl", "runtime.moe_block_size",
    "runtime.remat", "runtime.scan_layers", "runtime.interpret", "runtime.ep_strategy", "runtime.emulate_ragged",
    "pipeline.schedule", "pipeline.microbatches", "pipeline.layers_per_stage"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(stored: dict, run: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{"train.lr": (stored, now), ...}``: the run-config fields that differ from the ones a checkpoint
    was written with (``train_state.json``'s ``config``), ``RESUME_QUIET`` fields left out."""
    now = _flat(json.loads(json.dumps(run.to_dict(), default=str)))
    old = _flat(stored)
    return {k: (old.get(k), now.get(k)) for k in sorted(set(now) | set(old))
            if k not in RESUME_QUIET and old.get(k) != now.get(k)}


def _stored_arrays(cfg) -> dict[tuple, tuple]:
    return {p: (tuple(a.shape), str(a.dtype)) for p, a in flat_arrays(abstract_state(cfg)[1]).items()}


def check_resume(run: RunConfig, ckpt_dir: Path, log=print) -> Optional[int]:
    """Before anything is built: compare the run config with the one the latest checkpoint in
    ``ckpt_dir`` was written with. A model whose stored arrays would differ (shapes, dtypes, which
    arrays) is refused with a ``ConfigError`` listing the differing fields; any other changed setting
    (optimizer, schedule, data, numerics) resumes with a warning listing them. Returns the step that
    will be resumed (None: a fresh run)."""
    steps = complete_steps(ckpt_dir)
    if not steps:
        return None
    ckpt = Path(ckpt_dir) / str(steps[-1])
    stored = read_train_state(ckpt).get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        log(f"warning: {ckpt / 'train_state.json'} does not record its run config; resuming without checking "
            "that the settings match.")
        return steps[-1]
    changes = config_changes(stored, run)
    model = {k: v for k, v in changes.items() if k.startswith("model.")}
    if model:
        try:
            old_cfg = model_config_from_stored(stored["model"])
        except ConfigError:
            old_cfg = None
        old = _stored_arrays(old_cfg) if old_cfg is not None else {}
        new = _stored_arrays(run.model)
        if old != new:
            diff = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in model.items())
            eg = next((f"; e.g. {'/'.join(map(str, p))} is stored as {old[p][0]} {old[p][1]}, the config implies "
                       f"{new[p][0]} {new[p][1]}" for p in new if p in old and old[p] != new[p]), "")
            raise ConfigError(f"{ckpt} holds a model of another shape than this run config: {diff}{eg} (fix: resume "
                              "with the model settings that wrote it, or set train.output_dir to a new directory "
                              "to start over).")
    if changes:
        log(f"warning: resuming {ckpt} with settings that differ from the run that wrote it (the new values "
            "apply from here on): " + ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changes.items()))
    return steps[-1]


class Trainer:
    def __init__(self, run: RunConfig, *, log=print):
        self.primary = distributed.is_primary()  # process 0 logs and writes metrics; the others stay quiet
        log = log if self.primary else _quiet
        if run.train.init_from and not run.data.tokenizer:
            # the starting checkpoint's tokenizer: its model knows those ids (SFT data is conversations, on
            # which no tokenizer should be trained; docs/design.md §Post-training)
            tok = init_checkpoint(run.train.init_from) / "tokenizer.json"
            if tok.is_file():
                run = dataclasses.replace(run, data=dataclasses.replace(run.data, tokenizer=str(tok)))
        self.run, self.log = run, log
        cfg, t, d = run.model, run.train, run.data
        if cfg.fp8_weights:
            raise ConfigError("model.fp8_weights=true stores weights as e4m3 for inference and cannot be trained "
                              "(fix: set model.fp8_weights=false — FP8 training is runtime.quant=fp8 on fp32 master "
                              "weights — or convert the checkpoint without --keep-fp8).")
        self.out = Path(t.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        check_writable(self.ckpt_dir, 1 << 20)  # before any work; the size check follows below
        resumed = check_resume(run, self.ckpt_dir, log)  # a changed model shape is refused before anything is built
        self.init_from = None if resumed is not None else check_init_from(run)  # (a resumed run has its own)
        if t.ema_every and jax.process_count() > 1:   # (docs/design.md §Parameter EMA)
            log("warning: train.ema_every is ignored in a multi-process run: the host EMA holds whole arrays on one "
                "host (set train.ema_every=0 to silence this).")
        self.ema = HostEMA(t.ema_decay, t.ema_every) if t.ema_every and jax.process_count() == 1 else None
        # no --mesh: the 1×1×1×1 mesh on the first device (same code path); a pod passes e.g. data=-1,expert=8
        # (several processes without --mesh: data parallel over all their devices)
        self.mesh = make_mesh(t.mesh) if t.mesh else make_mesh(None, devices=jax.devices()[:1]) \
            if jax.process_count() == 1 else make_mesh("data=-1")
        self.rules = DEFAULT_RULES
        self.rules.check_batch(d.batch_size // t.grad_accum, self.mesh, "micro-batch size (data.batch_size / "
                                                                         "train.grad_accum)")
        if self.mesh.shape.get("stage", 1) > 1:  # pipelined (docs/design.md §Pipeline): checks name the fix
            run = dataclasses.replace(run, pipeline=validate_pipeline(
                run.pipeline, cfg, self.mesh.shape["stage"], d.batch_size, self.rules.batch_shards(self.mesh),
                t.grad_accum, n_mtp=cfg.num_mtp_layers if max(t.mtp_weight, t.mtp_weight_final) > 0 else 0,
                seq_len=d.seq_len))
            self.run = run
        self.batch_sharding = self.rules.batch_sharding(self.mesh)
        self.data_shards = process_shards(self.batch_sharding, d)  # the virtual data shards this process reads

        # the step as one program over the mesh (shared with `dsv3 plan`): model built for the mesh (MoE
        # layers expert-parallel, kernels per shard), state created directly in its shards
        prog = train_program(cfg, run.runtime, t, self.mesh, self.rules, seed=t.seed,
                             donate=jax.default_backend() != "cpu", pipeline=run.pipeline)
        # the state is created, checkpointed, evaluated and averaged in the model layout; the step takes
        # an uneven pipeline split's staged layout (prog.to_staged / to_model; docs/design.md §Pipeline)
        self.prog = prog
        self.graphdef, sh, a = prog.graphdef, prog.model_shardings, prog.model_abstract
        model_sh = {k: sh[k] for k in ("params", "bias", "rest")}

        def init():
            _, p, b, r = nnx.split(prog.build(), nnx.Param, RouterBias, ...)
            return {"params": p, "bias": b, "rest": r}
        if state_bytes(a["params"], a["bias"], a["rest"]) < EAGER_INIT_BYTES:
            # small models: initialise eagerly (compiling the whole initialiser costs more than running it)
            model_state = jax.device_put(init(), model_sh)
        else:
            model_state = jax.jit(init, out_shardings=model_sh)()
        self.schedule, self.tx = prog.schedule, prog.tx
        opt = jax.jit(self.tx.init, out_shardings=sh["opt"])(model_state["params"])
        self.state = prog.to_staged({**model_state, "opt": opt,
                                     "applied": jax.device_put(jnp.zeros((), jnp.int32), sh["applied"])})
        self.state_shardings = prog.shardings

        # checkpoints: fail early when they could not be written
        check_writable(self.ckpt_dir, 2 * state_bytes(model_state, opt) + (1 << 20))
        self.tokenizer = get_tokenizer(run, self.out, log)
        self.ckpt = Checkpointer(self.ckpt_dir, cfg, t.keep_checkpoints, t.async_checkpoint,
                                 tokenizer_file=self.out / "tokenizer.json" if not d.tokenizer else
                                 Path(d.tokenizer) / "tokenizer.json" if Path(d.tokenizer).is_dir() else Path(d.tokenizer))

        self.train_step = prog.step
        self.eval_step = jax.jit(make_eval_step(self.graphdef))
        self.nan_steps = {int(s) for s in t.inject_nan_steps.split(",") if s.strip()}
        info = model_info(cfg, d.seq_len)
        self.flops_per_token = info["train_flops_per_token"]
        self.n_params = info["params_total"]

    # -- data ---------------------------------------------------------------------------------------
    def _dataset(self, split: str) -> ShardedBatches:
        """This process's rows of the global batches (its virtual data shards)."""
        batches = SFTBatches if self.run.train.objective == "sft" else ShardedBatches
        return batches(self.run.data, self.tokenizer, split=split, shards=self.data_shards,
                              vocab_size=self.run.model.vocab_size)

    def _put(self, batch: dict) -> dict:
        """The global batch from this process's rows (no process holds the whole batch)."""
        shape = (self.run.data.batch_size, self.run.data.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v, np.int32), shape)
                for k, v in batch.items()}

    def _data_state(self, it: ShardedBatches) -> dict:
        """The data-iterator state of every virtual shard (gathered from the processes that read them)."""
        return ShardedBatches.merge_states(distributed.allgather(it.get_state(), "data_state"))

    def evaluate(self) -> Optional[dict]:
        t = self.run.train
        if t.eval_batches == 0 or self.run.data.val_fraction == 0:
            return None
        tot = n = 0.0
        counts = None
        ds = self._dataset("validation")
        for _ in range(t.eval_batches):
            batch = next(ds)
            if all(distributed.allgather(ds.exhausted, "eval")):  # every shard has ended: nothing left
                break
            s, c, cnt = distributed.host_value(self.eval_step(*self._model_states(), self._put(batch)))
            tot, n = tot + float(s), n + float(c)
            if cnt is not None:
                counts = np.asarray(cnt) if counts is None else counts + np.asarray(cnt)
        if n == 0:
            return None
        res = {"eval_loss": tot / n, "eval_tokens": int(n)}
        if counts is not None:
            res["eval_imbalance"] = (counts.max(-1) / np.maximum(counts.mean(-1), 1e-9)).tolist()
        return res

    def load_init_weights(self) -> None:
        """A new stage (``train.init_from``): the model variables of that checkpoint, restored into this
        run's shardings under this run's model config (its RoPE may differ); a fresh optimizer."""
        p, b, r = restore_model_states(self.init_from, self._model_states())
        self.state = {**self.state, **self.prog.to_staged({"params": p, "bias": b, "rest": r})}
        self.log(f"initialised from {self.init_from}")

    def _model_states(self) -> tuple:
        """``(params, bias, rest)`` in the model layout (a gather when the pipeline split is uneven)."""
        ms = self.prog.to_model({k: self.state[k] for k in ("params", "bias", "rest")})
        return ms["params"], ms["bias"], ms["rest"]

    # -- loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        run, t, d = self.run, self.run.train, self.run.data
        it = iter(self._dataset("train"))
        step, bad, skipped = 0, 0, 0
        metrics_path = self.out / "metrics.jsonl"
        latest = self.ckpt.latest_step()
        if latest is not None:
            # restore into the model layout's shapes and shardings, dropping the fresh state first
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    self.prog.model_abstract, self.prog.model_shardings)
            self.state = None
            (p, b, r), opt, meta = self.ckpt.restore(latest, (abstract["params"], abstract["bias"], abstract["rest"]),
                                                     abstract["opt"])
            self.state = self.prog.to_staged({"params": p, "bias": b, "rest": r, "opt": opt, "applied": jax.device_put(
                jnp.asarray(meta["applied"], jnp.int32), self.state_shardings["applied"])})
            try:
                it.set_state(meta["data_state"])
                step, skipped = int(meta["step"]), int(meta.get("skipped", 0))
            except Exception as e:  # noqa: BLE001 - a state the current data pipeline cannot take
                raise CheckpointError(f"{self.ckpt_dir / str(latest) / 'train_state.json'}: its data-iterator state "
                                      f"does not fit the current data settings ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:200]}) (fix: resume with the data settings that "
                                      "wrote it, or set train.output_dir to a new directory).") from None
            self.log(f"resumed from {self.ckpt_dir / str(latest)} (step {step})")
            ema = self.ckpt.restore_ema(latest, self._model_states()[0]) if self.ema is not None else None
            if ema is not None:
                self.ema.load(step, ema)
        elif self.init_from is not None:
            self.load_init_weights()
        if self.ema is not None and self.ema.step is None:
            self.ema.submit(step, self._model_states()[0])
        if self.primary:
            _truncate_metrics(metrics_path, step)
        writer = _tensorboard(self.out / "tensorboard") if t.tensorboard and self.primary else None
        peak = measure_matmul_peak(jnp.dtype(run.runtime.resolved(run.model).compute_dtype)) * jax.device_count()
        tokens_per_step = d.batch_size * d.seq_len
        bar = _progress(t.steps, step, t.progress and self.primary)
        last = {}
        t_last = time.perf_counter()
        with open(metrics_path if self.primary else os.devnull, "a") as mf:
            while step < t.steps:
                batch = next(it)
                poison = np.float32(np.nan if (step + 1) in self.nan_steps else 0.0)
                self.state, m = self.train_step(self.state, self._put(batch), poison)
                m = distributed.host_value(m)
                self.ckpt.poll()
                step += 1
                if self.ema is not None and self.ema.due(step):
                    self.ema.submit(step, self._model_states()[0])  # returns at once (train/ema.py)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                finite = bool(m["finite"])
                bad = 0 if finite else bad + 1
                skipped += 0 if finite else 1
                tps = tokens_per_step / dt
                rec = {"kind": "train", "step": step, "loss": float(m["loss"]), "ce": float(m["ce"]),
                       "mtp": float(m["mtp"]), "balance": float(m["balance"]), "lr": float(m["lr"]),
                       "grad_norm": float(m["grad_norm"]), "finite": finite, "skipped": skipped,
                       "loss_tokens": int(m["tokens"]), "step_s": dt, "tokens_per_s": tps,
                       "mfu": tps * self.flops_per_token / peak, "rows": int(m["rows"]),
                       "mtp_weight": float(m["mtp_weight"]), "bias_rate": float(m["bias_rate"])}
                if self.ema is not None:
                    rec["ema_dropped"] = self.ema.dropped
                if "imbalance" in m:
                    rec["imbalance"] = [round(float(x), 4) for x in m["imbalance"]]
                if "activations" in m:   # pipelined: peak in-flight micro-batches per stage
                    rec["activations"] = [int(x) for x in m["activations"]]
                if "bias_absmean" in m:
                    rec["bias_absmean"] = [float(x) for x in m["bias_absmean"]]
                    rec["bias_min"] = [float(x) for x in m["bias_min"]]
                    rec["bias_max"] = [float(x) for x in m["bias_max"]]
                if step % t.eval_every == 0 or step == t.steps:
                    ev = self.evaluate()
                    if ev:
                        rec.update(ev)
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                last = rec
                if writer is not None:
                    _tb_log(writer, rec, m, step, t.log_every)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{rec['mfu']:.1%}",
                                    **({"val": f"{rec['eval_loss']:.3f}"} if "eval_loss" in rec else {}))
                if bad >= t.max_bad_steps:
                    self.ckpt.wait()
                    good = self.ckpt.latest_step()
                    if bar is not None:
                        bar.close()
                    raise TrainingStopped(
                        f"stopped at step {step}: {bad} steps in a row had a non-finite loss or gradient (each "
                        f"update was skipped; {skipped} skipped in all). The last good checkpoint "
                        f"{'is ' + str(self.ckpt_dir / str(good)) if good is not None else 'does not exist yet'}"
                        " and is intact (fix: lower train.lr, check the data, or raise train.max_bad_steps).")
                if step % t.checkpoint_every == 0 or step == t.steps:
                    ema = None
                    if self.ema is not None:   # the EMA as of this step (a checkpoint waits for it)
                        if not self.ema.due(step):
                            self.ema.submit(step, self._model_states()[0])
                        ema = self.ema.snapshot()[1]
                    ms = self.prog.to_model({k: self.state[k] for k in ("params", "bias", "rest", "opt")})
                    self.ckpt.save(step, (ms["params"], ms["bias"], ms["rest"]), ms["opt"],
                                   {"step": step, "applied": int(self.state["applied"]), "skipped": skipped,
                                    "data_state": self._data_state(it), "seed": t.seed, "config": run.to_dict()},
                                   ema=ema)
        if bar is not None:
            bar.close()
        self.ckpt.close()
        if self.ema is not None:
            self.ema.close()
        if writer is not None:
            writer.close()
        return {**last, "checkpoint": str(self.ckpt.directory / str(step)), "step": step}


def _quiet(_: str) -> None:
    pass


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written before a crash, recomputed after the resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            pass  # a line cut by the kill
    path.write_text("".join(x + "\n" for x in keep))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _tensorboard(path: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _tb_log(w, rec: dict, m: dict, step: int, every: int) -> None:
    for k in ("loss", "ce", "mtp", "balance", "lr", "grad_norm", "tokens_per_s", "mfu", "eval_loss"):
        if k in rec:
            w.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", rec[k], step)
    w.add_scalar("train/skipped", rec["skipped"], step)
    if step % every == 0 and "counts" in m:
        for i, c in enumerate(np.asarray(m["counts"])):
            w.add_scalar(f"experts/imbalance_layer{i}", float(rec["imbalance"][i]), step)
            w.add_histogram(f"experts/load_layer{i}", c, step)
        for i, v in enumerate(rec.get("bias_absmean", [])):
            w.add_scalar(f"bias/absmean_layer{i}", v, step)
            w.add_scalar(f"bias/range_layer{i}", rec["bias_max"][i] - rec["bias_min"][i], step)


def train(run: RunConfig, log=print) -> dict:
    return Trainer(run, log=log).train()


__all__ = ["Trainer", "TrainingStopped", "train", "measure_matmul_peak", "get_tokenizer"]
