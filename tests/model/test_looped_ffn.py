"""The looped expert-major SwiGLU (``looped_ffn``, the CPU default, docs/design.md §MoE on CPU) equals the
blocked grouped GEMM in value and gradient, for balanced routing (one round), skewed routing (several
rounds: still dropless) and with the expert-parallel path's padding group (its rows come out zero)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.grouped_gemm import expert_ffn
from dsv3_jax.model.looped_ffn import looped_ffn, round_capacity

# fp32; the forward runs the same per-row dot products (identical), the gradients sum the same
# products in another order (rounds vs blocks): a few ulps of values of size ~10
TOL = 2e-5
E, D, I, N = 4, 16, 24, 40


def _weights():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (N, D), jnp.float32)
    ws = [0.3 * jax.random.normal(k[i], s, jnp.float32) for i, s in ((1, (E, D, I)), (2, (E, D, I)), (3, (E, I, D)))]
    return x, ws


@pytest.mark.parametrize("sizes", [[10, 10, 10, 10], [37, 1, 0, 2], [0, 0, 40, 0]])
def test_looped_equals_blocked_value_and_grad(sizes):
    x, ws = _weights()
    s = jnp.asarray(sizes, jnp.int32)
    cap = round_capacity(N, E)
    assert max(sizes) > cap or sizes == [10, 10, 10, 10]    # the skewed cases take several rounds
    probe = jnp.cos(jnp.arange(D, dtype=jnp.float32))

    def loss(fn):
        return jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=(0, 1, 2, 3))(x, *ws)
    (l_ref, g_ref) = loss(lambda x, *w: expert_ffn(x, s, *w, impl="blocked", block=8))
    (l_new, g_new) = jax.jit(lambda: loss(lambda x, *w: looped_ffn(x, s, *w, cap)))()
    y_ref = expert_ffn(x, s, *ws, impl="blocked", block=8)
    y_new = looped_ffn(x, s, *ws, cap)
    assert float(jnp.abs(y_ref).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(y_new), np.asarray(y_ref))
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=TOL)
    for a, b in zip(g_new, g_ref):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=TOL)


def test_padding_group_rows_are_zero():
    x, ws = _weights()
    s = jnp.asarray([10, 5, 0, 10, 15], jnp.int32)    # E + 1 groups: the last is padding (expert-parallel path)
    y = looped_ffn(x, s, *ws, 16)
    np.testing.assert_array_equal(np.asarray(y[25:]), 0.0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expert_ffn(x, s, *ws, impl="blocked", block=8)))
    g = jax.grad(lambda x: jnp.sum(looped_ffn(x, s, *ws, 16) ** 2))(x)
    np.testing.assert_array_equal(np.asarray(g[25:]), 0.0)
