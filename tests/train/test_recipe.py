"""The recipe's schedules (docs/architecture.md §4, §5, §8; docs/design.md §Recipe schedules) against
hand-computed values, the batch-size ramp inside the step, and the host EMA (closed form, never
blocking the step)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.train import load_run_config
from dsv3_jax.train.ema import HostEMA
from dsv3_jax.train.optim import active_rows, bias_rate_schedule, lr_schedule, make_optimizer, mtp_weight_schedule
from dsv3_jax.train.step import make_train_step


def test_batch_ramp_gamma_and_lambda_schedules():
    """steps=1000: ramp ends at round(0.469/14.8·1000) = 32, γ stops at round(14.3/14.8·1000) = 966,
    λ switches at round(10/14.8·1000) = 676; rows = floor(B·(0.2 + 0.8·s/32))."""
    t = load_run_config("tiny", ["steps=1000"]).train
    assert (t.batch_ramp_start, t.mtp_weight, t.bias_freeze, t.moment_dtype) == \
        (0.2, 0.3, True, "bfloat16")                           # the report's defaults
    rows = active_rows(t, 16)
    assert [int(rows(s)) for s in (0, 1, 16, 31, 32, 500)] == [3, 3, 9, 15, 16, 16]
    assert int(active_rows(t, 8)(0)) == 1 and int(active_rows(t, 1)(0)) == 1  # never below one row
    off = load_run_config("tiny", ["steps=1000", "batch_ramp_start=1"]).train
    assert int(active_rows(off, 16)(0)) == 16
    g = bias_rate_schedule(t)
    assert [float(g(s)) for s in (0, 965, 966, 999)] == [pytest.approx(1e-3), pytest.approx(1e-3), 0.0, 0.0]
    g_on = bias_rate_schedule(load_run_config("tiny", ["steps=1000", "bias_freeze=false"]).train)
    assert float(g_on(999)) == pytest.approx(1e-3)
    lam = mtp_weight_schedule(t)
    assert [float(lam(s)) for s in (0, 675, 676, 999)] == [pytest.approx(0.3)] * 2 + [pytest.approx(0.1)] * 2
    off_mtp = load_run_config("tiny", ["steps=1000", "mtp_weight=0"]).train     # 0 stays 0 (λ_final = λ/3)
    assert float(mtp_weight_schedule(off_mtp)(999)) == 0.0
    assert float(mtp_weight_schedule(load_run_config("tiny", ["steps=1000", "mtp_weight_final=0.2"]).train)(999)) == \
        pytest.approx(0.2)
    const = lr_schedule(load_run_config("tiny", ["steps=100", "lr=7.3e-6", "lr_schedule=constant"]).train)
    assert [float(const(s)) for s in (0, 50, 99)] == [pytest.approx(7.3e-6)] * 3
    with pytest.raises(dsv3.ConfigError, match="batch_ramp_start"):
        load_run_config("tiny", ["batch_ramp_start=0"])
    with pytest.raises(dsv3.ConfigError, match="init_rope"):
        load_run_config("tiny", ["init_rope=true"])


def _step_setup(*over):
    run = load_run_config("tiny", ["num_layers=1", "first_k_dense=0", "remat=none", "clip_norm=0", *over])
    model = dsv3.DeepSeekV3(run.model, rngs=nnx.Rngs(0), runtime=run.runtime)
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    tx = make_optimizer(run.train, params)
    state = {"params": params, "bias": bias, "rest": rest, "opt": tx.init(params), "applied": jnp.int32(0)}
    step = jax.jit(make_train_step(graphdef, run.model, run.train, tx, lr_schedule(run.train)))
    return step, state


def _batch(B=8, S=12, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(3, 512, (B, S + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
            "segment_ids": jnp.ones((B, S), jnp.int32), "loss_mask": jnp.ones((B, S), jnp.int32),
            "positions": jnp.asarray(np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy())}


def test_ramp_trains_exactly_the_active_rows():
    """batch_ramp_start=0.25 of 8 rows, grad_accum=2 (micro-batch j = rows j, j+2, ...; rows ranked
    micro-batch by micro-batch): update 0 trains rows {0, 2} and skips micro-batch 1. Its loss terms,
    gradient norm and expert counts equal, to fp32 rounding (rtol 1e-6), those of the same compiled step
    past the ramp (update 100 of 1000: all rows, same λ and γ) on the batch whose other rows are padding."""
    b = _batch()
    step, state = _step_setup("steps=1000", "batch_ramp_start=0.25", "grad_accum=2")
    _, m_r = step(state, b, jnp.float32(0))
    assert int(m_r["rows"]) == 2 and int(m_r["tokens"]) == 2 * 12
    live = jnp.asarray(np.isin(np.arange(8), [0, 2]).astype(np.int32))[:, None]
    padded = {**b, "loss_mask": b["loss_mask"] * live, "segment_ids": b["segment_ids"] * live}
    _, m_f = step({**state, "applied": jnp.int32(100)}, padded, jnp.float32(0))
    assert int(m_f["rows"]) == 8 and int(m_f["tokens"]) == 2 * 12
    for k in ("loss", "ce", "mtp", "balance", "grad_norm", "mtp_weight", "bias_rate"):
        np.testing.assert_allclose(float(m_r[k]), float(m_f[k]), rtol=1e-6, err_msg=k)
    np.testing.assert_array_equal(np.asarray(m_r["counts"]), np.asarray(m_f["counts"]))
    _, m_all = step({**state, "applied": jnp.int32(100)}, b, jnp.float32(0))   # the other rows do count
    assert int(m_all["tokens"]) == 8 * 12 and abs(float(m_all["ce"]) - float(m_r["ce"])) > 1e-4


def _params(k: int) -> dict:
    return {"w": jnp.full((3, 2), float(k), jnp.float32) + jnp.arange(6.0).reshape(3, 2), "b": jnp.float32(k * k)}


def test_ema_equals_closed_form():
    """every=1, d=0.9, snapshots of p_0..p_4: ema = d⁴p_0 + Σ_{k=1..4} (1−d)d^{4−k} p_k (fp32, rtol 1e-6)."""
    ema = HostEMA(0.9, 1)
    for k in range(5):
        ema.submit(k, _params(k))
        ema.wait()   # each folded before the next (no snapshot dropped)
    step, v = ema.snapshot()
    d = 0.9
    want = {n: d ** 4 * np.asarray(_params(0)[n]) + sum((1 - d) * d ** (4 - k) * np.asarray(_params(k)[n])
                                                        for k in range(1, 5)) for n in ("w", "b")}
    assert step == 4 and ema.dropped == 0
    for n in ("w", "b"):
        np.testing.assert_allclose(v[(n,)], want[n], rtol=1e-6)
    ema.close()


def test_ema_never_blocks_the_step():
    """With the worker held on its lock, jitted steps and further submits complete; the snapshot that
    was still pending is replaced (dropped = 1) and the next fold's decay spans the gap:
    ema = d²·p_0 + (1 − d²)·p_2."""
    ema = HostEMA(0.5, 1)
    f = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0001 + 1, p))
    p = _params(0)
    ema.lock.acquire()
    try:
        ema.submit(0, p)
        deadline = time.monotonic() + 10
        while not ema._busy and time.monotonic() < deadline:   # the worker has taken step 0 and waits
            time.sleep(0.01)
        t0 = time.perf_counter()
        for k in (1, 2):
            p = f(p)
            jax.block_until_ready(p)                            # a step completes ...
            ema.submit(k, _params(k))                           # ... and submitting does not wait
        assert time.perf_counter() - t0 < 5.0
        assert ema.step is None and ema.dropped == 1            # nothing folded while the lock is held
    finally:
        ema.lock.release()
    step, v = ema.snapshot()
    assert step == 2
    np.testing.assert_allclose(v[("w",)], 0.25 * np.asarray(_params(0)["w"]) + 0.75 * np.asarray(_params(2)["w"]),
                               rtol=1e-6)
    ema.close()


def test_mtp_off_trains_and_leaves_the_mtp_router_bias():
    """λ = 0 on a model with an MTP module: the module is not run, the step trains, the main routers'
    bias moves and the MTP router's bias (which saw no token) stays."""
    step, state = _step_setup("steps=1000", "mtp_weight=0", "batch_ramp_start=1")
    new, m = step(state, _batch(), jnp.float32(0))
    assert float(m["mtp"]) == 0.0 and bool(m["finite"])
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(new["bias"])}
    old = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state["bias"])}
    assert any(k.startswith("mtp") for k in flat)
    for k in flat:
        assert np.array_equal(flat[k], old[k]) == k.startswith("mtp"), k
