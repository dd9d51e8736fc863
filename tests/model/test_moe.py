"""DeepSeekMoE: routing rules (docs/architecture.md §4), dropless grouped GEMM vs a per-expert loop, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.model.execution import execution
from dsv3_jax.model.moe import MoE
from dsv3_jax.model.routing import route


def _route_reference(logits, bias, cfg):
    """Token by token, written from docs/architecture.md §4 prose."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    weights, experts = [], []
    for u in logits.astype(np.float64):
        s = 1 / (1 + np.exp(-u)) if cfg.scoring_func == "sigmoid" else np.exp(u - u.max()) / np.exp(u - u.max()).sum()
        c = s + (bias if cfg.topk_method == "noaux_tc" else 0)
        allowed = np.ones(E, bool)
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            size = E // cfg.n_group
            gs = []
            for g in range(cfg.n_group):
                grp = np.sort(c[g * size:(g + 1) * size])[::-1]
                gs.append(grp[:2].sum() if cfg.topk_method == "noaux_tc" else grp[0])
            keep = np.argsort(gs)[::-1][:cfg.topk_group]
            allowed = np.zeros(E, bool)
            for g in keep:
                allowed[g * size:(g + 1) * size] = True
        idx = [i for i in np.argsort(np.where(allowed, c, -np.inf))[::-1][:K]]
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        weights.append(w * cfg.routed_scaling_factor)
        experts.append(idx)
    return np.array(weights), np.array(experts)


@pytest.mark.parametrize("overrides", [
    [],                                                          # V3: sigmoid, biased group top-k
    ["scoring_func=softmax", "topk_method=group_limited_greedy", "norm_topk_prob=false",
     "routed_scaling_factor=16"],                                # V2
    ["scoring_func=softmax", "topk_method=greedy", "n_group=1", "topk_group=1", "norm_topk_prob=false",
     "routed_scaling_factor=1"],                                 # V2-Lite
])
def test_routing_matches_reference(overrides):
    cfg = dsv3.load_config("tiny", overrides)
    rng = np.random.RandomState(0)
    logits = rng.randn(64, cfg.n_routed_experts).astype(np.float32)
    bias = (rng.rand(cfg.n_routed_experts).astype(np.float32) - 0.5) * 0.5
    got = route(jnp.asarray(logits), jnp.asarray(bias) if cfg.topk_method == "noaux_tc" else None, cfg)
    w_ref, e_ref = _route_reference(logits, bias, cfg)
    order = np.argsort(np.asarray(got.experts), axis=1)
    ref_order = np.argsort(e_ref, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(got.experts), order, 1),
                                  np.take_along_axis(e_ref, ref_order, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights), order, 1),
                               np.take_along_axis(w_ref, ref_order, 1), rtol=1e-5, atol=1e-6)


def test_bias_changes_choice_not_weights():
    cfg = dsv3.load_config("tiny", ["n_group=1", "topk_group=1"])
    logits = jnp.zeros((1, cfg.n_routed_experts)).at[0, 0].set(3.0)
    bias = jnp.zeros(cfg.n_routed_experts).at[5].set(10.0)
    r = route(logits, bias, cfg)
    assert 5 in np.asarray(r.experts[0])  # chosen thanks to the bias
    s = jax.nn.sigmoid(logits[0])
    w = dict(zip(np.asarray(r.experts[0]).tolist(), np.asarray(r.weights[0]).tolist()))
    expected = s[5] / sum(s[i] for i in w) * cfg.routed_scaling_factor  # unbiased score, normalised
    assert abs(w[5] - float(expected)) < 1e-6


def _naive_moe(moe, x, routing):
    """Per-token, per-chosen-expert loop: y_t = shared(x_t) + Σ_k g_tk FFN_{e_tk}(x_t)."""
    g, u, d = (np.asarray(moe.experts.gate[...]), np.asarray(moe.experts.up[...]), np.asarray(moe.experts.down[...]))
    xs = np.asarray(x)
    out = np.zeros_like(xs)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    for t in range(xs.shape[0]):
        for w, e in zip(np.asarray(routing.weights[t]), np.asarray(routing.experts[t])):
            out[t] += w * (silu(xs[t] @ g[e]) * (xs[t] @ u[e])) @ d[e]
    return out + np.asarray(moe.shared(x))


