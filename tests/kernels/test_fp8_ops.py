"""FP8 quantizers and block-scaled GEMM (docs/architecture.md §6): reference vs exact math, vs fp32 within the e4m3
bound, the Pallas GPU (Triton) and TPU (Mosaic) kernels vs the reference in interpret mode, edge
values, the release checkpoint format, and lowering of both kernels for their real platforms."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels.fp8 as fp8
from pallas_kernels.fp8 import pallas_gpu, pallas_tpu, reference as ref
from tests.kernels.lowering import cuda_target
from dsv3_jax.checkpoint import fp8 as ckpt_fp8

# e4m3: 3 mantissa bits → round-to-nearest relative error ≤ 2^-4 in the normal range; below it
# (|q| < 2^-6) the absolute error is ≤ half the subnormal step 2^-10, in units of the tile's scale.
U = 2.0 ** -4
SUB = 2.0 ** -10


def _data(shape, seed, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _operands(m, n, k, seed=0):
    x, w = _data((m, k), seed), _data((n, k), seed + 1, 0.05)
    return x, w, fp8.quantize_activation(x), fp8.quantize_weight(w)


# ---- quantizers ----------------------------------------------------------------------------------
def test_quantize_weight_is_the_release_format():
    """Same format as the checkpoint converter's numpy quantizer: scales equal to 1 ulp (XLA turns
    ``amax / 448`` into ``amax * (1/448)``), codes equal but for rare rounding ties; and our
    dequantisation of a release-format weight is bit-identical to the converter's."""
    w = np.asarray(_data((200, 300), 0, 0.02))
    q, s = fp8.quantize_weight(jnp.asarray(w))
    q_np, s_np = ckpt_fp8.quantize(w)
    assert q.shape == (200, 300) and q.dtype == jnp.float8_e4m3fn and s.shape == (2, 3) == ckpt_fp8.scale_shape(w.shape)
    np.testing.assert_allclose(np.asarray(s), s_np, rtol=2.5e-7, atol=0)
    assert np.mean(np.asarray(q).view(np.uint8) != q_np.view(np.uint8)) < 1e-3
    np.testing.assert_array_equal(np.asarray(fp8.dequantize_weight(jnp.asarray(q_np), jnp.asarray(s_np))),
                                  ckpt_fp8.dequantize(q_np, s_np))


def test_quantize_activation_tiles_and_scales():
    x = _data((3, 5, 300), 1)
    q, s = fp8.quantize_activation(x)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape and s.shape == (3, 5, 3)
    xp = np.pad(np.asarray(x), ((0, 0), (0, 0), (0, 84))).reshape(3, 5, 3, 128)
    np.testing.assert_allclose(np.asarray(s), np.maximum(np.abs(xp).max(-1), 1e-4) / 448, rtol=2.5e-7)  # 1 ulp
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0  # the tile max maps to 448
    xd = fp8.dequantize_activation(q, s)
    assert np.all(np.abs(xd - x) <= U * np.abs(x) + SUB * np.repeat(np.asarray(s), 128, -1)[..., :300])
    # power-of-two scales: exact powers of two, never below amax/448, so nothing saturates
    q2, s2 = fp8.quantize_activation(x, pow2_scale=True)
    m, e = np.frexp(np.asarray(s2))
    assert np.all(m == 0.5) and np.all(np.asarray(s2) >= np.asarray(s))
    assert float(jnp.max(jnp.abs(q2.astype(jnp.float32)))) <= 448.0


