"""Configs drawn at random (fixed seeds, so the suite is deterministic) beyond the ones the other
tests name: the model equals transformers' ``DeepseekV3ForCausalLM`` on each (fp32), and cached
generation equals the full forward's greedy choice, with speculative decoding equal to plain.

A sweep of 75 such configs found two differences from the reference that the named configs hid
(top-1 gate normalisation; the MLA latent norms' eps: docs/architecture.md §2, §4)."""
from __future__ import annotations

import random

import numpy as np
import pytest

import dsv3_jax as dsv3
from tests.hf_reference import hf_logits, hf_model, hf_state, our_model


def random_config(seed: int) -> tuple[dict, dict]:
    """``(model fields, runtime fields)``: routing (experts, top-k, groups, shared experts, norm),
    attention (q-LoRA or not, head dims, YaRN or plain RoPE with its mscales), ``rms_norm_eps``, and
    the MoE / attention implementations."""
    r = random.Random(seed)
    E = r.choice([4, 8, 12, 16])
    ng = r.choice([d for d in (1, 2, 4) if E % d == 0 and E // d >= 2])
    k = r.randint(1, min(6, E))
    tg = r.randint(1, ng)
    while tg * (E // ng) < k:
        tg += 1
    rs = r.choice([{"type": "none"},
                   {"type": "yarn", "factor": r.choice([2.0, 4.0, 40.0]), "original_max_position_embeddings": 16,
                    "beta_fast": 32, "beta_slow": 1, "mscale": r.choice([1.0, 0.707]),
                    "mscale_all_dim": r.choice([0.0, 1.0, 0.707])}])
    layers = r.randint(1, 3)
    model = dict(vocab_size=r.choice([97, 256]), hidden_size=r.choice([32, 48]), intermediate_size=r.choice([48, 72]),
                 num_layers=layers, first_k_dense=min(r.randint(0, 1), layers), num_heads=r.choice([1, 2, 4]),
                 q_lora_rank=r.choice([None, 16]), kv_lora_rank=r.choice([8, 24]), qk_nope_head_dim=r.choice([8, 12]),
                 qk_rope_head_dim=r.choice([4, 8]), v_head_dim=r.choice([8, 12]), n_routed_experts=E,
                 num_experts_per_tok=k, n_shared_experts=r.choice([1, 2]), moe_intermediate_size=r.choice([8, 20]),
                 n_group=ng, topk_group=tg, routed_scaling_factor=r.choice([1.0, 2.5]),
                 norm_topk_prob=r.choice([True, False]), rms_norm_eps=r.choice([1e-6, 1e-5]),
                 rope_theta=r.choice([10000.0, 50000.0]), max_position_embeddings=256, num_mtp_layers=0,
                 rope_scaling=rs)
    runtime = dict(moe_impl=r.choice(["auto", "looped", "blocked", "ragged"]),
                   attention_impl=r.choice(["auto", "reference", "blockwise"]))
    return model, runtime


@pytest.mark.parametrize("seed", range(8))
def test_random_config_matches_transformers(seed):
    model_kw, runtime_kw = random_config(seed)
    cfg = dsv3.load_config(model_kw)
    ref = hf_model(cfg, seed=seed)
    ours = our_model(cfg, hf_state(ref), runtime=dsv3.load_runtime(runtime_kw))
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 40))  # past YaRN's original 16
    want = hf_logits(ref, tokens)
    err = np.abs(np.asarray(ours(tokens, mtp=False).logits) - want).max() / max(1.0, np.abs(want).max())
    assert err <= 1e-5, (err, model_kw, runtime_kw)


@pytest.mark.parametrize("seed", range(2))
def test_random_config_generation_equals_forward(seed):
    """Batched prompts of different lengths: each generated token is the full forward's argmax at the
    position before it (fp32 cache), and MTP speculative greedy decoding gives the same tokens."""
    from flax import nnx

    from dsv3_jax.inference import Generator
    model_kw, runtime_kw = random_config(100 + seed)
    cfg = dsv3.load_config({**model_kw, "num_mtp_layers": 1, "init_std": 0.2})
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(seed), runtime=dsv3.load_runtime(
        {"attention_impl": runtime_kw["attention_impl"]}))
    r = np.random.RandomState(seed)
    prompts = [r.randint(0, cfg.vocab_size, n).tolist() for n in (3, 9, 1)]
    gen = Generator(model, cache_dtype="float32")
    out = gen(prompts, max_new_tokens=9).tokens
    for p, o in zip(prompts, out):
        logits = np.asarray(model(np.array([p + o]), mtp=False).logits)[0]
        assert o == logits[len(p) - 1:len(p) + len(o) - 1].argmax(-1).tolist(), (model_kw, p)
    assert gen(prompts, max_new_tokens=9, speculative="mtp").tokens == out
