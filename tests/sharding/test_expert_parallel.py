"""Expert parallelism on 8 fake CPU devices equals the single-device model (issue M3).

Tolerance: 1e-5 absolute on fp32 logits/loss/gradients — the sharded program sums expert outputs in
a different order (psum_scatter), nothing else differs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
import sharding
from jax.sharding import PartitionSpec as P
from sharding import expert_parallel
from sharding.rules import DEFAULT_RULES

TOL = 1e-5
CFG = ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0"]


def _loss_and_grads(model, tokens, mesh=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is not None:
        params, rest = DEFAULT_RULES.place(params, mesh), DEFAULT_RULES.place(rest, mesh)
        tokens = jax.device_put(tokens, DEFAULT_RULES.batch_sharding(mesh))

    @jax.jit
    def step(params, rest, tokens):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(tokens, mtp=False)
            logp = jax.nn.log_softmax(out.logits[:, :-1])
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
            return nll, out
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, out.logits, out.router.counts, grads, out.router.dropped

    return step, (params, rest, tokens)


@pytest.fixture(scope="module")
def reference():
    cfg = dsv3.load_config("tiny", CFG)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 24)))
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    step, args = _loss_and_grads(model, tokens)
    return cfg, tokens, step(*args)


@pytest.mark.parametrize("strategy, mesh_spec", [
    ("allgather", "expert=8"), ("allgather", "data=2,expert=4"), ("allgather", "fsdp=2,expert=2,tensor=2"),
    ("ragged_a2a", "expert=8"), ("ragged_a2a", "fsdp=2,expert=2,tensor=2"),
    ("a2a_capacity", "data=2,expert=4"),  # capacity large enough that nothing is dropped
])
def test_expert_parallel_equals_single_device(reference, strategy, mesh_spec):
    cfg, tokens, (loss, logits, counts, grads, _) = reference
    mesh = sharding.make_mesh(mesh_spec)
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=mesh,
                            runtime=dsv3.RuntimeConfig(ep_strategy=strategy, capacity_factor=8.0))
    step, args = _loss_and_grads(model, tokens, mesh)
    loss2, logits2, counts2, grads2, dropped = step(*args)
    assert int(dropped.sum()) == 0
    assert abs(float(loss2) - float(loss)) <= TOL
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=TOL)
    np.testing.assert_array_equal(np.asarray(counts2), np.asarray(counts))  # global router statistics
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
    # Expert weights stay sharded over the expert axis (never replicated).
    w = dict(nnx.to_flat_state(args[0]))[("moe_layers", "mlp", "experts", "gate")].get_value()
    assert "expert" in str(w.sharding.spec)
    hlo = step.lower(*args).compile().as_text()
    if strategy == "allgather":
        assert "all-gather" in hlo and "reduce-scatter" in hlo
    else:
        assert "all-to-all" in hlo


@pytest.mark.parametrize("strategy, mesh_spec", [
    ("allgather", "expert=8"), ("ragged_a2a", "expert=8"), ("allgather", "data=2,expert=4")])
def test_fp8_expert_parallel_equals_single_device(strategy, mesh_spec):
    """quant=fp8 (docs/architecture.md §6) on a mesh: every FP8 GEMM runs per shard inside shard_map (the Pallas
    kernels cannot be partitioned by XLA) with the same 1×128 activation tiles and 128×128 weight
    blocks as one device, so the loss, logits and input gradients equal one device up to summation
    order. Weight-gradient GEMMs contract over tokens, and each shard holds only its own tokens: their
    1×128 tiles run along *local* tokens (as in any data-parallel FP8 training), so weight gradients
    agree within FP8 error (measured ≤ 4%)."""
    cfg, fp8 = dsv3.load_config("tiny", CFG), dsv3.RuntimeConfig(quant="fp8")
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (8, 24)))
    step, args = _loss_and_grads(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=fp8), tokens)
    loss, logits, _, grads, _ = step(*args)
    mesh = sharding.make_mesh(mesh_spec)
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=mesh, runtime=fp8.replace(ep_strategy=strategy))
    step2, args2 = _loss_and_grads(model, tokens, mesh)
    loss2, logits2, _, grads2, _ = step2(*args2)
    assert abs(float(loss2) - float(loss)) <= TOL
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=TOL)
    fp8_weights = ("kernel", "experts")  # FP8 GEMMs; embedding, head, norms and router stay in high precision
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads2), jax.tree.leaves(grads)):
        a, b = np.asarray(a), np.asarray(b)
        name = jax.tree_util.keystr(path)
        rel = np.abs(a - b).max() / np.abs(b).max()
        fp8_grad = any(k in name for k in fp8_weights) and "router" not in name
        assert rel <= (0.06 if fp8_grad else 1e-4), (name, rel)


def test_capacity_strategy_reports_drops(reference):
    cfg, tokens, (_, logits, _, _, _) = reference
    mesh = sharding.make_mesh("expert=8")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=mesh,
                            runtime=dsv3.RuntimeConfig(ep_strategy="a2a_capacity", capacity_factor=0.25))
    forward, state = dsv3.make_forward(model, mtp=False)
    out = forward(DEFAULT_RULES.place(state, mesh), jax.device_put(tokens, DEFAULT_RULES.batch_sharding(mesh)))
    total_slots = tokens.size * cfg.num_experts_per_tok
    assert 0 < int(out.router.dropped.sum()) < total_slots
    assert np.abs(np.asarray(out.logits) - np.asarray(logits)).max() > 1e-3  # dropping changes the answer


def test_emulated_ragged_all_to_all_semantics():
    """Each of 4 shards sends shard j (j+1) rows; receivers place them at the sender-given offsets."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("expert",))
    n, cap = 4, 4

    def body(x):
        me = jax.lax.axis_index("expert")
        send_sizes = jnp.arange(1, n + 1, dtype=jnp.int32)                 # to shard j: j+1 rows
        input_offsets = jnp.cumsum(send_sizes) - send_sizes
        recv_sizes = jnp.full((n,), me + 1, jnp.int32)                     # every sender sends me me+1 rows
        recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
        output_offsets = jax.lax.all_to_all(recv_offsets, "expert", 0, 0, tiled=True)
        out = expert_parallel.emulated_ragged_all_to_all(
            x[0], jnp.full((n * cap,), -1, x.dtype), input_offsets, send_sizes, output_offsets, recv_sizes,
            axis_name="expert", max_chunk=cap)
        return out[None]

    x = (100 * jnp.arange(n)[:, None] + jnp.arange(10)[None, :]).astype(jnp.int32)  # sender s, row r: 100s + r
    out = np.asarray(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"),
                                   check_vma=False)(x))
    for r in range(n):                       # receiver r gets rows [off_r, off_r + r] from every sender
        off = r * (r + 1) // 2
        want = np.concatenate([100 * s + np.arange(off, off + r + 1) for s in range(n)])
        np.testing.assert_array_equal(out[r][:len(want)], want)
        assert (out[r][len(want):] == -1).all()


