"""MLA attention ops (docs/architecture.md §2): flash prefill (jnp blockwise, Pallas Triton and Mosaic kernels in
interpret mode) against the reference, its gradients, the model's call path; absorbed decode against
plain per-head attention over re-expanded K/V, paged vs contiguous caches, split-KV vs unsplit; and
lowering of every kernel for its real platform.

Tolerances: everything is fp32 with fp32 accumulation; the kernels differ from the reference only in
summation order and the online-softmax rescaling, a few ulp of O(1) values → 1e-5 (2e-5 for sums over
300 keys, 1e-4 for gradients, whose ``p∘(dp − D)`` cancels)."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels.mla as mla
from pallas_kernels.mla import ops, pallas_gpu, pallas_tpu
from tests.kernels.lowering import cuda_target

KERNELS = ["pallas_gpu", "pallas_tpu"]


def _normal(seed, shape, scale=1.0):
    """numpy draws: no per-shape PRNG compile (compiles dominate these tests on a loaded CPU)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _qkv(b, s, h, dqk, dv, seed=0):
    return _normal(seed, (b, s, h, dqk)), _normal(seed + 1, (b, s, h, dqk)), _normal(seed + 2, (b, s, h, dv))


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# ---- prefill ---------------------------------------------------------------------------------------------
PREFILL_CASES = {
    # name: (B, S, H, Dqk, Dv, segments, causal, block)
    "len1": (1, 1, 2, 24, 16, None, True, None),
    "odd_packed_noncausal": (2, 37, 2, 24, 16, [[1] * 20 + [2] * 17, [3] * 30 + [0] * 7], False, 16),
    "s300_packed": (1, 300, 1, 24, 16, [[1] * 131 + [2] * 150 + [0] * 19], True, None),
}


@pytest.mark.parametrize("backend", ["blockwise"] + KERNELS)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(backend, case):
    """Length 1; odd S not a multiple of the block, packed documents with padding (id 0), non-causal;
    S = 300 causal packed (several key blocks, last one partial, causal block skipping)."""
    b, s, h, dqk, dv, seg, causal, block = PREFILL_CASES[case]
    q, k, v = _qkv(b, s, h, dqk, dv, seed=s)
    seg = None if seg is None else jnp.asarray(seg, jnp.int32)
    want = mla.prefill_reference(q, k, v, scale=dqk ** -0.5, segment_ids=seg, causal=causal)
    got = mla.prefill(q, k, v, scale=dqk ** -0.5, segment_ids=seg, causal=causal, backend=backend,
                      interpret=True, block=None if backend == "pallas_tpu" else block)
    _close(got, want, 2e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_prefill_v3_head_dims(backend):
    """V3 head dims: q/k 192 = 128 nope + 64 rope (two power-of-2 parts), v 128; tiny S."""
    q, k, v = _qkv(1, 5, 1, 192, 128, seed=3)
    want = mla.prefill_reference(q, k, v, scale=192 ** -0.5 * 1.8)
    got = mla.prefill(q, k, v, scale=192 ** -0.5 * 1.8, backend=backend, interpret=True)
    _close(got, want, 1e-5)
    assert ops.dim_parts(192) == [(0, 128, 128), (128, 64, 64)] and ops.dim_parts(576)[1] == (512, 64, 64)


@pytest.mark.parametrize("backend,causal", [("blockwise", True), ("pallas_gpu", True), ("pallas_gpu", False),
                                            ("pallas_tpu", True)])
def test_prefill_gradients_match_reference(backend, causal):
    """custom_vjp vs autodiff of the reference, packed segments, S not a multiple of the block:
    ``blockwise`` = jnp forward + jnp blockwise backward; ``pallas_gpu`` / ``pallas_tpu`` = the
    kernel's forward + its dk/dv and dq kernels (interpreted; 16-wide blocks: 2 key blocks)."""
    q, k, v = _qkv(2, 21, 2, 24, 16, seed=7)
    seg = jnp.asarray([[1] * 9 + [2] * 12, [1] * 21], jnp.int32)
    w = _normal(11, (2, 21, 2, 16))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ref = loss(lambda q, k, v: mla.prefill_reference(q, k, v, scale=0.25, segment_ids=seg, causal=causal))
    ours = loss(lambda q, k, v: mla.prefill(q, k, v, scale=0.25, segment_ids=seg, causal=causal, backend=backend,
                                            interpret=True, block=16))
    g_ref = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    g = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    for a, b_ in zip(g, g_ref):
        _close(a, b_, 1e-4)


def test_prefill_bf16_and_errors():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 33, 2, 24, 16, seed=5))
    want = mla.prefill_reference(q, k, v, scale=0.2)
    got = mla.prefill(q, k, v, scale=0.2, backend="blockwise")
    assert got.dtype == jnp.bfloat16
    _close(got, want, 2 ** -7)   # both round p to bf16 before p·v; sums in another order
    with pytest.raises(ValueError, match="backend"):
        mla.prefill(q, k, v, scale=0.2, backend="cuda")
    with pytest.raises(ValueError, match="interpret=True"):
        mla.prefill(q, k, v, scale=0.2, backend="pallas")
    with pytest.raises(ValueError, match="segment_ids"):
        mla.prefill(q, k, v, scale=0.2, segment_ids=jnp.zeros((1, 5), jnp.int32))
    assert mla.resolve_backend("auto") == "reference" and mla.resolve_backend("pallas", True) == "pallas_gpu"