def test_zeros_huge_and_saturation():
    q, s = fp8.quantize_activation(jnp.zeros((2, 130)))
    assert np.all(np.asarray(q.astype(jnp.float32)) == 0) and np.allclose(s, 1e-4 / 448)  # amax clamp
    x = jnp.array([[3e38, -3e38, 1.0] + [0.0] * 125])
    q, s = fp8.quantize_activation(x)  # huge but finite: saturates to ±448·scale = ±amax
    np.testing.assert_allclose(np.asarray(fp8.dequantize_activation(q, s))[0, :2], [3e38, -3e38], rtol=1e-6)
    # the cast itself saturates (float8_e4m3fn has no inf; a plain cast of 1e6 would be NaN)
    assert np.asarray(ref.cast_e4m3(jnp.array([1e6, -1e6, 500.0])).astype(jnp.float32)).tolist() == [448, -448, 448]
    xq, xs, wq, ws = *fp8.quantize_activation(jnp.zeros((4, 256))), *fp8.quantize_weight(_data((8, 256), 2))
    assert np.all(np.asarray(fp8.matmul(xq, xs, wq, ws, backend="reference")) == 0)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_nan_and_inf_propagate_like_fp32(backend):
    """NaN is not used for a tile's amax, so it stays local: output row 3 is NaN exactly as in fp32,
    the other rows are unchanged. An inf makes its row non-finite (its tile dequantises to NaN)."""
    x, w, _, (wq, ws) = _operands(6, 130, 256, 3)
    x = x.at[3, 5].set(jnp.nan).at[4, 200].set(jnp.inf)
    xq, xs = fp8.quantize_activation(x)
    y = np.asarray(fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32, backend=backend, interpret=True))
    clean = np.asarray(fp8.matmul(*fp8.quantize_activation(x.at[3, 5].set(0).at[4, 200].set(0)), wq, ws,
                                  out_dtype=jnp.float32, backend="reference"))
    assert np.all(np.isnan(y[3])) and not np.any(np.isfinite(y[4]))
    keep = [0, 1, 2, 5]
    np.testing.assert_allclose(y[keep], clean[keep], rtol=1e-5, atol=1e-5)


# ---- reference GEMM ------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 130, 200), (33, 256, 1024)])
def test_reference_equals_fp32_math_on_dequantised_operands(m, n, k):
    """Tight: the only difference from an fp32 GEMM of the dequantised operands is fp32 rounding
    (e4m3 products are exact; scaling per K block reorders the fp32 sums) — 1e-5 of Σ|x||w|."""
    x, w, (xq, xs), (wq, ws) = _operands(m, n, k)
    y = fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32, backend="reference")
    xd, wd = fp8.dequantize_activation(xq, xs), fp8.dequantize_weight(wq, ws)
    exact = np.asarray(xd, np.float64) @ np.asarray(wd, np.float64).T
    mag = np.abs(np.asarray(xd, np.float64)) @ np.abs(np.asarray(wd, np.float64)).T
    assert y.shape == (m, n) and np.all(np.abs(np.asarray(y) - exact) <= 1e-5 * mag + 1e-30)


def test_reference_within_e4m3_bound_of_fp32_and_bf16():
    """Elementwise ``|y - x@w.T| ≤ (2u + u²) Σ|x||w| + subnormal terms`` (u = 2^-4), and the typical
    (Frobenius) relative error of random data is a few percent — within a factor 2 of a bf16 GEMM's
    distance to fp32 times 2^4 (bf16 has 8 significand bits, e4m3 4)."""
    x, w, (xq, xs), (wq, ws) = _operands(48, 160, 640, 5)
    y = np.asarray(fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32, backend="reference"), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact = x64 @ w64.T
    sx = np.repeat(np.asarray(xs), 128, -1)[:, :640]
    sw = np.repeat(np.repeat(np.asarray(ws), 128, 0), 128, 1)[:160, :640]
    bound = (2 * U + U * U) * (np.abs(x64) @ np.abs(w64).T) + SUB * ((sx * (1 + U)) @ np.abs(w64).T
                                                                     + np.abs(x64) @ (sw * (1 + U)).T)
    assert np.all(np.abs(y - exact) <= bound * 1.0001)
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    bf16 = np.asarray(jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32))
    rel_bf16 = np.linalg.norm(bf16 - exact) / np.linalg.norm(exact)
    assert rel < 0.04 and rel < 2 * 16 * rel_bf16, (rel, rel_bf16)
    y_bf16 = fp8.matmul(xq, xs, wq, ws, backend="reference")  # default out dtype bf16
    assert y_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y_bf16, np.float32), y, rtol=2 ** -8, atol=1e-6)


