"""Config loading, casting, validation messages and Hugging Face interop."""
import json

import pytest

import dsv3_jax as dsv3
from dsv3_jax.config import ConfigError, list_configs


@pytest.mark.parametrize("name", ["deepseek_v3_671b", "deepseek_v2_lite_16b", "deepseek_v2_236b", "tiny"])
def test_shipped_configs_load(name):
    cfg = dsv3.load_config(name)
    assert cfg.name == name
    assert name in list_configs()


def test_tiny_has_every_feature():
    cfg = dsv3.load_config("tiny")
    assert cfg.first_k_dense >= 1 and cfg.num_moe_layers >= 2
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.num_mtp_layers == 1
    assert cfg.rope_scaling.enabled and cfg.q_lora_rank


def test_overrides_are_cast_to_field_types():
    cfg = dsv3.load_config("tiny", ["n_routed_experts=32", "rms_norm_eps=1e-5", "norm_topk_prob=false",
                                    "rope_scaling.factor=8", "model.q_lora_rank=null", "init_std=6e-3"])
    assert cfg.n_routed_experts == 32 and isinstance(cfg.n_routed_experts, int)
    assert cfg.rms_norm_eps == 1e-5 and isinstance(cfg.rms_norm_eps, float)
    assert cfg.norm_topk_prob is False and cfg.rope_scaling.factor == 8.0 and cfg.q_lora_rank is None
    assert cfg.init_std == 0.006


def test_yaml_string_numbers_are_cast(tmp_path):
    # YAML 1.1 reads "1e-6" (no dot) as a string; the loader must cast it.
    p = tmp_path / "m.yaml"
    p.write_text("model:\n  rms_norm_eps: 1e-6\n  rope_theta: 1e4\n")
    cfg = dsv3.load_config(p)
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0


@pytest.mark.parametrize("overrides, words", [
    (["n_grup=4"], ["unknown config key", "did you mean n_group"]),
    (["num_experts_per_tok=17"], ["num_experts_per_tok=17", "cannot exceed n_routed_experts=16"]),
    (["n_group=3"], ["n_group=3", "must divide n_routed_experts=16"]),
    (["topk_group=5"], ["topk_group=5", "cannot exceed n_group=4"]),
    (["qk_rope_head_dim=7"], ["qk_rope_head_dim=7", "even"]),
    (["scoring_func=sigmod"], ["scoring_func='sigmod'", "use 'sigmoid'"]),
    (["hidden_size=abc"], ["hidden_size='abc'", "expected int"]),
    (["first_k_dense=9"], ["first_k_dense=9", "between 0 and num_layers"]),
    (["hidden_size"], ["not key=value"]),
])
def test_bad_config_messages(overrides, words):
    with pytest.raises(ConfigError) as e:
        dsv3.load_config("tiny", overrides)
    for w in words:
        assert w in str(e.value)
    assert "fix" in str(e.value) or "did you mean" in str(e.value)


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        dsv3.load_config("tinyy")


@pytest.mark.parametrize("name,model_type", [("deepseek_v3_671b", "deepseek_v3"), ("deepseek_v2_236b", "deepseek_v2"),
                                             ("deepseek_v2_lite_16b", "deepseek_v2"), ("tiny", "deepseek_v3")])
def test_hf_roundtrip_both_rope_spellings(name, model_type):
    cfg = dsv3.load_config(name)
    hf = cfg.to_hf()
    assert hf["model_type"] == model_type  # softmax gating is the V2 family: transformers' V3 class would use sigmoid
    if cfg.rope_scaling.enabled:
        assert hf["rope_scaling"]["type"] == "yarn" and hf["rope_parameters"]["rope_type"] == "yarn"
    release = {k: v for k, v in hf.items() if k != "rope_parameters"}
    tf5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    for spelling in (release, tf5):
        back = dsv3.ModelConfig.from_hf(json.loads(json.dumps(spelling)), name=cfg.name)
        assert back == cfg.replace(init_std=back.init_std)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_from_hf_fields_left_out_mean_what_transformers_builds(model_type):
    """A config.json that leaves routing fields out describes the model transformers' config class for
    its model type builds (e.g. V3: routed_scaling_factor 2.5, 8 groups, top-4 groups, 3 dense layers)."""
    import transformers
    required = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    ours = dsv3.ModelConfig.from_hf({**required, "model_type": model_type})
    ref = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config}[model_type](**required)
    assert ours.first_k_dense == ref.first_k_dense_replace and ours.n_routed_experts == ref.n_routed_experts
    assert ours.routed_scaling_factor == ref.routed_scaling_factor and ours.q_lora_rank == ref.q_lora_rank
    assert (ours.n_group, ours.topk_group) == (ref.n_group or 1, ref.topk_group or 1)
    assert ours.num_experts_per_tok == (ref.num_experts_per_tok or 1) and ours.n_shared_experts == ref.n_shared_experts
    assert ours.moe_intermediate_size == ref.moe_intermediate_size and ours.intermediate_size == ref.intermediate_size
    assert ours.norm_topk_prob == ref.norm_topk_prob and ours.max_position_embeddings == ref.max_position_embeddings
    # transformers' V3 class always gates with sigmoid + the bias (noaux_tc), its V2 class with softmax
    assert (ours.scoring_func, ours.topk_method) == (("sigmoid", "noaux_tc") if model_type == "deepseek_v3"
                                                     else ("softmax", ref.topk_method))


def test_from_hf_missing_fields():
    with pytest.raises(ConfigError, match="missing required field"):
        dsv3.ModelConfig.from_hf({"vocab_size": 10})


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True),
                                         ("tie_word_embeddings", True), ("rope_interleave", False),
                                         ("moe_layer_freq", 2)])
def test_from_hf_refuses_flags_that_make_another_model(field, value):
    """A flag the architecture fixes, set otherwise, is refused by name (converting would silently drop a
    bias, a tie or a layout); the value the release uses, or the field absent, is accepted."""
    hf = dsv3.load_config("tiny").to_hf()
    assert dsv3.ModelConfig.from_hf({k: v for k, v in hf.items() if k != field}) is not None
    with pytest.raises(ConfigError, match=rf"{field}={value!r}.*different model"):
        dsv3.ModelConfig.from_hf({**hf, field: value})


def test_from_hf_refuses_v32_sparse_attention():
    hf = dsv3.load_config("tiny").to_hf()
    for extra in ({"index_topk": 2048, "index_n_heads": 64}, {"model_type": "deepseek_v32"}):
        with pytest.raises(ConfigError, match="DeepSeek-V3.2 config.*indexer"):
            dsv3.ModelConfig.from_hf({**hf, **extra})


def test_softmax_scale_671b_matches_spec():
    # docs/architecture.md §2: softmax_scale = 192^-0.5 · mscale², mscale = 0.1·ln(40) + 1 → 0.135234…
    cfg = dsv3.load_config("deepseek_v3_671b")
    assert abs(cfg.softmax_scale - 0.135234) < 5e-7
    assert dsv3.load_config("tiny", ["rope_scaling.type=none"]).softmax_scale == 24 ** -0.5