def test_prefill_in_the_model_call_path(monkeypatch):
    """The tiny config's MLA layer (q-LoRA, YaRN scale, nope 16 + rope 8, v 16) on packed documents:
    its attention call routed to ``mla.prefill`` (Triton kernel, interpreted) gives the same output as
    routed to ``prefill_reference`` (whichever name the model calls: ``prefill_reference`` or
    ``pallas_kernels.mla.prefill``; both are patched)."""
    from flax import nnx
    import dsv3_jax as dsv3
    from dsv3_jax.model import mla as model_mla
    from dsv3_jax.model.rope import rope_angles

    from dsv3_jax.model.execution import execution
    cfg = dsv3.load_config("tiny")
    layer = model_mla.MLA(cfg, execution(cfg), rngs=nnx.Rngs(0))
    x = _normal(1, (2, 13, cfg.hidden_size))
    seg = jnp.asarray([[1] * 6 + [2] * 7, [1] * 13], jnp.int32)
    pos = jnp.asarray([list(range(6)) + list(range(7)), list(range(13))], jnp.int32)
    cos, sin = rope_angles(cfg, pos)
    calls = []

    def run(fn):
        def attend(q, k, v, *, scale, segment_ids=None, causal=True, **_):
            calls.append(scale)
            return fn(q, k, v, scale=scale, segment_ids=segment_ids, causal=causal)
        if hasattr(model_mla, "prefill_reference"):
            monkeypatch.setattr(model_mla, "prefill_reference", attend)
        monkeypatch.setattr(mla, "prefill", attend)
        return jax.jit(lambda x: layer(x, cos, sin, seg)[0])(x)

    want = run(mla.prefill_reference)
    got = run(lambda q, k, v, **kw: ops.prefill(q, k, v, backend="pallas_gpu", interpret=True, **kw))
    assert calls == [cfg.softmax_scale] * 2   # the patched entry point is the one the layer calls
    _close(got, want, 1e-5)


# ---- decode ----------------------------------------------------------------------------------------------
def _decode_problem(b=3, h=4, lat=32, rope=16, dn=16, dv=16, t=40, seed=0):
    """Random absorbed-MLA problem: W_kvb ``[L, H, Dn + Dv]``, latent cache, per-head queries."""
    w_kvb = _normal(seed, (lat, h, dn + dv), lat ** -0.5)
    ckv, krope = _normal(seed + 1, (b, t, lat)), _normal(seed + 2, (b, t, rope))
    q_nope, q_rope = _normal(seed + 3, (b, h, dn)), _normal(seed + 4, (b, h, rope))
    q_lat = jnp.asarray(np.einsum("bhn,lhn->bhl", q_nope, w_kvb[..., :dn]))           # q_nope · W_k (per head, Dn → L)
    return w_kvb, ckv, krope, q_nope, q_rope, q_lat