@pytest.mark.parametrize("impl", ["blocked", "looped", "ragged"])
def test_grouped_gemm_equals_per_expert_loop(impl):
    cfg = dsv3.load_config("tiny")
    moe = MoE(cfg, execution(cfg, dsv3.RuntimeConfig(moe_impl=impl, moe_block_size=8)), nnx.Rngs(0))
    moe.router.bias[...] = jnp.linspace(-0.1, 0.1, cfg.n_routed_experts)
    x = jax.random.normal(jax.random.key(1), (2, 37, cfg.hidden_size))
    out, stats = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    ref = _naive_moe(moe, flat, moe.router(flat))
    np.testing.assert_allclose(np.asarray(out).reshape(-1, cfg.hidden_size), ref, rtol=1e-5, atol=1e-5)
    assert int(stats.counts.sum()) == 2 * 37 * cfg.num_experts_per_tok
    np.testing.assert_allclose(np.asarray(stats.seq_probs.sum(-1)), [37, 37], rtol=1e-5)


def test_model_output_carries_per_token_routing():
    """``out.router.experts/gates`` [L, B, S, K]: what each MoE layer chose for each token (for
    exploring routing without reaching into the model); consistent with the counts and the router."""
    cfg = dsv3.load_config("tiny")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 9)))
    out = model(tokens)
    L, K, E = cfg.num_moe_layers, cfg.num_experts_per_tok, cfg.n_routed_experts
    ex, g = np.asarray(out.router.experts), np.asarray(out.router.gates)
    assert ex.shape == g.shape == (L, 2, 9, K) and ex.dtype == np.int32
    for layer in range(L):
        np.testing.assert_array_equal(np.bincount(ex[layer].ravel(), minlength=E), np.asarray(out.router.counts[layer]))
    np.testing.assert_allclose(g.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)  # normalised top-k × scale
    assert out.mtp_router.experts.shape == (cfg.num_mtp_layers, 2, 9, K)


def test_router_stats_skip_padding():
    cfg = dsv3.load_config("tiny")
    moe = MoE(cfg, execution(cfg), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 10, cfg.hidden_size))
    valid = jnp.arange(10)[None, :] < jnp.array([[10], [4]])
    _, stats = moe(x, valid)
    np.testing.assert_array_equal(np.asarray(stats.seq_tokens), [10, 4])
    np.testing.assert_array_equal(np.asarray(stats.seq_counts.sum(-1)), [10 * 4, 4 * 4])


def test_gradients_reach_experts_not_bias():
    cfg = dsv3.load_config("tiny")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16)))

    def loss(m):
        out = m(tokens)
        return out.logits.mean() + out.mtp_logits.mean()

    grads = nnx.jit(nnx.grad(loss))(model)  # differentiates nnx.Param only
    flat = dict(nnx.to_flat_state(grads))
    assert not any("bias" in k for k in flat), "router bias must not be an optimizer parameter"
    for name in ("gate", "up", "down"):
        g = np.asarray(flat[("moe_layers", "mlp", "experts", name)].get_value())
        assert np.abs(g).max() > 0
    assert np.abs(np.asarray(flat[("moe_layers", "mlp", "router", "kernel")].get_value())).max() > 0
    # Even asked for explicitly, the bias gets no gradient: it only chooses experts.
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    gb = jax.jit(jax.grad(lambda b: nnx.merge(graphdef, params, b)(tokens).logits.mean()))(bias)
    assert all(np.abs(np.asarray(v)).max() == 0 for v in jax.tree.leaves(gb))


def test_fp8_expert_ffn_in_chunks_of_blocks_equals_one_call(monkeypatch):
    """The FP8 grouped GEMM runs over chunks of blocks in sequence (grouped_gemm.FP8_CHUNK_BLOCKS: the
    per-block weight gathers and weight gradients of a whole layout do not fit a chip at 671B); the
    output and gradients equal one call over all blocks."""
    from dsv3_jax.model import grouped_gemm
    E, D, I, N = 4, 64, 48, 70
    ks = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(ks[0], (N, D))
    ws = [0.1 * jax.random.normal(k, s) for k, s in zip(ks[1:4], ((E, D, I), (E, D, I), (E, I, D)))]
    sizes = jnp.array([20, 0, 41, 9], jnp.int32)
    g = jax.random.normal(ks[4], (N, D))

    def run(chunk):
        monkeypatch.setattr(grouped_gemm, "FP8_CHUNK_BLOCKS", chunk)
        f = lambda x, *ws: grouped_gemm.expert_ffn(x, sizes, *ws, impl="blocked", block=8, quant="fp8")  # noqa: E731
        y, vjp = jax.vjp(f, x, *ws)
        return y, vjp(g)

    (y1, g1), (y3, g3) = jax.jit(lambda: run(1000))(), jax.jit(lambda: run(3))()   # 13 blocks: 5 chunks of 3
    np.testing.assert_allclose(np.asarray(y3), np.asarray(y1), rtol=1e-6, atol=1e-6)
    for a, b in zip(g3, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