def test_matmul_checks_shapes_and_backend():
    _, _, (xq, xs), (wq, ws) = _operands(4, 130, 200)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fp8.matmul(xq, xs, wq, ws[:1])
    with pytest.raises(ValueError, match="backend"):
        fp8.matmul(xq, xs, wq, ws, backend="cuda")
    with pytest.raises(ValueError, match="interpret=True"):
        fp8.matmul(xq, xs, wq, ws, backend="pallas")  # CPU: no kernel without the interpreter
    assert fp8.resolve_backend("auto") == "reference" and fp8.resolve_backend("pallas", True) == "pallas_gpu"
    # leading batch dims on the activation
    y = fp8.matmul(xq.reshape(2, 2, 200), xs.reshape(2, 2, 2), wq, ws, out_dtype=jnp.float32)
    np.testing.assert_array_equal(y.reshape(4, 130), fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32))


# ---- Pallas kernels in interpret mode --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("m,n,k", [(1, 130, 200), (260, 300, 1024)])
def test_pallas_kernel_matches_reference(backend, m, n, k):
    """Same math as the reference up to fp32 summation order (the kernel's tensor-core dot sums its
    128 products in another order): 1e-5 of Σ|x||w|. Shapes: M = 1, nothing a multiple of 128 but
    K = 1024 (8 K blocks, two TPU grid steps of 4); 260×300 spans several M and N tiles of both."""
    _, _, (xq, xs), (wq, ws) = _operands(m, n, k, 7)
    want = np.asarray(fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32, backend="reference"))
    got = fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32, backend=backend, interpret=True)
    mag = np.abs(np.asarray(fp8.dequantize_activation(xq, xs))) @ np.abs(np.asarray(fp8.dequantize_weight(wq, ws))).T
    assert got.shape == (m, n) and np.all(np.abs(np.asarray(got) - want) <= 1e-5 * mag + 1e-30)
    if m == 1:  # bf16 output: the fp32 result rounded once
        got_bf16 = fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.bfloat16, backend=backend, interpret=True)
        assert got_bf16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got_bf16, np.float32), want, rtol=2 ** -8, atol=1e-3 * np.abs(want).max())


def test_tile_choices_fit_the_hardware():
    assert [pallas_gpu.block_m(m) for m in (1, 16, 17, 100, 4096)] == [16, 16, 32, 128, 128]
    assert all(b & (b - 1) == 0 for b in (pallas_gpu.BN, ref.BLOCK))  # Triton: power-of-2 tiles
    assert [pallas_tpu.block_m(m) for m in (1, 40, 4096)] == [32, 64, 256]
    assert [pallas_tpu.k_steps(kb) for kb in (1, 2, 3, 8, 56, 144)] == [1, 2, 1, 4, 4, 4]


# ---- lowering for the real platforms (no device needed) ----------------------------------------------
def test_kernels_lower_for_cuda_and_tpu():
    """``jax.export`` lowers each kernel for its platform on this CPU machine: the Triton kernel to a
    Triton-IR custom call (the power-of-2 and dtype checks of the Pallas Triton lowering pass), the
    Mosaic kernel to a TPU custom call (block-shape tiling checks pass). Compiling them needs the device."""
    with cuda_target():
        from jax import export
        S, e4 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn
        gpu = jax.jit(lambda *a: pallas_gpu.matmul_padded(*a, out_dtype=jnp.bfloat16, bm=64))
        ex = export.export(gpu, platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            S((128, 384), e4), S((3, 128), jnp.float32), S((256, 384), e4), S((3, 256), jnp.float32))
        assert "xla.gpu.triton" in ex.mlir_module()
        tpu = jax.jit(lambda *a: pallas_tpu.matmul_padded(*a, out_dtype=jnp.bfloat16, bm=256, bn=256, ks=4))
        ex = export.export(tpu, platforms=["tpu"])(
            S((256, 1024), e4), S((8, 256, 1), jnp.float32), S((256, 1024), e4), S((8, 1, 256), jnp.float32))
        assert "tpu_custom_call" in ex.mlir_module()
