"""Full training-step throughput: our jitted ``dsv3 train`` step vs a transformers PyTorch training step.

Both sides hold the same weights (transformers' random init copied into our model through the HF
mapping), see the same batch, compute in fp32, and do the same work per step: forward, mean next-token
cross-entropy, backward, global-norm clip 1.0 and an AdamW update (β 0.9/0.95, weight decay 0.1).
Ours is the trainer's step (``dsv3_jax.train.step.make_train_step``: one ``jax.jit`` of
``(graphdef, state, batch)``), which also computes the sequence-wise balance loss and the aux-loss-free
bias update; MTP is off (transformers has none). Both sides run on the same number of threads (all
cores), are timed alternately after a warm-up, and the run records whether other processes were
quiet (``common.side_by_side``; ``"quiet": false`` figures are not quoted). MFU divides the achieved
model FLOP/s (``dsv3 info``'s ``train_flops_per_token`` × tokens/s) by this CPU's FMA peak (cores × FMA
width × 2 × clock, ``common.fma_peak``); ``mfu_ours_vs_matmul`` divides by the measured fp32 matmul
figure (a 1024² ``jnp`` matmul on all cores, the trainer's progress-bar figure) instead.

Prints one JSON line per config:
  {"bench": "train_step", "config", "params", "batch", "seq", "tokens_per_s_ours",
   "tokens_per_s_transformers", "ratio", "achieved_flops_ours", "fma_peak_flops", "mfu_ours",
   "matmul_peak_flops", "mfu_ours_vs_matmul", "quiet", "others_cores_before", "others_cores_during", ...}
``ratio`` = ours / transformers (> 1: we are faster).

Usage: .venv/bin/python benchmarks/train_step.py [--configs tiny,100m] [--repeats N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fma_peak, log, set_threads, side_by_side  # noqa: E402
from forward_backward import CONFIG_100M, build_config, build_runtime, hf_model  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

CASES = {  # (config, batch, seq, timed steps per side, MoE block rows as in forward_backward.py)
    "tiny": ("tiny", 8, 128, 7, 16),
    "100m": (CONFIG_100M, 4, 256, 3, 128),
}


def make_batch(tokens: np.ndarray) -> dict:
    B, S1 = tokens.shape
    S = S1 - 1
    mask = np.ones((B, S), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, S), np.int32),
            "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(), "loss_mask": mask}


def prepare_ours(cfg, state, tokens, runtime):
    from flax import nnx

    from dsv3_jax.model.layers import RouterBias
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.optim import lr_schedule, make_optimizer
    from dsv3_jax.train.step import make_train_step
    from tests.hf_reference import our_model
    model = our_model(cfg, state, runtime=runtime)
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    t = TrainConfig(steps=1000, lr=1e-3, mtp_weight=0.0, batch_ramp_start=1.0)  # every row trains at update 0
    tx = make_optimizer(t, params)
    st = {"params": params, "bias": bias, "rest": rest, "opt": tx.init(params), "applied": jnp.zeros((), jnp.int32)}
    step = jax.jit(make_train_step(graphdef, cfg, t, tx, lr_schedule(t)))
    batch = {k: jnp.asarray(v) for k, v in make_batch(tokens).items()}
    poison = jnp.float32(0)
    compiled = step.lower(st, batch, poison).compile()
    holder = {"st": st}

    def run():
        holder["st"], m = compiled(holder["st"], batch, poison)
        return m
    m = run()
    return float(m["ce"]), run


def prepare_hf(model, tokens):
    import torch
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    decay = [p for n, p in model.named_parameters() if "norm" not in n and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or "embed_tokens" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss
    return float(step().detach()), step


def run_case(name, spec, batch, seq, repeats, peak, block, threads):

    from dsv3_jax.info import model_info
    from tests.hf_reference import hf_state
    cfg = build_config(spec)
    info = model_info(cfg, seq)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    ntok = batch * seq
    log(f"[{name}] building transformers model and compiling our train step ...")
    ref = hf_model(cfg)
    state = hf_state(ref)
    loss_ours, ours = prepare_ours(cfg, state, tokens, build_runtime(block))
    loss_hf, hf = prepare_hf(ref, tokens)
    log(f"[{name}] timing {repeats} interleaved steps each ...")
    t, load = side_by_side({"ours": ours, "hf": hf}, warmup=1, repeats=repeats, sync={"ours": jax.block_until_ready})
    tps_ours, tps_hf = ntok / t["ours"]["median_s"], ntok / t["hf"]["median_s"]
    achieved = tps_ours * info["train_flops_per_token"]
    fma = fma_peak()
    emit({"bench": "train_step", "config": cfg.name, "params": info["params_total"], "batch": batch, "seq": seq,
          "tokens_per_s_ours": tps_ours, "tokens_per_s_transformers": tps_hf, "ratio": tps_ours / tps_hf,
          "achieved_flops_ours": achieved, **fma, "mfu_ours": achieved / fma["fma_peak_flops"],
          "mfu_transformers": tps_hf * info["train_flops_per_token"] / fma["fma_peak_flops"],
          "matmul_peak_flops": peak, "mfu_ours_vs_matmul": achieved / peak,
          "train_flops_per_token": info["train_flops_per_token"], "dtype": "float32",
          "step_s_ours": t["ours"]["median_s"], "step_s_transformers": t["hf"]["median_s"],
          "first_loss_ours": loss_ours, "first_loss_transformers": loss_hf, "repeats": repeats,
          "threads_ours": threads, "threads_transformers": threads, **load})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,100m", help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per side (median reported)")
    args = ap.parse_args(argv)
    threads = set_threads()  # PyTorch on the cores XLA:CPU uses
    from dsv3_jax.train.trainer import measure_matmul_peak
    peak = measure_matmul_peak(jnp.float32)
    for name in args.configs.split(","):
        spec, batch, seq, repeats, block = CASES[name]
        run_case(name, spec, batch, seq, args.repeats or repeats, peak, block, threads)


if __name__ == "__main__":
    main()
