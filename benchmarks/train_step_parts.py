"""Where the train step's time goes: the 100M (or tiny) step bisected into its parts, each timed alone.

Each part is one ``jax.jit`` of that part's forward + backward (the gradient w.r.t. its parameters
and its input, as inside the full step), on the shapes the full step sees, with the step's runtime
(fp32, remat, scan). Parts: the embedding + final norm + output head + cross-entropy; one dense
block; one MoE block and, inside it, the MLA attention, the router, the routed experts (sort,
block-padded grouped GEMM, un-sort) and the shared expert; the optimizer update (clip + AdamW +
decay on a gradient-shaped tree); and the whole step (``make_train_step``, as
``benchmarks/train_step.py`` times it). ``sum_of_parts`` adds them up as the full step runs them
(dense blocks × first_k_dense, MoE blocks × num_moe_layers), so its ratio to the full step says
how much the bisection misses (scan/remat plumbing, layout copies across part boundaries).

The parts are candidates of one ``side_by_side`` run (alternating, load recorded). The baseline of
each line is the full step measured in the same run; ``ratio`` = part / full step.
Prints one JSON line per part: {"bench": "train_step_parts", "config", "part", "seconds",
"step_seconds", "ratio", "flops", "gflops_per_s", "quiet", ...}.

Usage: .venv/bin/python benchmarks/train_step_parts.py [--config 100m] [--repeats 3] [--remat R] [--block N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, side_by_side  # noqa: E402
from forward_backward import CONFIG_100M, build_config  # noqa: E402
from train_step import make_batch  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402

CASES = {"tiny": ("tiny", 8, 128), "100m": (CONFIG_100M, 4, 256)}


def _grad_of(fn, *args):
    """jit of value_and_grad of ``sum(fn(*args))`` w.r.t. every argument (float leaves)."""
    def loss(*a):
        out = fn(*a)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out)
                   if jnp.issubdtype(x.dtype, jnp.floating))
    g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
    compiled = g.lower(*args).compile()
    return lambda: compiled(*args)


def layer_of(stack, i: int = 0):
    """Layer ``i`` of a stacked block (nnx.vmap-made) as a module of its own."""
    from flax import nnx
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def build_parts(cfg, runtime, batch: int, seq: int) -> tuple[dict, dict]:
    from flax import nnx

    from dsv3_jax.model.rope import rope_angles
    from dsv3_jax.model.transformer import run_stack
    from dsv3_jax.train.config import TrainConfig
    from dsv3_jax.train.losses import token_ce_sum
    from dsv3_jax.train.optim import lr_schedule, make_optimizer
    from dsv3_jax.train.step import make_train_step
    from dsv3_jax.model.layers import RouterBias

    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime)
    ex = model.ex
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = {k: jnp.asarray(v) for k, v in make_batch(tokens).items()}
    B, S, D = batch, seq, cfg.hidden_size
    h = jax.random.normal(jax.random.key(1), (B, S, D), jnp.float32)
    cos, sin = rope_angles(cfg, b["positions"])
    seg, valid = b["segment_ids"], b["segment_ids"] > 0
    parts, mult = {}, {}

    # embedding + final norm + head + CE
    def head_ce(embed, norm_scale, head, h):
        e = embed[b["inputs"]]
        hf = (h + e).astype(jnp.float32)
        hf = hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + cfg.rms_norm_eps) * norm_scale
        logits = jnp.dot(hf, head, preferred_element_type=jnp.float32)
        return token_ce_sum(logits, b["targets"], b["loss_mask"])[0]
    parts["embed_head_ce"] = _grad_of(head_ce, model.embed[...], model.final_norm.scale[...], model.lm_head[...], h)
    mult["embed_head_ce"] = 1

    def stack_fn(stack):
        gd, st = nnx.split(stack)

        def f(st, h):
            out, stats, _ = run_stack(nnx.merge(gd, st), h, cos, sin, seg, valid, ex)
            return out, (None if stats is None else stats.seq_probs)
        return f, st

    if cfg.first_k_dense:
        f, st = stack_fn(model.dense_layers)
        parts["dense_stack"] = _grad_of(f, st, h)
        mult["dense_stack"] = 1
    f, st = stack_fn(model.moe_layers)
    parts["moe_stack"] = _grad_of(f, st, h)
    mult["moe_stack"] = 1

    # inside one MoE block (no remat: each part's own forward + backward)
    blk = layer_of(model.moe_layers)
    for name, mod, call in (
            ("mla", blk.attn, lambda m, x: m(x, cos, sin, seg)[0]),
            ("router", blk.mlp.router, lambda m, x: m(x.reshape(-1, D)).weights),
            ("routed_experts", blk.mlp, lambda m, x: _routed(m, x)),
            ("shared_expert", blk.mlp.shared, lambda m, x: m(x))):
        gd, st = nnx.split(mod)
        parts[f"moe_layer.{name}"] = _grad_of(lambda st, x, gd=gd, call=call: call(nnx.merge(gd, st), x), st, h)
        mult[f"moe_layer.{name}"] = 0   # inside moe_stack: not added again

    # optimizer: clip + AdamW + decay + apply on a gradient-shaped tree
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    t = TrainConfig(steps=1000, lr=1e-3, mtp_weight=0.0, batch_ramp_start=1.0)
    tx = make_optimizer(t, params)
    opt = tx.init(params)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)

    def opt_step(grads, opt, params):
        import optax
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt, optax.tree.norm(grads)
    c_opt = jax.jit(opt_step, donate_argnums=(1,)).lower(grads, opt, params).compile()
    holder = {"opt": opt}

    def run_opt():
        p, holder["opt"], n = c_opt(grads, holder["opt"], params)
        return n
    parts["optimizer"] = run_opt
    mult["optimizer"] = 1

    cp = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates its state)
    st = {"params": cp(params), "bias": cp(bias), "rest": cp(rest), "opt": tx.init(params),
          "applied": jnp.zeros((), jnp.int32)}
    step = jax.jit(make_train_step(graphdef, cfg, t, tx, lr_schedule(t)), donate_argnums=(0,))
    poison = jnp.float32(0)
    c_step = step.lower(st, b, poison).compile()
    sh = {"st": st}

    def run_step():
        sh["st"], m = c_step(sh["st"], b, poison)
        return m["loss"]
    parts["full_step"] = run_step
    return parts, mult


def _routed(moe, x):
    """The routed experts of one MoE layer: routing (no gradient to the router here) + expert sum."""
    B, S, D = x.shape
    flat = x.reshape(B * S, D)
    r = moe.router(flat)
    ws = moe.experts.weights(jnp.float32)
    return moe._expert_fn(True, B * S)(flat, jax.lax.stop_gradient(r.experts), jax.lax.stop_gradient(r.weights), *ws)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="100m", choices=sorted(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--remat", default=None, help="RuntimeConfig.remat (default: the runtime's default)")
    ap.add_argument("--block", type=int, default=0, help="RuntimeConfig.moe_block_size (0: auto)")
    ap.add_argument("--scan", default="1", help="scan_layers 1|0")
    ap.add_argument("--moe-impl", default="auto", help="RuntimeConfig.moe_impl (auto: looped on CPU)")
    args = ap.parse_args(argv)
    spec, batch, seq = CASES[args.config]
    cfg = build_config(spec)
    kw = {} if args.remat is None else {"remat": args.remat}
    runtime = dsv3.RuntimeConfig(compute_dtype="float32", moe_block_size=args.block, scan_layers=args.scan == "1",
                                 moe_impl=args.moe_impl, **kw)
    log(f"[{args.config}] compiling parts ...")
    parts, mult = build_parts(cfg, runtime, batch, seq)
    log(f"[{args.config}] timing {args.repeats} interleaved rounds ...")
    t, load = side_by_side(parts, warmup=1, repeats=args.repeats, sync={k: jax.block_until_ready for k in parts})
    step_s = t["full_step"]["median_s"]
    total = sum(t[k]["median_s"] * mult[k] for k in mult)
    rt = {"remat": runtime.remat, "moe_impl": args.moe_impl, "moe_block_size": args.block,
          "scan_layers": runtime.scan_layers}
    for k in parts:
        emit({"bench": "train_step_parts", "config": cfg.name, "part": k, "seconds": t[k]["median_s"],
              "step_seconds": step_s, "ratio": t[k]["median_s"] / step_s, **rt, **load})
    emit({"bench": "train_step_parts", "config": cfg.name, "part": "sum_of_parts", "seconds": total,
          "step_seconds": step_s, "ratio": total / step_s, **rt, **load})


if __name__ == "__main__":
    main()
