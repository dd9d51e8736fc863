"""The FP8 grouped GEMM quantizes each expert in its own ``[K, N]`` layout (no fp32 transposed copy of
the stack, docs/design.md §Memory at 671B) and must give what the single-matrix ``fp8.linear`` gives
for each block's expert — which quantizes ``w[e].T``."""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import fp8
from pallas_kernels.fp8 import reference as ref
from pallas_kernels.fp8.grouped import quantize_experts

# K and N not multiples of 128, so the block padding is exercised in both layouts
E, B, K, N = 3, 8, 200, 136


def _problem(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    xb = jax.random.normal(ks[0], (5, B, K))
    w = 0.1 * jax.random.normal(ks[1], (E, K, N)) * jnp.exp(jax.random.normal(ks[2], (E, K, N)))
    block_expert = jnp.array([2, 0, 0, 1, 2], jnp.int32)
    return xb, w, block_expert


def test_quantize_experts_is_the_transposed_weight_quantization_bit_for_bit():
    _, w, _ = _problem()
    bits, ws = quantize_experts(w)
    for e in range(E):
        q_t, s_t = ref.quantize_weight(w[e].T)            # what ops.linear quantizes: [N, K]
        np.testing.assert_array_equal(np.asarray(ref.from_bits(bits[e])).T.view(np.uint8),
                                      np.asarray(q_t).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(ws[e]).T, np.asarray(s_t))


def _transposed_formulation(xb, w, be, dy):
    """The previous formulation (an fp32 ``w[e].T`` per expert quantized, the blocks' FP8 weights
    gathered from it), written out from the public ops: forward, dgrad and wgrad."""
    gemm = jax.vmap(lambda a, a_s, b, b_s, dt=jnp.float32: fp8.gemm_rowscaled(a, a_s, b, b_s, out_dtype=dt))
    rows = jax.vmap(ref.weight_scale_rows, (0, None))
    wq, ws = jax.vmap(ref.quantize_weight)(jnp.swapaxes(w, 1, 2))                    # [E, N, K]
    xq, xs = ref.quantize_activation(xb)
    y = gemm(xq, xs, wq[be], rows(ws[be], N))
    dyq, dys = ref.quantize_activation(dy)
    dx = gemm(dyq, dys, jnp.swapaxes(wq[be], 1, 2), rows(jnp.swapaxes(ws[be], 1, 2), K))
    xtq, xts = ref.quantize_activation(jnp.swapaxes(ref.dequantize_activation(xq, xs), 1, 2))
    dytq, dyts = ref.quantize_activation(jnp.swapaxes(dy, 1, 2))
    dw = jax.ops.segment_sum(gemm(xtq, xts, dytq, dyts), be, num_segments=E)
    return y, dx, dw


def test_grouped_linear_equals_the_transposed_formulation_and_per_block_linear():
    """Bit for bit the numbers of the previous (transposed-copy) formulation: forward, dx and dw. And
    each block is the single-matrix ``fp8.linear`` with its expert's weight (its gradients summed per
    expert), up to the order of fp32 sums in a batched vs a single dot (rtol 1e-5)."""
    xb, w, be = _problem()
    dy = jax.random.normal(jax.random.key(7), (5, B, N))
    y, vjp = jax.vjp(lambda x, w: fp8.grouped_linear(x, w, be, out_dtype=jnp.float32), xb, w)
    dx, dw = vjp(dy)
    for got, want in zip((y, dx, dw), jax.jit(_transposed_formulation)(xb, w, be, dy)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    want_dw = np.zeros((E, K, N), np.float32)
    for b in range(xb.shape[0]):
        e = int(be[b])
        yb, vjp_b = jax.vjp(fp8.linear, xb[b], w[e])
        dxb, dwb = vjp_b(dy[b])
        np.testing.assert_allclose(np.asarray(y[b]), np.asarray(yb), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dx[b]), np.asarray(dxb), rtol=1e-5, atol=1e-5)
        want_dw[e] += np.asarray(dwb)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)


def test_precomputed_quantization_and_padding_group():
    """``quantized=`` gives the same result as quantizing inside; a block whose expert id is past the
    stack (the padding group) gives zero output and adds nothing to any expert's gradient."""
    xb, w, be = _problem(1)
    be = be.at[3].set(E)                                   # padding block
    q = quantize_experts(w)
    f = lambda x, w, q=None: fp8.grouped_linear(x, w, be, quantized=q).astype(jnp.float32).sum()  # noqa: E731
    (v0, (dx0, dw0)), (v1, (dx1, dw1)) = (jax.value_and_grad(f, (0, 1))(xb, w),
                                          jax.value_and_grad(lambda x, w: f(x, w, q), (0, 1))(xb, w))
    assert float(v0) == float(v1)
    np.testing.assert_array_equal(np.asarray(dx0), np.asarray(dx1))
    np.testing.assert_array_equal(np.asarray(dw0), np.asarray(dw1))
    y = fp8.grouped_linear(xb, w, be, quantized=q)
    assert float(jnp.abs(y[3]).max()) == 0.0 and float(jnp.abs(dx0[3]).max()) == 0.0
    keep = jnp.array([0, 1, 2, 4])                         # the same blocks without the padding one
    dw_keep = jax.grad(lambda w: fp8.grouped_linear(xb[keep], w, be[keep]).astype(jnp.float32).sum())(w)
    np.testing.assert_allclose(np.asarray(dw0), np.asarray(dw_keep), rtol=1e-6, atol=1e-7)
