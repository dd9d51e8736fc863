"""The ragged exchange in rounds (sharding.expert_parallel): buffers sized for ~round_factor × the
balanced load, extra rounds when a source→destination pair has more — dropless whatever the routing.

A round capacity of a few slots forces many rounds (and routing skewed towards a few experts makes
pairs uneven); the routed output and its gradients still equal the single-device expert sum."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import dsv3_jax as dsv3
import sharding
from dsv3_jax.model.moe import local_expert_sum
from dsv3_jax.model.routing import route
from sharding.expert_parallel import ExpertParallel, _rounds_layout, moe_forward

TOL = 1e-5


def _setup(round_factor):
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0"])
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(k[0], (8, 16, D), jnp.float32)
    kernel = 0.3 * jax.random.normal(k[1], (D, E), jnp.float32)
    bias = jnp.zeros((E,), jnp.float32).at[:4].set(2.0)   # most tokens pick experts 0-3: shards 0 and 1
    ws = [0.1 * jax.random.normal(kk, s, jnp.float32)
          for kk, s in zip(k[2:], ((E, D, I), (E, D, I), (E, I, D)))]
    mesh = sharding.make_mesh("expert=8")
    ep = dataclasses.replace(ExpertParallel.create(mesh, "ragged_a2a", E), round_factor=round_factor)
    return cfg, x, kernel, bias, ws, mesh, ep


def _route_fn(cfg):
    return lambda xt, kernel, bias: tuple(route(xt @ kernel, bias, cfg))


def test_rounds_equal_single_device():
    cfg, x, kernel, bias, ws, mesh, ep = _setup(round_factor=0.25)
    T, K = x.shape[0] * x.shape[1] // 8, cfg.num_experts_per_tok
    c, c_tok, s_cap, r_max = _rounds_layout(ep, T, K, cfg.n_routed_experts // 8)
    assert r_max > 4 and s_cap < T * K   # buffers smaller than one shard's slots
    expert_fn = functools.partial(local_expert_sum, impl="blocked", block=8, quant="none")
    route_fn = _route_fn(cfg)

    # how many rounds this routing needs: the busiest (source, destination) pair
    gates, experts, _ = route_fn(x.reshape(-1, x.shape[-1]), kernel, bias)
    dest = np.asarray(experts).reshape(8, T, K) // (cfg.n_routed_experts // 8)
    slots = np.stack([[(dest[s] == d).sum() for d in range(8)] for s in range(8)])
    assert -(-slots.max() // c) >= 3, "the test should need several rounds"

    def ep_out(x, ws):
        out, _, dropped = moe_forward(ep, x, kernel, bias, *ws, route_fn=route_fn, expert_fn=expert_fn)
        return out, dropped

    def ref_out(x, ws):
        flat = x.reshape(-1, x.shape[-1])
        g, e, _ = route_fn(flat, kernel, bias)
        return expert_fn(flat, e, g, *ws, all_local=True).reshape(x.shape)

    xs = jax.device_put(x, NamedSharding(mesh, P("expert")))
    out, dropped = jax.jit(ep_out)(xs, ws)
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out(x, ws)), atol=TOL)

    cot = jax.random.normal(jax.random.PRNGKey(9), x.shape, jnp.float32)
    g_ep = jax.jit(jax.grad(lambda x, ws: (ep_out(x, ws)[0] * cot).sum(), argnums=(0, 1)))(xs, ws)
    g_ref = jax.grad(lambda x, ws: (ref_out(x, ws) * cot).sum(), argnums=(0, 1))(x, ws)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)


def test_capacity_drops_what_does_not_fit_one_round():
    """``a2a_capacity`` is one round of the same exchange: what the rounds would carry later is
    dropped and counted."""
    cfg, x, kernel, bias, ws, mesh, ep = _setup(round_factor=0.25)
    ep = dataclasses.replace(ep, strategy="a2a_capacity", capacity_factor=0.25)
    expert_fn = functools.partial(local_expert_sum, impl="blocked", block=8, quant="none")
    xs = jax.device_put(x, NamedSharding(mesh, P("expert")))
    _, _, dropped = jax.jit(lambda x: moe_forward(ep, x, kernel, bias, *ws, route_fn=_route_fn(cfg),
                                                  expert_fn=expert_fn))(xs)
    assert 0 < int(dropped) < x.shape[0] * x.shape[1] * cfg.num_experts_per_tok
