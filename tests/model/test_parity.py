"""Exactness: our logits equal transformers' DeepseekV3ForCausalLM on the same weights (fp32).

Tolerance 1e-4 max-abs on logits of magnitude ~1–10: both sides compute in fp32; the differences
come only from summation order (observed ~5e-6).
"""
import numpy as np
import pytest

import dsv3_jax as dsv3
from tests.hf_reference import hf_logits, hf_model, hf_state, our_model

TOL = 1e-4

BASE = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_layers=3, first_k_dense=1,
            num_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
            moe_intermediate_size=20, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            max_position_embeddings=512, num_mtp_layers=0,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


@pytest.mark.parametrize("variant", [
    {},                                                   # q-LoRA, YaRN, group-limited sigmoid routing
    {"q_lora_rank": None},                                # no q-LoRA (V2-Lite style attention)
    {"runtime.moe_impl": "ragged", "n_shared_experts": 2},  # ragged_dot grouped GEMM, 2 shared experts
    {"runtime.attention_impl": "blockwise"},              # flash attention (online softmax) path
    {"rope_scaling": {"type": "none"}, "n_group": 1, "topk_group": 1},  # plain RoPE, no groups
    {"num_experts_per_tok": 1, "first_k_dense": 0},       # top-1: the normalised gate is the factor itself
    {"norm_topk_prob": False, "rms_norm_eps": 1e-3,       # the latent norms keep eps 1e-6 (as transformers)
     "rope_scaling": {**BASE["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.0}},
])
def test_logits_match_transformers(variant):
    runtime = dsv3.load_runtime({k: v for k, v in variant.items() if k.startswith("runtime.")})
    cfg = dsv3.load_config({**BASE, **{k: v for k, v in variant.items() if not k.startswith("runtime.")}})
    ref = hf_model(cfg, seed=1)
    ours = our_model(cfg, hf_state(ref), runtime=runtime)  # float32 parameters: float32 compute
    # Sequence (48) longer than YaRN's original length (32): the interpolated frequencies matter.
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 48))
    want = hf_logits(ref, tokens)
    got = np.asarray(ours(tokens, mtp=False).logits)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= TOL, f"max |ours - transformers| = {err}"


V2 = dict(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=2.0, num_experts_per_tok=3,
          n_shared_experts=2, rope_scaling={**BASE["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.707})


@pytest.mark.parametrize("variant", [
    dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None),      # DeepSeek-V2-Lite's flags
    dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),          # DeepSeek-V2's flags
], ids=["v2_lite", "v2"])
def test_v2_configs_match_transformers_deepseek_v2(variant):
    """The same code with V2's flags (softmax gates, no correction bias, greedy or group-limited greedy
    top-k, gates not renormalised) equals transformers' ``DeepseekV2ForCausalLM``."""
    cfg = dsv3.load_config({**BASE, **V2, **variant})
    ref = hf_model(cfg, seed=4)
    assert not any("e_score_correction_bias" in k for k in ref.state_dict())
    ours = our_model(cfg, hf_state(ref))
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (3, 48))
    err = np.abs(np.asarray(ours(tokens, mtp=False).logits) - hf_logits(ref, tokens)).max()
    assert err <= TOL, f"max |ours - transformers DeepseekV2| = {err}"


def test_packed_batch_equals_separate_documents():
    """Two documents packed in one row with segment ids and per-document positions give the same
    logits as each document run alone (attention never crosses the segment boundary)."""
    cfg = dsv3.load_config(BASE)
    ref = hf_model(cfg, seed=2)
    ours = our_model(cfg, hf_state(ref))
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, cfg.vocab_size, 20), rng.randint(0, cfg.vocab_size, 13)
    packed = np.concatenate([a, b, np.zeros(3, int)])[None]
    seg = np.array([[1] * 20 + [2] * 13 + [0] * 3])
    pos = np.array([list(range(20)) + list(range(13)) + [0] * 3])
    out = np.asarray(ours(packed, segment_ids=seg, positions=pos, mtp=False).logits)[0]
    alone_a = hf_logits(ref, a[None])[0]
    alone_b = hf_logits(ref, b[None])[0]
    assert np.abs(out[:20] - alone_a).max() <= TOL
    assert np.abs(out[20:33] - alone_b).max() <= TOL
