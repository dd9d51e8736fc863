"""``dsv3 train``: the pre-training loop, top to bottom (nanoGPT-style), on one CPU or a pod mesh.

    tokenizer ─ grain train/validation iterators ─ mesh (sharding.make_mesh) ─ model state created
    sharded (jit with out_shardings) ─ AdamW ─ restore the latest checkpoint (params, optimizer,
    router bias, step, data-iterator state) ─ loop: jitted step ─ metrics (progress bar, JSONL,
    TensorBoard) ─ eval every N ─ async checkpoint every N ─ stop after N non-finite steps in a row.

Resuming after ``kill -9`` restarts from the last complete checkpoint and reproduces the uninterrupted
run's losses exactly (same config, same device): the data iterator's state is saved with the step.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding import DEFAULT_RULES, make_mesh

from ..data import document_ids, make_dataset, open_source
from ..data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from ..checkpoint.orbax_io import Checkpointer, check_writable, state_bytes
from ..config import ConfigError
from ..errors import Dsv3Error
from ..info import model_info
from ..model.layers import RouterBias
from .config import RunConfig
from .program import train_program
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
    if path.is_file():
        return load_tokenizer(path)
    src = open_source(run.data.path, glob=run.data.glob, text_field=run.data.text_field)
    ids = document_ids(len(src), run.data, "train", shard_index=0, shard_count=1)
    n = run.train.tokenizer_documents or len(ids)
    log(f"training a {run.model.vocab_size}-token BPE tokenizer on {min(n, len(ids))} documents of {run.data.path} ...")
    tok = train_tokenizer((src[int(i)] for i in ids[:n]), run.model.vocab_size, length=min(n, len(ids)))
    tok.save(path)
    return load_tokenizer(path)


class Trainer:
    def __init__(self, run: RunConfig, *, log=print):
        self.run, self.log = run, log
        cfg, t, d = run.model, run.train, run.data
        if cfg.fp8_weights:
            raise ConfigError("model.fp8_weights=true stores weights as e4m3 for inference and cannot be trained "
                              "(fix: set model.fp8_weights=false — FP8 training is runtime.quant=fp8 on fp32 master "
                              "weights — or convert the checkpoint without --keep-fp8).")
        self.out = Path(t.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        check_writable(self.ckpt_dir, 1 << 20)  # before any work; the size check follows below
        # no --mesh: the 1×1×1×1 mesh on the first device (same code path); a pod passes e.g. data=-1,expert=8
        self.mesh = make_mesh(t.mesh) if t.mesh else make_mesh(None, devices=jax.devices()[:1])
        self.rules = DEFAULT_RULES
        self.rules.check_batch(d.batch_size // t.grad_accum, self.mesh, "micro-batch size (data.batch_size / "
                                                                         "train.grad_accum)")
        self.batch_sharding = self.rules.batch_sharding(self.mesh)

        # the step as one program over the mesh (shared with `dsv3 plan`): model built for the mesh (MoE
        # layers expert-parallel, kernels per shard), state created directly in its shards
        prog = train_program(cfg, run.runtime, t, self.mesh, self.rules, seed=t.seed,
                             donate=jax.default_backend() != "cpu")
        self.graphdef, sh, a = prog.graphdef, prog.shardings, prog.abstract
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
        self.state = {**model_state, "opt": opt,
                      "applied": jax.device_put(jnp.zeros((), jnp.int32), sh["applied"])}
        self.state_shardings = sh

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
    def _dataset(self, split: str):
        return make_dataset(self.run.data, self.tokenizer, split=split, vocab_size=self.run.model.vocab_size)

    def _put(self, batch: dict) -> dict:
        return {k: jax.device_put(np.asarray(v, np.int32), self.batch_sharding) for k, v in batch.items()}

    def evaluate(self) -> Optional[dict]:
        t = self.run.train
        if t.eval_batches == 0 or self.run.data.val_fraction == 0:
            return None
        tot = n = 0.0
        counts = None
        for i, batch in enumerate(self._dataset("validation")):
            if i >= t.eval_batches:
                break
            s, c, cnt = self.eval_step(self.state["params"], self.state["bias"], self.state["rest"], self._put(batch))
            tot, n = tot + float(s), n + float(c)
            if cnt is not None:
                counts = np.asarray(cnt) if counts is None else counts + np.asarray(cnt)
        if n == 0:
            return None
        res = {"eval_loss": tot / n, "eval_tokens": int(n)}
        if counts is not None:
            res["eval_imbalance"] = (counts.max(-1) / np.maximum(counts.mean(-1), 1e-9)).tolist()
        return res

    # -- loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        run, t, d = self.run, self.run.train, self.run.data
        it = iter(self._dataset("train"))
        step, bad, skipped = 0, 0, 0
        metrics_path = self.out / "metrics.jsonl"
        latest = self.ckpt.latest_step()
        model_states = (self.state["params"], self.state["bias"], self.state["rest"])
        if latest is not None:
            # restore into the live state's shapes and shardings, dropping the fresh state first
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    (model_states, self.state["opt"]))
            self.state = model_states = None
            (p, b, r), opt, meta = self.ckpt.restore(latest, *abstract)
            self.state = {"params": p, "bias": b, "rest": r, "opt": opt,
                          "applied": jax.device_put(jnp.asarray(meta["applied"], jnp.int32), self.state_shardings["applied"])}
            it.set_state(meta["data_state"])
            step, skipped = int(meta["step"]), int(meta.get("skipped", 0))
            self.log(f"resumed from {self.ckpt_dir / str(latest)} (step {step})")
        _truncate_metrics(metrics_path, step)
        writer = _tensorboard(self.out / "tensorboard") if t.tensorboard else None
        peak = measure_matmul_peak(jnp.dtype(run.runtime.resolved(run.model).compute_dtype)) * jax.device_count()
        tokens_per_step = d.batch_size * d.seq_len
        bar = _progress(t.steps, step, t.progress)
        last = {}
        t_last = time.perf_counter()
        with open(metrics_path, "a") as mf:
            while step < t.steps:
                batch = next(it)
                poison = np.float32(np.nan if (step + 1) in self.nan_steps else 0.0)
                self.state, m = self.train_step(self.state, self._put(batch), poison)
                m = jax.device_get(m)
                self.ckpt.poll()
                step += 1
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
                       "mfu": tps * self.flops_per_token / peak}
                if "imbalance" in m:
                    rec["imbalance"] = [round(float(x), 4) for x in m["imbalance"]]
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
                    self.ckpt.save(step, (self.state["params"], self.state["bias"], self.state["rest"]),
                                   self.state["opt"],
                                   {"step": step, "applied": int(self.state["applied"]), "skipped": skipped,
                                    "data_state": it.get_state(), "seed": t.seed, "config": run.to_dict()})
        if bar is not None:
            bar.close()
        self.ckpt.close()
        if writer is not None:
            writer.close()
        return {**last, "checkpoint": str(self.ckpt.directory / str(step)), "step": step}


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
