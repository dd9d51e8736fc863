"""Decoding speed (issues M7, M13), one JSON line each:

* ``kv_cache_bytes``: latent vs per-head cache bytes per token (671B).
* ``decode``: our greedy generation vs transformers' ``generate`` (tiny config, same weights, fp32,
  same threads, alternating after a warm-up, load checked).
* ``decode_batch``: plain greedy tokens/s at batch 1 / 4 / 16 and prefill tokens/s, with the MoE
  grouping chosen by rows per expert (auto) beside a fixed 128-row block, and the bf16 latent cache
  beside the fp32 one — all in the same run.
* ``speculative_mtp``: MTP speculative vs plain greedy at batch 1 and 16 (``speedup``, acceptance,
  tokens per step, the verify step's cost over a plain step, identical output).
* ``speculative_step_costs``: the pieces of a decode step timed in a device loop (a plain step, the
  main model on the 2 verified tokens, the MTP depth on 1 and 2 rows, the fused speculative step) as
  microseconds and ratios to a plain step, beside XLA's FLOPs and bytes for each; ``speculative_mtp``
  adds the ceiling ``tokens_per_step / (1 + mtp_cost_ratio)`` and how close the speed-up comes to it.
* ``speculative_acceptance``: speed-up vs a synthetic acceptance rate (the draft replaced by the
  target's own next token with that probability, else by a wrong one; the MTP head still runs, so the
  step costs what it costs) and the lowest rate reaching 1.8×.

    python benchmarks/decode.py [--checkpoint runs/demo/checkpoints/300]   # a trained checkpoint gives
                                                                            # a meaningful acceptance rate
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import emit, log  # noqa: E402

import numpy as np  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402
from dsv3_jax.inference import Generator  # noqa: E402
from dsv3_jax.inference.generate import greedy  # noqa: E402

PROMPT, NEW = 32, 64
RATES = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)


def side_by_side(fns: dict, repeats: int) -> tuple[dict, dict]:
    """``common.side_by_side`` (alternating, warm-up, others' load before and during) when present;
    else alternate with ``common.time_interleaved`` and report the load average."""
    if hasattr(common, "side_by_side"):
        return common.side_by_side(fns, warmup=1, repeats=repeats)
    times = common.time_interleaved(fns, warmup=1, repeats=repeats)
    load = common.load_average()
    return times, {"quiet": load is not None and load < 1.5, "load_avg_1m": load}


def prompts_for(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
    return np.random.RandomState(seed).randint(2, vocab, (batch, PROMPT)).tolist()


def bench_vs_transformers(cfg) -> None:
    import torch

    from tests.hf_reference import hf_model, hf_state, our_model
    threads = common.set_threads() if hasattr(common, "set_threads") else common.num_cores()
    torch.set_num_threads(threads)
    batch = 4
    ref = hf_model(cfg, seed=0)
    ours = our_model(cfg, hf_state(ref))
    prompts = prompts_for(cfg.vocab_size, batch)
    gen = Generator(ours, cache_dtype="float32")   # transformers' cache is fp32 too: the same work
    ids = torch.tensor(prompts)
    out = {}

    def theirs():
        with torch.no_grad():
            out["hf"] = ref.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True)

    def ours_fn():
        out["ours"] = gen(prompts, max_new_tokens=NEW)

    times, load = side_by_side({"ours": ours_fn, "transformers": theirs}, repeats=3)
    same = sum(a == b for r, o in zip(out["ours"].tokens, out["hf"][:, PROMPT:].tolist())
               for a, b in zip(r, o)) / (batch * NEW)
    t_o, t_h = times["ours"]["median_s"], times["transformers"]["median_s"]
    emit({"bench": "decode", "config": cfg.name, "batch": batch, "prompt": PROMPT, "new_tokens": NEW,
          "threads": threads, "tokens_per_s_ours": batch * NEW / t_o, "tokens_per_s_transformers": batch * NEW / t_h,
          "ratio": t_h / t_o, "greedy_tokens_agree": same, **load})


def _gen_time(gen: Generator, prompts, **kw) -> float:
    t0 = time.perf_counter()
    gen(prompts, **kw)
    return time.perf_counter() - t0


def bench_batches(model, label: str) -> None:
    """Plain greedy decode tokens/s per batch size: auto grouping + bf16 cache (the defaults) beside a
    fixed 128-row MoE block and beside the fp32 cache; prefill tokens/s (a 32-token prompt)."""
    rt = model.runtime
    variants = {"auto_bf16": (model, "bfloat16"), "auto_fp32": (model, "float32"),
                "block128_bf16": (model.with_runtime(rt.replace(moe_block_size=128)), "bfloat16")}
    gens = {k: Generator(m, cache_dtype=dt) for k, (m, dt) in variants.items()}
    for batch in (1, 4, 16):
        prompts = prompts_for(model.cfg.vocab_size, batch, seed=batch)
        fns = {k: (lambda g=g: g(prompts, max_new_tokens=NEW)) for k, g in gens.items()}
        fns["prefill"] = lambda: gens["auto_bf16"](prompts, max_new_tokens=1)
        times, load = side_by_side(fns, repeats=3)
        pre = times["prefill"]["median_s"]
        tps = {k: batch * (NEW - 1) / max(1e-9, times[k]["median_s"] - pre) for k in gens}
        same = gens["auto_bf16"](prompts, max_new_tokens=NEW).tokens == gens["auto_fp32"](prompts, max_new_tokens=NEW).tokens
        emit({"bench": "decode_batch", "model": label, "batch": batch, "prompt": PROMPT, "new_tokens": NEW,
              "decode_tokens_per_s": tps["auto_bf16"], "decode_tokens_per_s_fp32_cache": tps["auto_fp32"],
              "decode_tokens_per_s_block128": tps["block128_bf16"],
              "ratio_bf16_vs_fp32_cache": tps["auto_bf16"] / tps["auto_fp32"],
              "ratio_auto_vs_block128": tps["auto_bf16"] / tps["block128_bf16"],
              "prefill_tokens_per_s": batch * PROMPT / pre, "greedy_bf16_equals_fp32_cache": same, **load})


def oracle_draft(gen: Generator, plain_tokens: list[list[int]], prompts, rate: float, seed: int = 0):
    """Replace the MTP draft by the target's own next token (from plain greedy) with probability
    ``rate`` per position, else by a wrong token; the real MTP head still runs (same cost)."""
    import jax
    import jax.numpy as jnp
    vocab = gen.cfg.vocab_size
    full = jnp.asarray([p + t + [0, 0, 0] for p, t in zip(prompts, plain_tokens)], jnp.int32)   # [B, T]
    u = jax.random.uniform(jax.random.key(seed), full.shape)
    real = gen.mtp

    def mtp(state, hidden, next_tokens, positions, cache):
        logits, cache = real(state, hidden, next_tokens, positions, cache)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(next_tokens.shape[1]), next_tokens.shape)
        at = jnp.minimum(positions + 2, full.shape[1] - 1)
        want = jnp.take_along_axis(full, at, 1)
        right = jnp.take_along_axis(u, at, 1) < rate
        tok = jnp.where(right, want, (want + 1) % vocab)
        return logits + jax.nn.one_hot(tok, vocab) * 1e4, cache
    return mtp


STEP_LOOP = 32   # steps per timed call of a step piece


def step_pieces(gen: Generator, batch: int) -> dict:
    """The pieces of a decode step as ``(loop, one, args)``: ``loop(state, cache, *args)`` runs
    ``STEP_LOOP`` steps in one ``fori_loop`` (each step's tokens fed back; no dispatch, no host),
    ``one(state, cache, *args, i)`` one step. ``plain``: the main model on 1 token + argmax (a plain
    step); ``main2``: the main model on the 2 verified tokens; ``mtp1``/``mtp2``: the MTP depth (embedding, block, head) on 1 / 2 rows;
    ``spec``: the whole fused speculative step (``Generator.spec_step``)."""
    import jax
    import jax.numpy as jnp
    rng = np.random.RandomState(batch)
    toks = jnp.asarray(rng.randint(2, gen.cfg.vocab_size, (batch, 2)), jnp.int32)
    hid = jnp.asarray(rng.randn(batch, 2, gen.cfg.hidden_size), jnp.float32)
    pos0 = jnp.full((batch,), PROMPT, jnp.int32)

    def at(i):   # positions cycle over 8 slots past the prompt: the cache stays within its length
        return pos0 + i % 8

    def plain(st, c, t, h, i):
        lg, _, c = gen.step(st, t[:, :1], at(i)[:, None], c)
        return t.at[:, 0].set(greedy(lg[:, 0])), c

    def main2(st, c, t, h, i):
        lg, _, c = gen.step(st, t, at(i)[:, None] + jnp.arange(2), c)
        return greedy(lg), c

    def mtp1(st, c, t, h, i):
        lg, c = gen.mtp(st, h[:, :1], t[:, :1], at(i)[:, None], c)
        return t.at[:, 0].set(greedy(lg[:, 0])), c

    def mtp2(st, c, t, h, i):
        lg, c = gen.mtp(st, h, t, at(i)[:, None] + jnp.arange(2), c)
        return greedy(lg), c

    def spec(st, c, t, h, i):
        a1, _, _, draft, c = gen.spec_step(st, t[:, 0], t[:, 1], at(i), c)
        return jnp.stack([a1, draft], 1), c

    def looped(piece):
        def run(st, c, t, h):
            return jax.lax.fori_loop(0, STEP_LOOP, lambda i, tc: piece(st, tc[1], tc[0], h, i), (t, c))
        return run
    return {k: (looped(f), f, (toks, hid)) for k, f in
            {"plain": plain, "main2": main2, "mtp1": mtp1, "mtp2": mtp2, "spec": spec}.items()}


def step_costs(gen: Generator, batch: int) -> dict:
    """Per-step microseconds of each piece (``step_pieces``; fastest of the interleaved repeats: the
    least disturbed by others' load), their ratios to a plain step, and XLA's own FLOPs and bytes for
    one step of each piece (``cost_analysis``), as ratios to a plain step."""
    import jax
    from dsv3_jax.model import init_cache
    cache = init_cache(gen.cfg, batch, PROMPT + NEW + 2, gen.cache_dtype, mtp=True)
    pieces = step_pieces(gen, batch)
    fns, cost = {}, {}
    for k, (loop, one, args) in pieces.items():
        run = jax.jit(loop)
        fns[k] = lambda run=run, args=args: jax.block_until_ready(run(gen.state, cache, *args))
        ca = jax.jit(lambda st, c, t, h, one=one: one(st, c, t, h, 0)).lower(gen.state, cache, *args).compile()
        ca = ca.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        cost[k] = (float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0)))
    times, load = side_by_side(fns, repeats=7)
    us = {k: times[k]["min_s"] / STEP_LOOP * 1e6 for k in fns}
    return {"batch": batch, "us_per_step": us, "cost_ratio": {k: v / us["plain"] for k, v in us.items()},
            "flops_ratio": {k: v[0] / cost["plain"][0] for k, v in cost.items()},
            "bytes_ratio": {k: v[1] / cost["plain"][1] for k, v in cost.items()}, **load}


def bench_speculative(model, label: str) -> None:
    fp32 = Generator(model, cache_dtype="float32")
    for batch in (1, 16):
        prompts = prompts_for(model.cfg.vocab_size, batch, seed=100 + batch)
        gen = Generator(model)
        costs = step_costs(gen, batch)
        emit({"bench": "speculative_step_costs", "model": label, **costs})
        res = {}
        fns = {"plain": lambda: res.__setitem__("plain", gen(prompts, max_new_tokens=NEW)),
               "mtp": lambda: res.__setitem__("mtp", gen(prompts, max_new_tokens=NEW, speculative="mtp")),
               "prefill_plain": lambda: gen(prompts, max_new_tokens=1),
               "prefill_mtp": lambda: gen(prompts, max_new_tokens=1, speculative="mtp")}
        times, load = side_by_side(fns, repeats=5)
        # fastest of the alternating repeats: a 64-token generation is tens of ms, and on a shared machine
        # the median carries others' load into the prefill-subtracted decode time
        med = {k: v["min_s"] for k, v in times.items()}
        dec_plain, dec_mtp = med["plain"] - med["prefill_plain"], med["mtp"] - med["prefill_mtp"]
        step_ratio = (dec_mtp / res["mtp"].steps) / (dec_plain / res["plain"].steps)
        # the ceiling: a step emits tokens_per_step tokens and costs at least a plain step plus the MTP
        # depth on the rows it drafts from (docs/design.md §Speculative decoding)
        tps, cr = res["mtp"].tokens_per_step, costs["cost_ratio"]
        ceiling = tps / (1 + cr["mtp2"])
        exact = (fp32(prompts, max_new_tokens=NEW, speculative="mtp").tokens
                 == fp32(prompts, max_new_tokens=NEW).tokens)
        emit({"bench": "speculative_mtp", "model": label, "batch": batch, "new_tokens": NEW,
              "tokens_per_s_plain": batch * NEW / med["plain"], "tokens_per_s_mtp": batch * NEW / med["mtp"],
              "speedup": med["plain"] / med["mtp"], "decode_speedup": dec_plain / dec_mtp,
              "acceptance_rate": res["mtp"].acceptance_rate, "tokens_per_step": res["mtp"].tokens_per_step,
              "verify_step_cost_ratio": step_ratio, "verify_step_cost_ratio_loop": cr["spec"],
              "main_2_token_cost_ratio": cr["main2"], "mtp_cost_ratio": cr["mtp2"], "mtp_1_row_cost_ratio": cr["mtp1"],
              "ceiling_speedup": ceiling, "ceiling_speedup_1_row_mtp": tps / (1 + cr["mtp1"]),
              "fraction_of_ceiling": (dec_plain / dec_mtp) / ceiling,
              "identical_output": res["mtp"].tokens == res["plain"].tokens, "identical_output_fp32": exact, **load})
        table, reach = [], None
        for rate in RATES:
            g = Generator(model)
            g.mtp = oracle_draft(g, res["plain"].tokens, prompts, rate)
            out = {}
            t, load = side_by_side({"plain": lambda: gen(prompts, max_new_tokens=NEW),
                                    "mtp": lambda: out.__setitem__("r", g(prompts, max_new_tokens=NEW,
                                                                          speculative="mtp"))}, repeats=3)
            sp = t["plain"]["min_s"] / t["mtp"]["min_s"]
            dsp = (t["plain"]["min_s"] - med["prefill_plain"]) / max(1e-9, t["mtp"]["min_s"] - med["prefill_mtp"])
            r_tps = out["r"].tokens_per_step
            table.append({"rate": rate, "acceptance": round(out["r"].acceptance_rate, 4), "speedup": round(sp, 4),
                          "decode_speedup": round(dsp, 4), "tokens_per_step": round(r_tps, 4),
                          "ceiling_speedup": round(r_tps / (1 + cr["mtp2"]), 4), "quiet": load["quiet"]})
            if reach is None and sp >= 1.8:
                reach = out["r"].acceptance_rate
        emit({"bench": "speculative_acceptance", "model": label, "batch": batch, "new_tokens": NEW,
              "table": table, "acceptance_reaching_1.8x": reach, "quiet": all(r["quiet"] for r in table)})


def bench_cache_bytes() -> None:
    from dsv3_jax.info import model_info
    info = model_info(dsv3.load_config("deepseek_v3_671b"))
    emit({"bench": "kv_cache_bytes", "config": "deepseek_v3_671b",
          "latent_bytes_per_token": info["kv_cache_bytes_per_token"],
          "per_head_bytes_per_token": info["kv_cache_bytes_per_token_per_head_cache"],
          "ratio": info["kv_cache_bytes_per_token_per_head_cache"] / info["kv_cache_bytes_per_token"]})


def main() -> None:
    global NEW
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint for the batch and speculative figures (default: random tiny)")
    ap.add_argument("--only", choices=("bytes", "transformers", "batch", "speculative"), action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--new-tokens", type=int, default=NEW, help="tokens generated per prompt")
    args = ap.parse_args()
    NEW = args.new_tokens
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    parts = set(args.only or ("bytes", "transformers", "batch", "speculative"))
    if "bytes" in parts:
        bench_cache_bytes()
    if "transformers" in parts:
        log("decode: ours vs transformers generate (tiny config, fp32)")
        bench_vs_transformers(dsv3.load_config("tiny", ["num_mtp_layers=0"]))
    if args.checkpoint:
        _, model = dsv3.load_checkpoint(args.checkpoint)
        label = args.checkpoint
    else:
        from flax import nnx
        model = dsv3.DeepSeekV3(dsv3.load_config("tiny"), rngs=nnx.Rngs(0))
        label = "tiny (random init: acceptance is near 0; pass --checkpoint for a trained model)"
    if "batch" in parts:
        log(f"decode: batch 1/4/16 and prefill ({label})")
        bench_batches(model, label)
    if "speculative" in parts:
        log(f"decode: MTP speculative vs plain, and vs synthetic acceptance ({label})")
        bench_speculative(model, label)


if __name__ == "__main__":
    main()
