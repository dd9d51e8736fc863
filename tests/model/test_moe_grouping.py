"""The MoE's grouping is chosen at trace time from the rows per expert (docs/design.md §MoE grouping):
per-row expert weights for decode steps, blocks sized to the batch for prefill and training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.model.execution import execution
from dsv3_jax.model.grouped_gemm import grouping
from dsv3_jax.model.moe import MoE

TOL = 1e-5  # fp32, "highest" matmul precision: the groupings differ only in summation order


def test_grouping_by_rows_per_expert():
    assert grouping("blocked", 8, 16) == ("per_row", 1)         # one-token step, batch 2, top-4
    assert grouping("blocked", 16, 16) == ("per_row", 1)        # at most one row per expert
    assert grouping("blocked", 64, 16) == ("blocked", 8)        # 4 rows per expert → the floor of 8
    assert grouping("blocked", 8192, 16) == ("blocked", 128)    # training batch: large blocks
    assert grouping("blocked", 8, 16, block=32) == ("blocked", 32)  # a fixed moe_block_size is kept
    assert grouping("ragged", 8, 16) == ("ragged", 8)           # ragged_dot needs no per-row path
    assert grouping("looped", 8, 16) == ("per_row", 1)          # the CPU default: per-row for decode steps,
    assert grouping("looped", 4096, 16) == ("looped", 320)      # else rounds of 1.25 × the mean rows per expert
    assert grouping("looped", 4096, 16, block=128) == ("looped", 320)  # moe_block_size is the blocked layout's


@pytest.mark.parametrize("tokens", [1, 2])
def test_per_row_equals_blocked(tokens):
    """One- and two-token steps (batch 2, top-4 of the tiny config's 16 experts: at most one row per
    expert) take the per-row path; its output equals the blocked GEMM with a fixed block size."""
    cfg = dsv3.load_config("tiny")
    rows = 2 * tokens * cfg.num_experts_per_tok
    assert rows <= cfg.n_routed_experts and grouping("blocked", rows, cfg.n_routed_experts)[0] == "per_row"
    auto = MoE(cfg, execution(cfg, dsv3.RuntimeConfig(moe_impl="blocked")), nnx.Rngs(0))
    fixed = MoE(cfg, execution(cfg, dsv3.RuntimeConfig(moe_impl="blocked", moe_block_size=8)), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, tokens, cfg.hidden_size), jnp.float32)
    a, b = auto(x)[0], fixed(x)[0]
    assert float(jnp.abs(a).max()) > 1e-3   # not trivially zero
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=TOL)
    # and the gradient through the per-row path (a small training batch may take it too)
    ga = jax.grad(lambda m: jnp.sum(m(x)[0] ** 2))(auto)
    gb = jax.grad(lambda m: jnp.sum(m(x)[0] ** 2))(fixed)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=TOL, rtol=1e-4)
