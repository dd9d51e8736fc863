"""MTP (docs/architecture.md §5) against a direct computation from the same weights, built from transformers' own
modules: ``h' = W_eh [enorm(Emb(t_{i+1})) ; hnorm(h_i)]`` (embedding first), transformers' MoE decoder
layer holding the MTP block weights, the MTP's own final norm, the shared head."""
import numpy as np
import torch

import dsv3_jax as dsv3
from dsv3_jax.checkpoint import mapping
from tests.hf_reference import hf_config, hf_model, hf_state, our_model
from tests.model.test_parity import BASE, TOL


def test_mtp_logits_match_direct_reference():
    from transformers import DeepseekV3ForCausalLM
    cfg = dsv3.load_config({**BASE, "num_mtp_layers": 1})
    main = hf_model(cfg, seed=4)
    # The MTP block: a one-MoE-layer HF model whose layer 0 holds the MTP block weights.
    block_cfg = cfg.replace(num_layers=1, first_k_dense=0, num_mtp_layers=0)
    mtp_hf = hf_model(block_cfg, seed=5)
    rng = np.random.RandomState(6)
    D, L = cfg.hidden_size, cfg.num_layers
    enorm, hnorm, fnorm = (1 + 0.2 * rng.randn(D)).astype(np.float32), (1 + 0.2 * rng.randn(D)).astype(np.float32), \
        (1 + 0.2 * rng.randn(D)).astype(np.float32)
    eh = (0.08 * rng.randn(D, 2 * D)).astype(np.float32)

    state = hf_state(main)
    for name, w in hf_state(mtp_hf).items():
        if name.startswith("model.layers.0."):
            state[name.replace("model.layers.0.", f"model.layers.{L}.")] = w
    state[f"model.layers.{L}.enorm.weight"] = enorm
    state[f"model.layers.{L}.hnorm.weight"] = hnorm
    state[f"model.layers.{L}.eh_proj.weight"] = eh
    state[f"model.layers.{L}.shared_head.norm.weight"] = fnorm
    state[f"model.layers.{L}.shared_head.head.weight"] = state["lm_head.weight"]
    state[f"model.layers.{L}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
    ours = our_model(cfg, state, include_mtp=True)

    tokens = rng.randint(0, cfg.vocab_size, (2, 40))
    out = ours(tokens)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    with torch.no_grad():
        t = torch.tensor(tokens)
        h = main.model(t).last_hidden_state                      # after the final norm (docs/architecture.md §5)
        nxt = torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], 1)
        emb = main.model.embed_tokens(nxt)
        emb[:, -1] = 0                                           # no t_{i+1} beyond the row
        x = torch.cat([rms(emb, torch.tensor(enorm)), rms(h, torch.tensor(hnorm))], -1) @ torch.tensor(eh).T
        hb_pre = mtp_hf.model.layers[0](x, position_embeddings=mtp_hf.model.rotary_emb(x, torch.arange(40)[None]),
                                        attention_mask=_causal(40))
        hb_pre = hb_pre[0] if isinstance(hb_pre, tuple) else hb_pre
        ref = rms(hb_pre, torch.tensor(fnorm)) @ main.lm_head.weight.T
    got = np.asarray(out.mtp_logits[0])
    err = np.abs(got - ref.numpy()).max()
    assert err <= TOL, err
    # And the main logits are untouched by MTP.
    assert np.abs(np.asarray(out.logits) - main(t).logits.detach().numpy()).max() <= TOL


def _causal(n):
    m = torch.full((n, n), float("-inf")).triu(1)
    return m[None, None]


def test_mtp_weights_map_both_ways():
    cfg = dsv3.load_config({**BASE, "num_mtp_layers": 1})
    from flax import nnx
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(3))
    params = mapping.model_params(model)
    hf = dict(mapping.params_to_hf(params, cfg))
    L = cfg.num_layers
    assert f"model.layers.{L}.eh_proj.weight" in hf and f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in hf
    np.testing.assert_array_equal(hf[f"model.layers.{L}.shared_head.head.weight"], hf["lm_head.weight"])
    back = mapping.hf_to_params(hf, cfg, names=set(hf))
    for path, value in back.items():
        np.testing.assert_array_equal(value, params[path])