@functools.partial(jax.jit, static_argnames=("scale", "dn"))
def _expanded_attention(q_nope, q_rope, ckv, krope, w_kvb, lengths, scale, dn):
    """Plain per-head attention over re-expanded keys/values: k = [c_kv·W_k, k_rope], v = c_kv·W_v."""
    k_nope = jnp.einsum("btl,lhn->bthn", ckv, w_kvb[..., :dn])
    v = jnp.einsum("btl,lhn->bthn", ckv, w_kvb[..., dn:])
    k = jnp.concatenate([k_nope, jnp.broadcast_to(krope[:, :, None], k_nope.shape[:3] + krope.shape[-1:])], -1)
    q = jnp.concatenate([q_nope, q_rope], -1)
    s = jnp.einsum("bhd,bthd->bht", q, k, precision="highest") * scale
    s = jnp.where(jnp.arange(ckv.shape[1])[None, None] < lengths[:, None, None], s, -jnp.inf)
    return jnp.einsum("bht,bthn->bhn", jax.nn.softmax(s, -1), v, precision="highest")



@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_decode_equals_expanded_attention(backend):
    """Lengths 1, odd (not a multiple of the page), the whole cache; o_lat·W_v equals per-head attention
    over the re-expanded K/V; a length-0 row gives zeros."""
    dn, scale = 16, 0.13
    w_kvb, ckv, krope, q_nope, q_rope, q_lat = _decode_problem(b=4, t=40)
    lengths = jnp.asarray([1, 23, 40, 0], jnp.int32)
    o_lat = mla.decode(q_lat, q_rope, ckv, krope, lengths, scale=scale, backend=backend, interpret=True,
                       page_size=8, num_splits=2)
    assert o_lat.shape == q_lat.shape and o_lat.dtype == jnp.float32
    o = jnp.einsum("bhl,lhn->bhn", o_lat, w_kvb[..., dn:], precision="highest")
    want = _expanded_attention(q_nope, q_rope, ckv, krope, w_kvb, lengths, scale=scale, dn=dn)
    _close(o[:3], want[:3], 1e-5)
    assert np.all(np.asarray(o_lat[3]) == 0)


