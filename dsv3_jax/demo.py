"""``make demo``: the 671B model's figures, then the tiny model run on a sentence.

Until the training issue lands the tiny model is randomly initialised: the demo shows the moving
parts (MLA, group-limited routing, MTP) rather than meaningful predictions.
"""
from __future__ import annotations

import time

import numpy as np
from flax import nnx

from .config import load_config
from .info import format_info, model_info
from .model import DeepSeekV3, make_forward

SENTENCE = "DeepSeek-V3 routes every token to 8 of 256 experts."


def main() -> None:
    print("== dsv3 info --config deepseek_v3_671b ==")
    print(format_info(model_info(load_config("deepseek_v3_671b"))))

    cfg = load_config("tiny")
    print(f"\n== tiny model ({cfg.num_layers} layers: {cfg.first_k_dense} dense + {cfg.num_moe_layers} MoE, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} in {cfg.n_group} groups, MTP depth "
          f"{cfg.num_mtp_layers}) ==")
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    forward, state = make_forward(model)
    tokens = np.frombuffer(SENTENCE.encode(), np.uint8).astype(np.int32)[None]  # bytes as token ids
    t0 = time.perf_counter()
    out = forward(state, tokens)
    out.logits.block_until_ready()
    print(f"input: {SENTENCE!r} ({tokens.shape[1]} byte tokens); forward incl. compile "
          f"{time.perf_counter() - t0:.1f}s")
    print(f"logits {tuple(out.logits.shape)}, MTP logits {tuple(out.mtp_logits.shape)}")
    counts = np.asarray(out.router.counts)
    for layer, c in enumerate(counts, start=cfg.first_k_dense):
        bar = " ".join(f"{int(n):2d}" for n in c)
        print(f"layer {layer} tokens per expert: {bar}  (max/mean {c.max() / c.mean():.2f})")
    nll = -np.take_along_axis(np.asarray(out.logits[0, :-1]) - _logsumexp(np.asarray(out.logits[0, :-1])),
                              tokens[0, 1:, None], -1).mean()
    print(f"next-byte NLL of the untrained model: {nll:.3f} nats (uniform over {cfg.vocab_size}: "
          f"{np.log(cfg.vocab_size):.3f})")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


if __name__ == "__main__":
    main()
