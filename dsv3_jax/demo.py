"""``make demo``: pre-train a tiny DeepSeek-V3 on this Python's standard library, then use it.

1. ``dsv3 train --config configs/demo.yaml`` (fresh ``runs/demo``): MLA, group-limited MoE with the
   aux-loss-free bias, MTP, AdamW with the report's schedule scaled to the run, Orbax checkpoints.
2. Restore the final checkpoint with ``dsv3.load_checkpoint`` (the format ``dsv3 score`` reads).
3. Validation loss vs the unigram-entropy baseline of the same validation tokens (the best any
   model that ignores context can do), per-layer expert load (max/mean) and router-bias spread.
4. Greedy continuation of a Python prompt (a plain loop over the full forward; the latent-KV-cache
   generator is the inference issue's).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "def fibonacci(n):\n    "


def unigram_entropy(batches) -> float:
    """Entropy (nats) of the unigram distribution of the target tokens of ``batches`` (loss-masked)."""
    toks = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    p = np.bincount(toks).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def continuation(model, tokenizer, prompt: str, new_tokens: int = 48):
    """Greedy continuation with the latent KV cache and MTP speculative decoding (dsv3 generate)."""
    from .inference import Generator
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    res = Generator(model)([ids], max_new_tokens=new_tokens, stop_tokens=[tokenizer.eos_id], speculative="mtp")
    out = [t for t in res.tokens[0] if t != tokenizer.eos_id]
    return tokenizer.decode(out), res


def main(argv=None) -> int:
    import jax
    from .checkpoint.orbax_io import load_checkpoint
    from .data import load_tokenizer, make_dataset
    from .train import load_run_config, train

    overrides = list(sys.argv[1:] if argv is None else argv)
    run = load_run_config("demo", overrides)
    out = Path(run.train.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo always starts fresh (`dsv3 train` resumes instead)
    m = run.model
    print(f"== dsv3 train --config configs/demo.yaml: {m.num_layers} layers ({m.first_k_dense} dense + "
          f"{m.num_moe_layers} MoE, {m.n_routed_experts} experts top-{m.num_experts_per_tok} in {m.n_group} groups, "
          f"MTP depth {m.num_mtp_layers}), {run.train.steps} steps of {run.data.batch_size}x{run.data.seq_len} "
          f"tokens of the stdlib, on {jax.device_count()} {jax.default_backend()} device(s) ==", flush=True)
    t0 = time.perf_counter()
    res = train(run, log=lambda s: print(s, flush=True))
    train_s = time.perf_counter() - t0

    ckpt = str(Path(res["checkpoint"]).resolve())
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax notes about the reader's layout probing
    cfg, model = load_checkpoint(ckpt, runtime=run.runtime)  # run as it trained (the run config's runtime:)
    tok = load_tokenizer(Path(ckpt) / "tokenizer.json")
    val = list(make_dataset(run.data, tok, split="validation", vocab_size=cfg.vocab_size))[:run.train.eval_batches]
    base = unigram_entropy(val)
    val_loss = res["eval_loss"]
    print(f"\n== results (training {train_s:.0f}s) ==")
    print(f"checkpoint              {ckpt}   (dsv3 score --checkpoint {ckpt} --text '...')")
    print(f"train loss (CE) first → last   {_first_ce(out):.3f} → {res['ce']:.3f} nats/token")
    print(f"validation loss         {val_loss:.3f} nats/token   (unigram-entropy baseline {base:.3f}; "
          f"{'below' if val_loss < base else 'NOT below'} it by {base - val_loss:.3f})")
    print(f"MTP loss (depth 1)      {res['mtp']:.3f}    sequence balance term Σf·P {res['balance']:.3f} per layer sum")
    imb = res.get("eval_imbalance") or res.get("imbalance") or []
    print("expert load max/mean    " + "  ".join(f"layer {i + cfg.first_k_dense}: {x:.2f}" for i, x in enumerate(imb))
          + f"   (1.00 = even; top-{cfg.num_experts_per_tok} of {cfg.n_routed_experts} → worst {cfg.n_routed_experts / cfg.num_experts_per_tok:.2f})")
    if res.get("bias_absmean"):
        print("router bias |b| mean    " + "  ".join(f"{x:.4f}" for x in res["bias_absmean"]))
    print(f"throughput              {res['tokens_per_s']:,.0f} tokens/s, estimated MFU {res['mfu']:.1%}")
    text, gen = continuation(model, tok, PROMPT)
    print(f"\n== greedy continuation of {PROMPT!r} (MTP speculative decoding: {gen.acceptance_rate:.0%} of "
          f"drafts accepted, {gen.tokens_per_step:.2f} tokens/step) ==\n{PROMPT}{text}")
    return 0


def _first_ce(out: Path) -> float:
    import json
    with open(out / "metrics.jsonl") as f:
        return json.loads(f.readline())["ce"]


if __name__ == "__main__":
    sys.exit(main())
