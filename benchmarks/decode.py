"""Decoding speed (issue M7): tokens/s of our latent-cache generation vs transformers' ``generate``
with the same weights and prompts, MTP speculative vs plain decoding, and latent vs per-head cache
bytes. One JSON line each.

    python benchmarks/decode.py [--checkpoint DIR]   # a trained checkpoint gives a meaningful
                                                     # MTP acceptance rate (the demo's, for example)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, load_average, log, num_cores  # noqa: E402

import numpy as np  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402
from dsv3_jax.inference import Generator  # noqa: E402

BATCH, PROMPT, NEW = 4, 32, 64
# fp32 compute (the tiny config's parameter dtype) and 16-row MoE blocks
RUNTIME = dsv3.RuntimeConfig(moe_block_size=16)


def bench_vs_transformers(cfg) -> None:
    import torch
    from flax import nnx

    from tests.hf_reference import hf_model, hf_state, our_model
    torch.set_num_threads(num_cores())
    ref = hf_model(cfg, seed=0)
    ours = our_model(cfg, hf_state(ref), runtime=RUNTIME)
    prompts = np.random.RandomState(0).randint(2, cfg.vocab_size, (BATCH, PROMPT))
    gen = Generator(ours)
    gen(prompts.tolist(), max_new_tokens=NEW)  # compile
    t0 = time.perf_counter()
    res = gen(prompts.tolist(), max_new_tokens=NEW)
    ours_s = time.perf_counter() - t0
    with torch.no_grad():
        ids = torch.tensor(prompts)
        ref.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = ref.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True)
        hf_s = time.perf_counter() - t0
    same = sum(a == b for r, o in zip(res.tokens, out[:, PROMPT:].tolist()) for a, b in zip(r, o)) / (BATCH * NEW)
    emit({"bench": "decode", "config": cfg.name, "batch": BATCH, "prompt": PROMPT, "new_tokens": NEW,
          "tokens_per_s_ours": BATCH * NEW / ours_s, "tokens_per_s_transformers": BATCH * NEW / hf_s,
          "ratio": hf_s / ours_s, "greedy_tokens_agree": same, "load_average": load_average()})


def bench_speculative(model, label: str) -> None:
    gen = Generator(model)
    prompts = np.random.RandomState(1).randint(2, model.cfg.vocab_size, (1, PROMPT)).tolist()
    for spec in (None, "mtp"):
        gen(prompts, max_new_tokens=NEW, speculative=spec)  # compile (the cache length is part of the shape)
    times = {}
    results = {}
    for spec in (None, "mtp"):
        t0 = time.perf_counter()
        results[spec] = gen(prompts, max_new_tokens=NEW, speculative=spec)
        times[spec] = time.perf_counter() - t0
    r = results["mtp"]
    emit({"bench": "speculative_mtp", "model": label, "new_tokens": NEW,
          "tokens_per_s_plain": NEW / times[None], "tokens_per_s_mtp": NEW / times["mtp"],
          "speedup": times[None] / times["mtp"], "acceptance_rate": r.acceptance_rate,
          "tokens_per_step": r.tokens_per_step, "identical_output": r.tokens == results[None].tokens})


def bench_cache_bytes() -> None:
    from dsv3_jax.info import model_info
    info = model_info(dsv3.load_config("deepseek_v3_671b"))
    emit({"bench": "kv_cache_bytes", "config": "deepseek_v3_671b",
          "latent_bytes_per_token": info["kv_cache_bytes_per_token"],
          "per_head_bytes_per_token": info["kv_cache_bytes_per_token_per_head_cache"],
          "ratio": info["kv_cache_bytes_per_token_per_head_cache"] / info["kv_cache_bytes_per_token"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="checkpoint for the speculative-decoding figures")
    args = ap.parse_args()
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    bench_cache_bytes()
    cfg = dsv3.load_config("tiny", ["num_mtp_layers=0"])
    log("decode: ours vs transformers generate (tiny config, fp32)")
    bench_vs_transformers(cfg)
    if args.checkpoint:
        _, model = dsv3.load_checkpoint(args.checkpoint)
        bench_speculative(model, args.checkpoint)
    else:
        from flax import nnx
        bench_speculative(dsv3.DeepSeekV3(dsv3.load_config("tiny"), rngs=nnx.Rngs(0), runtime=RUNTIME),
                          "tiny (random init: acceptance is near 0; pass --checkpoint for a trained model)")


if __name__ == "__main__":
    main()
