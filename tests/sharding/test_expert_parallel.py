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
from sharding import expert_parallel

TOL = 1e-5
CFG = ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0"]


def _loss_and_grads(model, tokens, mesh=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is not None:
        params, rest = sharding.shard_state(params, mesh), sharding.shard_state(rest, mesh)
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))

    @jax.jit
    def step(params, rest, tokens):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(tokens, mtp=False)
            logp = jax.nn.log_softmax(out.logits[:, :-1])
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
            return nll, out
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, out.logits, out.router.counts, grads

    return step, (params, rest, tokens)


@pytest.fixture(scope="module")
def reference():
    cfg = dsv3.load_config("tiny", CFG)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 24)))
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    step, args = _loss_and_grads(model, tokens)
    return cfg, tokens, step(*args)


@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2"])
def test_expert_parallel_equals_single_device(reference, mesh_spec):
    cfg, tokens, (loss, logits, counts, grads) = reference
    mesh = sharding.make_mesh(mesh_spec)
    model = expert_parallel.enable(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0)), mesh)
    step, args = _loss_and_grads(model, tokens, mesh)
    loss2, logits2, counts2, grads2 = step(*args)
    assert abs(float(loss2) - float(loss)) <= TOL
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=TOL)
    np.testing.assert_array_equal(np.asarray(counts2), np.asarray(counts))  # global router statistics
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
    # Expert weights stay sharded over the expert axis (never replicated).
    w = dict(nnx.to_flat_state(args[0]))[("moe_layers", "mlp", "experts", "gate")].get_value()
    assert "expert" in str(w.sharding.spec)
    hlo = step.lower(*args).compile().as_text()
    assert "all-gather" in hlo and "reduce-scatter" in hlo


def test_experts_not_divisible_by_expert_axis():
    cfg = dsv3.load_config("tiny", CFG + ["n_routed_experts=12", "n_group=4"])
    with pytest.raises(sharding.MeshError, match="12 routed experts cannot be split over the mesh's expert axis of size 8"):
        expert_parallel.enable(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0)), sharding.make_mesh("expert=8"))


def test_mesh_errors():
    with pytest.raises(sharding.MeshError, match="has 6 devices but 8 are available"):
        sharding.make_mesh("data=2,expert=3")
    with pytest.raises(sharding.MeshError, match="unknown mesh axis 'exprt'"):
        sharding.make_mesh("exprt=8")
    assert sharding.make_mesh("data=2,expert=-1").shape["expert"] == 4
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 8 batch shards"):
        sharding.check_batch(6, sharding.make_mesh("data=2,expert=4"))
