"""Losses, bias update, schedule and decay mask against direct formulas (docs/architecture.md §4, §5, §8)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.model.moe import route, router_stats
from dsv3_jax.train import load_run_config
from dsv3_jax.train.losses import balance_loss_terms, mtp_targets
from dsv3_jax.train.optim import COSINE_FLOOR, FINAL, decay_mask, lr_schedule
from dsv3_jax.train.step import bias_update


def test_balance_loss_matches_formula():
    """L_bal/α = Σ_i f_i P_i per sequence, f_i = N_r/(K_r T) Σ_t 1[i∈TopK_t], P_i = (1/T) Σ_t s_{i,t}/Σ_j s_{j,t},
    averaged over sequences; padding tokens excluded (T counts valid tokens). Tolerance: fp32 sums."""
    cfg = dsv3.load_config("tiny")
    B, S, E, K = 3, 10, cfg.n_routed_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(B * S, E)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(E,)) * 0.1, jnp.float32)
    valid = np.ones((B, S), bool)
    valid[1, 6:] = False
    r = route(logits, bias, cfg)
    stats = router_stats(r, B, S, E, jnp.asarray(valid))
    stacked = jax.tree.map(lambda x: x[None], stats)  # one layer
    total, n = balance_loss_terms(stacked, E, K)

    experts = np.asarray(r.experts).reshape(B, S, K)
    s = 1 / (1 + np.exp(-np.asarray(logits, np.float64))).reshape(B, S, E)
    want = []
    for b in range(B):
        t_idx = np.flatnonzero(valid[b])
        T = len(t_idx)
        f = np.zeros(E)
        for t in t_idx:
            f[experts[b, t]] += 1
        f *= E / (K * T)
        P = (s[b, t_idx] / s[b, t_idx].sum(-1, keepdims=True)).sum(0) / T
        want.append((f * P).sum())
    assert float(n) == B
    np.testing.assert_allclose(float(total) / float(n), np.mean(want), rtol=1e-5)
    # a perfectly even router gives exactly 1 (f_i = 1, P_i = 1/E); ours is above it
    assert np.mean(want) > 1.0


def test_balance_loss_gradient_flows_through_P_only():
    cfg = dsv3.load_config("tiny")
    B, S, E, K = 2, 6, cfg.n_routed_experts, cfg.num_experts_per_tok
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(B * S, E)), jnp.float32)

    def f(lg):
        st = router_stats(route(lg, None, cfg), B, S, E, None)
        return balance_loss_terms(jax.tree.map(lambda x: x[None], st), E, K)[0]
    g = jax.grad(f)(logits)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0


def test_mtp_targets_and_mask():
    """Depth 1 at position i predicts targets[i+1]; valid iff loss_mask[i] and loss_mask[i+1]; last has none."""
    targets = jnp.asarray([[10, 11, 12, 13, 14]])
    mask = jnp.asarray([[1, 1, 0, 1, 1]])
    tgt, m = mtp_targets(targets, mask, 1)
    np.testing.assert_array_equal(np.asarray(tgt), [[11, 12, 13, 14, 0]])
    np.testing.assert_array_equal(np.asarray(m), [[1, 0, 0, 1, 0]])


def test_bias_update_direction_and_magnitude():
    """b_i -= γ where the global load is above the mean, += γ below, unchanged at the mean (docs/architecture.md §4);
    MTP blocks use their own counts."""
    cfg = dsv3.load_config("tiny")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    _, bias, _ = nnx.split(model, RouterBias, ...)
    Lm, E = cfg.num_moe_layers, cfg.n_routed_experts
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(Lm, E)).astype(np.float32)
    counts[0, :] = 7.0                      # layer 0 perfectly balanced: no change
    mtp_counts = rng.integers(0, 50, size=(1, E)).astype(np.float32)
    gamma = 1e-3
    new = bias_update(bias, jnp.asarray(counts), jnp.asarray(mtp_counts), gamma)
    got = np.asarray(new["moe_layers"]["mlp"]["router"]["bias"][...])
    want = -gamma * np.sign(counts - counts.mean(-1, keepdims=True))
    np.testing.assert_allclose(got, want, atol=0)
    assert (got[0] == 0).all()
    over = counts[1] > counts[1].mean()
    assert (got[1][over] == -gamma).all() and (got[1][~over] == gamma).all()
    got_mtp = np.asarray(new["mtp"][0]["block"]["mlp"]["router"]["bias"][...])
    np.testing.assert_allclose(got_mtp, -gamma * np.sign(mtp_counts - mtp_counts.mean(-1, keepdims=True)))


def test_schedule_values():
    """Warm-up → constant → cosine to 0.1·lr → 0.1·lr → lr·7.3/220, at the docs/architecture.md §8 fractions of the run."""
    run = load_run_config("tiny", ["steps=1000", "train.lr=1e-3"])
    s = lr_schedule(run.train)
    lr = lambda i: float(s(i))  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 20)        # warm-up: 2% of 1000 steps = 20
    assert lr(19) == pytest.approx(1e-3)
    assert lr(100) == pytest.approx(1e-3) and lr(600) == pytest.approx(1e-3)
    c_end, cos_end = round(10 / 14.8 * 1000), round(14.3 / 14.8 * 1000)
    mid = (c_end + cos_end) / 2
    assert lr(mid) == pytest.approx(1e-3 * (COSINE_FLOOR + (1 - COSINE_FLOOR) / 2), rel=1e-4)
    assert lr(cos_end) == pytest.approx(1e-4)
    assert lr(975) == pytest.approx(1e-4)           # 333B-token tail at 2.2e-5 ↔ 0.1·lr
    assert lr(999) == pytest.approx(1e-3 * FINAL)   # last 167B tokens at 7.3e-6
    vals = [lr(i) for i in range(c_end, cos_end + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_decay_mask():
    cfg = dsv3.load_config("tiny")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    mask = decay_mask(params)
    flat = {"/".join(map(str, k)): bool(v.get_value()) for k, v in nnx.to_flat_state(mask)}
    assert flat["embed"] is False and flat["final_norm/scale"] is False
    assert flat["lm_head"] is True and flat["moe_layers/mlp/experts/gate"] is True
    assert flat["moe_layers/mlp/router/kernel"] is True and flat["moe_layers/attn_norm/scale"] is False
    assert not any("bias" in k for k in flat)  # the router bias never reaches the optimizer


def test_run_config_errors():
    with pytest.raises(dsv3.ConfigError, match="did you mean 'steps'"):
        load_run_config("demo", ["stepz=3"])
    with pytest.raises(dsv3.ConfigError, match="train.balance"):
        load_run_config("demo", ["balance=auxfree"])
    with pytest.raises(dsv3.ConfigError, match="grad_accum"):
        load_run_config("demo", ["grad_accum=3", "data.batch_size=8"])
    run = load_run_config("demo", ["steps=7", "data.path=/x", "model.n_routed_experts=32", "train.lr=1e-3"])
    assert (run.train.steps, run.data.path, run.model.n_routed_experts, run.train.lr) == (7, "/x", 32, 1e-3)


def test_grad_accumulation_equals_full_batch():
    """2 micro-batches give the full batch's loss terms, gradient norm, update and bias update: every
    term is a sum divided by the global batch's denominators. Tolerance: fp32 sums in another order."""
    from dsv3_jax.train.optim import make_optimizer
    from dsv3_jax.train.step import make_train_step
    cfg = dsv3.load_config("tiny", ["num_layers=1", "first_k_dense=0"])
    rng = np.random.default_rng(0)
    B, S = 4, 16
    tokens = rng.integers(3, cfg.vocab_size, (B, S + 1)).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    seg[1, 10:] = 2
    seg[3, 12:] = 0                                   # padding
    mask = ((seg > 0) & (np.roll(seg, -1, 1) == seg)).astype(np.int32)
    mask[:, -1] = 1
    mask[3, 11:] = 0
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
             "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(), "loss_mask": mask}
    out = {}
    for A in (1, 2):
        run = load_run_config("tiny", ["num_layers=1", "first_k_dense=0", "remat=none", f"grad_accum={A}",
                                       "data.batch_size=4", "train.lr=1e-2"])
        model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=run.runtime)
        graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
        tx = make_optimizer(run.train, params)
        state = {"params": params, "bias": bias, "rest": rest, "opt": tx.init(params), "applied": jnp.zeros((), jnp.int32)}
        step = jax.jit(make_train_step(graphdef, cfg, run.train, tx, lr_schedule(run.train)))
        new, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.float32(0))
        out[A] = (new, jax.device_get(m))
    (s1, m1), (s2, m2) = out[1], out[2]
    for k in ("loss", "ce", "mtp", "balance", "grad_norm"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    np.testing.assert_array_equal(m2["counts"], m1["counts"])
    # Adam's first update is lr·g/(|g|+ε): where |g| is near fp32 noise the summation order moves it by a
    # fraction of lr (1e-2), so parameters are compared at 1e-4 absolute; the gradient norm above is 1e-5.
    for a, b in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    for a, b in zip(jax.tree.leaves(s2["bias"]), jax.tree.leaves(s1["bias"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_low_precision_adam_moments():
    """`moment_dtype=float32` through our Adam equals optax's; bfloat16 stores the moments in bf16 and
    stays within bf16 rounding of it (relative 1e-2 on the update)."""
    import optax
    from dsv3_jax.train.optim import scale_by_adam_lowp
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)} for _ in range(3)]
    ref, ours, low = optax.scale_by_adam(0.9, 0.95, 1e-8), scale_by_adam_lowp(0.9, 0.95, 1e-8, "float32"), \
        scale_by_adam_lowp(0.9, 0.95, 1e-8, "bfloat16")
    sr, so, sl = ref.init(params), ours.init(params), low.init(params)
    for g in grads:
        ur, sr = ref.update(g, sr)
        uo, so = ours.update(g, so)
        ul, sl = low.update(g, sl)
        np.testing.assert_allclose(np.asarray(uo["w"]), np.asarray(ur["w"]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ul["w"]), np.asarray(ur["w"]), rtol=2e-2, atol=1e-3)
    assert sl.mu["w"].dtype == jnp.bfloat16 and sl.nu["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("balance", ["aux_free", "none"])
def test_total_loss_is_ce_plus_weighted_terms(balance):
    """total = CE + λ·MTP + α·L_bal (the α term only when balancing uses a loss)."""
    from dsv3_jax.train.step import denominators, make_loss_fn
    run = load_run_config("tiny", ["num_layers=1", "first_k_dense=0", "remat=none", f"balance={balance}",
                                   "balance_alpha=0.5", "mtp_weight=0.3"])
    cfg = run.model
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=run.runtime)
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    rng = np.random.default_rng(0)
    B, S = 2, 12
    tok = rng.integers(3, cfg.vocab_size, (B, S + 1)).astype(np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((B, S), np.int32),
             "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
             "loss_mask": np.ones((B, S), np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    fn = jax.jit(make_loss_fn(graphdef, cfg, run.train))
    total, aux = fn(params, bias, rest, batch, denominators(batch, cfg.num_mtp_layers), jnp.float32(0))
    want = aux["ce"] + 0.3 * aux["mtp"] + (0.5 * aux["balance"] if balance == "aux_free" else 0.0)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
    assert float(aux["balance"]) >= 2.0 - 1e-5   # Σ f·P ≥ 1 per router (MoE layer + MTP block)