def test_experts_not_divisible_by_expert_axis():
    cfg = dsv3.load_config("tiny", CFG + ["n_routed_experts=12", "n_group=4"])
    with pytest.raises(sharding.MeshError, match="12 routed experts cannot be split over the mesh's expert axis of size 8"):
        dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=sharding.make_mesh("expert=8"))


def test_mesh_errors():
    with pytest.raises(sharding.MeshError, match="has 6 devices but 8 are available"):
        sharding.make_mesh("data=2,expert=3")
    with pytest.raises(sharding.MeshError, match="unknown mesh axis 'exprt'"):
        sharding.make_mesh("exprt=8")
    assert sharding.make_mesh("data=2,expert=-1").shape["expert"] == 4
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 8 batch shards"):
        DEFAULT_RULES.check_batch(6, sharding.make_mesh("data=2,expert=4"))


def test_with_runtime_rebuilds_for_a_mesh_sharing_weights(reference):
    """``model.with_runtime(mesh=...)`` is the same weights built expert-parallel: equal logits."""
    cfg, tokens, (_, logits, _, _, _) = reference
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("data=2,expert=4")
    ep_model = model.with_runtime(dsv3.RuntimeConfig(ep_strategy="ragged_a2a"), mesh=mesh)
    assert ep_model.moe_layers.mlp.ep is not None and model.moe_layers.mlp.ep is None
    forward, state = dsv3.make_forward(ep_model, mtp=False)
    out = forward(DEFAULT_RULES.place(state, mesh), jax.device_put(tokens, DEFAULT_RULES.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(logits), atol=TOL)


def test_rules_are_typed_and_reject_repeated_axes():
    r = DEFAULT_RULES.with_(embed="fsdp")
    assert r["embed"] == ("fsdp",) and DEFAULT_RULES["embed"] == ("fsdp", "expert")
    assert hash(r) != hash(DEFAULT_RULES)
    with pytest.raises(sharding.MeshError, match="names a mesh axis twice"):
        sharding.Rules.of({"embed": ("fsdp", "fsdp")})
    sizes = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert DEFAULT_RULES.batch_axes(sizes) == ("data", "expert") and DEFAULT_RULES.batch_shards(sizes) == 8
    assert DEFAULT_RULES.spec(("expert", "embed", "moe_mlp"), (16, 64, 32), sizes) == P("expert", None, None)


def test_pallas_attention_kernels_per_shard_equal_single_device(reference):
    """attention_impl=pallas (what ``auto`` picks on GPU/TPU) on an 8-device mesh: the flash prefill
    kernel (forward and its Pallas backward) runs inside shard_map per batch/head shard — XLA cannot
    partition a Mosaic/Triton call — here in the Pallas interpreter. Logits, loss and gradients equal
    the single-device reference model."""
    cfg, tokens, (loss, logits, counts, grads, _) = reference
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=mesh,
                            runtime=dsv3.RuntimeConfig(attention_impl="pallas", interpret=True))
    step, args = _loss_and_grads(model, tokens, mesh)
    loss2, logits2, counts2, grads2, _ = step(*args)
    assert abs(float(loss2) - float(loss)) <= TOL
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=TOL)
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
    # every pallas_call sits inside a shard_map (what a TPU/GPU compile of a multi-device mesh needs)
    def calls(jaxpr, inside=False):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield inside
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    sub = getattr(sub, "jaxpr", sub)
                    if isinstance(sub, jax.extend.core.Jaxpr):
                        yield from calls(sub, inside or eqn.primitive.name == "shard_map")
    where = list(calls(jax.make_jaxpr(step)(*args).jaxpr))
    assert where and all(where), f"{len(where)} pallas_calls, {where.count(False)} outside shard_map"