def _paged(ckv, krope, page, seed=0, extra=3):
    """Scatter a contiguous cache into a shuffled page pool (plus unused pages) and its block table."""
    b, t, _ = ckv.shape
    n = t // page
    perm = np.random.default_rng(seed).permutation(b * n + extra)
    pool_c = np.zeros((b * n + extra, page, ckv.shape[-1]), np.float32)
    pool_r = np.zeros((b * n + extra, page, krope.shape[-1]), np.float32)
    pool_c[perm[:b * n]] = np.asarray(ckv).reshape(b * n, page, -1)
    pool_r[perm[:b * n]] = np.asarray(krope).reshape(b * n, page, -1)
    return jnp.asarray(pool_c), jnp.asarray(pool_r), jnp.asarray(perm[:b * n].reshape(b, n), jnp.int32)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_paged_equals_contiguous(backend):
    """Shuffled page pool + block table equals the contiguous cache; block-table entries past a
    sequence's last page are garbage (-1, out of range) and must be ignored."""
    _, ckv, krope, _, q_rope, q_lat = _decode_problem(b=2, t=32, seed=4)
    lengths = jnp.asarray([13, 17], jnp.int32)
    pool_c, pool_r, bt = _paged(ckv, krope, page=8)
    bt = bt.at[0, 2:].set(jnp.asarray([-1, 10 ** 6]))               # seq 0 needs pages 0, 1 only
    want = mla.decode(q_lat, q_rope, ckv, krope, lengths, scale=0.2, backend="reference")
    got = mla.decode(q_lat, q_rope, pool_c, pool_r, lengths, scale=0.2, block_table=bt, backend=backend,
                     interpret=True, num_splits=1)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_split_kv_combine_equals_unsplit(backend):
    """3 splits of 5 pages (the last split partly and one sequence's later splits wholly past its
    length) combine to the unsplit result."""
    _, ckv, krope, _, q_rope, q_lat = _decode_problem(b=2, t=40, seed=8)
    lengths = jnp.asarray([39, 6], jnp.int32)
    want = mla.decode_reference(q_lat, q_rope, ckv, krope, lengths, scale=0.2)
    got = mla.decode(q_lat, q_rope, ckv, krope, lengths, scale=0.2, backend=backend, interpret=True,
                     page_size=8, num_splits=3)
    _close(got, want, 1e-5)
    if backend == "reference":  # the partials themselves: empty chunks have lse = -inf, o = 0
        partial = jax.jit(mla.decode_partial_reference, static_argnames=("scale", "num_splits", "block_table"))
        o, lse = partial(q_lat, q_rope, ckv, krope, lengths, scale=0.2, num_splits=3)
        assert np.all(np.isneginf(np.asarray(lse[1, 1:]))) and np.all(np.asarray(o[1, 1:]) == 0)
        _close(mla.combine_splits(o, lse), want, 1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_decode_v3_latent_dims(backend):
    """V3 latent dims: c_kv 512 + k_rope 64 (score over 576), 2 heads, paged cache of 16-token pages."""
    dn = 128
    w_kvb, ckv, krope, q_nope, q_rope, q_lat = _decode_problem(b=2, h=2, lat=512, rope=64, dn=dn, dv=128, t=32)
    lengths = jnp.asarray([32, 9], jnp.int32)
    pool_c, pool_r, bt = _paged(ckv, krope, page=16, extra=0)
    scale = 192 ** -0.5
    o_lat = mla.decode(q_lat, q_rope, pool_c, pool_r, lengths, scale=scale, block_table=bt, backend=backend,
                       interpret=True)
    o = jnp.einsum("bhl,lhn->bhn", o_lat, w_kvb[..., dn:], precision="highest")
    _close(o, _expanded_attention(q_nope, q_rope, ckv, krope, w_kvb, lengths, scale=scale, dn=dn), 1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_bf16_inputs(backend):
    """bf16 operands (the model's compute dtype): prefill returns bf16, decode fp32; both round p to
    bf16 before p·v like the reference, so they agree with it to a few bf16 ulp (2^-7 relative)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 19, 1, 24, 16, seed=9))
    got = mla.prefill(q, k, v, scale=0.2, backend=backend, interpret=True)
    assert got.dtype == jnp.bfloat16
    _close(got, mla.prefill_reference(q, k, v, scale=0.2), 2 ** -6)
    _, ckv, krope, _, q_rope, q_lat = _decode_problem(b=2, t=16, seed=12)
    args = [x.astype(jnp.bfloat16) for x in (q_lat, q_rope, ckv, krope)]
    lengths = jnp.asarray([16, 5], jnp.int32)
    got = mla.decode(*args, lengths, scale=0.2, backend=backend, interpret=True, page_size=8)
    assert got.dtype == jnp.float32
    want = mla.decode_reference(*[a.astype(jnp.float32) for a in args], lengths, scale=0.2)
    _close(got, want, 2 ** -6)   # kernel: bf16 p·c_kv; reference here: fp32 throughout


def test_decode_checks_shapes_and_page_sizes():
    _, ckv, krope, _, q_rope, q_lat = _decode_problem(b=2, t=24)
    with pytest.raises(ValueError, match="shapes do not fit"):
        mla.decode(q_lat, q_rope, ckv, krope, jnp.asarray([1, 2, 3]), scale=1.0)
    with pytest.raises(ValueError, match="power-of-2 page"):
        mla.decode(q_lat, q_rope, ckv, krope, jnp.asarray([1, 2]), scale=1.0, backend="pallas_gpu",
                   interpret=True, page_size=12)
    assert mla.default_num_splits(64, 1) == 1 and mla.default_num_splits(32768, 1) == 64
    assert mla.default_num_splits(4096, 128) == 2


# ---- lowering for the real platforms (no device needed) ------------------------------------------------
def test_kernels_lower_for_cuda_and_tpu():
    """``jax.export`` lowers each kernel for its platform at V3 shapes on this CPU machine: Triton
    kernels to Triton custom calls (power-of-2 / dtype checks of the Pallas Triton lowering), Mosaic
    kernels to TPU custom calls (block-shape tiling checks). Running them needs the device."""
    with cuda_target():
        from jax import export
        S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
        triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        b, h, sp = 1, 2, 256
        pre = (S((b, h, sp, 128), bf), S((b, h, sp, 64), bf), S((b, h, sp, 128), bf), S((b, h, sp, 64), bf),
               S((b, h, sp, 128), bf), S((b, sp), jnp.int32), S((b, sp), jnp.int32))
        for kern, plat, marker, block in ((pallas_gpu, "cuda", "xla.gpu.triton", 64), (pallas_tpu, "tpu", "tpu_custom_call", 128)):
            fn = jax.jit(lambda qa, qb, ka, kb, v, qs, ks, kern=kern, block=block: kern.prefill_fwd(
                [qa, qb], [ka, kb], v, qs, ks, scale=0.1, causal=True, block_q=block, block_k=block))
            ex = export.export(fn, platforms=[plat], disabled_checks=triton if plat == "cuda" else [])(*pre)
            assert marker in ex.mlir_module()
        f32 = jnp.float32
        bwd = jax.jit(lambda qa, qb, ka, kb, v, qs, ks, do, lse, delta: pallas_gpu.prefill_bwd(
            [qa, qb], [ka, kb], v, qs, ks, do, lse, delta, scale=0.1, causal=True))
        ex = export.export(bwd, platforms=["cuda"], disabled_checks=triton)(
            *pre, S((b, h, sp, 128), bf), S((b, h, sp), f32), S((b, h, sp), f32))
        assert "xla.gpu.triton" in ex.mlir_module()
        bwd = jax.jit(lambda qa, qb, ka, kb, v, qs, ks, do, lse, delta: pallas_tpu.prefill_bwd(
            [qa, qb], [ka, kb], v, qs, ks, do, lse, delta, scale=0.1, causal=True))
        ex = export.export(bwd, platforms=["tpu"])(*pre, S((b, h, sp, 128), bf), S((b, h, sp), f32), S((b, h, sp), f32))
        assert "tpu_custom_call" in ex.mlir_module()
        n_pages, page, hd = 16, 64, 64
        dec = (S((2, hd, 512), bf), S((2, hd, 64), bf), S((n_pages, page, 512), bf), S((n_pages, page, 64), bf),
               S((2, 8), jnp.int32), S((2,), jnp.int32))
        gpu = jax.jit(lambda *a: pallas_gpu.decode_partial(*a, scale=0.1, num_splits=2, block_h=64, pages_per_block=1))
        assert "xla.gpu.triton" in export.export(gpu, platforms=["cuda"], disabled_checks=triton)(*dec).mlir_module()
        small_pages = (*dec[:2], S((37, 16, 512), bf), S((37, 16, 64), bf), S((2, 24), jnp.int32), dec[5])  # 4 per block
        gpu = jax.jit(lambda *a: pallas_gpu.decode_partial(*a, scale=0.1, num_splits=3, block_h=64, pages_per_block=4))
        assert "xla.gpu.triton" in export.export(gpu, platforms=["cuda"], disabled_checks=triton)(*small_pages).mlir_module()
        tpu = jax.jit(lambda *a: pallas_tpu.decode_partial(*a, scale=0.1, num_splits=2))
        assert "tpu_custom_call" in export.export(tpu, platforms=["tpu"])(*dec).mlir_module()
