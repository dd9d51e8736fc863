"""The pipelined train step equals the one-device step (docs/design.md §Pipeline), on 8 fake CPU devices.

For ``stage=4,data=2`` and ``stage=2,expert=4`` and every schedule: the loss terms, every gradient and the
router counts of the main and MTP MoE layers equal the unpipelined ``value_and_grad`` (fp32; tolerance:
1e-5 of each gradient leaf's largest entry, 1e-6 relative on the losses, counts exactly), and the peak
in-flight micro-batches and busy ticks the step measures on each device equal the simulator's. For one schedule per mesh
the whole train step (AdamW update, aux-loss-free bias update, parameters laid out over ``stage``) equals
the one-device step. Sizes are the smallest that exercise every schedule: 1 dense + 4 MoE layers, MTP,
16 rows of 16 tokens (packed documents and padding), the fewest micro-batches each schedule accepts.
Uneven splits (docs/design.md §Pipeline): an explicit [3, 1] under DualPipe (gradients) and the automatic,
cost-balanced [1, 2, 1] on 3 stages under 1F1B (one train step), with the stack stored padded.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import RuntimeConfig, load_config
from dsv3_jax.errors import Dsv3Error, PipelineConfigError
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.pipeline import simulate
from dsv3_jax.pipeline.config import PipelineConfig, validate_pipeline
from dsv3_jax.train.pipeline_step import make_pipeline_grad_fn
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.program import train_program
from dsv3_jax.train.step import denominators, make_loss_fn
from sharding import DEFAULT_RULES, make_mesh

CFG = dataclasses.replace(load_config("tiny"), num_layers=5)     # 1 dense + 4 MoE layers: 4 or 2 per stage
RT = RuntimeConfig(compute_dtype="float32")
# a visible balance loss, fp32 moments, a constant LR from the first step (so the update is not zero), and
# AdamW's eps at 1e-2: the first update is lr·g/(|g|+eps), which with eps=1e-8 turns a gradient entry at
# the rounding level (1e-7 of its leaf's largest) into a ±lr step of random sign; with eps=1e-2 the update
# is a smooth function of the gradient, so it tests the step's plumbing (clip, AdamW, decay, bias, layout)
# at fp32 precision (the gradients themselves are compared in the first test)
T = TrainConfig(steps=10, lr=1e-2, lr_schedule="constant", balance_alpha=0.1, moment_dtype="float32", eps=1e-2)
B, S = 16, 16
MESHES = ("stage=4,data=2", "stage=2,expert=4")
SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe")
GRAD_TOL, LOSS_RTOL = 1e-5, 1e-6


def _micro(schedule: str, pp: int) -> int:
    return 2 * pp if schedule == "dualpipe" else pp


@pytest.fixture(scope="module")
def setup():
    model = DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=RT)
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    # a non-zero router bias, so routing (and its counts) depend on it
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(bias))))
    bias = jax.tree.map(lambda b: 0.02 * jax.random.normal(next(keys), b.shape), bias)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, CFG.vocab_size, (B, S + 1))
    seg = np.ones((B, S), np.int32)
    seg[0, 9:] = 2                      # two packed documents
    seg[3, 11:] = 0                     # padding
    seg[5, 4:] = 2
    pos = np.where(seg == 2, np.arange(S) - np.argmax(seg == 2, axis=1)[:, None], np.arange(S))
    batch = {"inputs": jnp.asarray(tok[:, :-1], jnp.int32), "targets": jnp.asarray(tok[:, 1:], jnp.int32),
             "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos, jnp.int32),
             "loss_mask": jnp.asarray(seg > 0, jnp.int32)}
    denoms = {**denominators(batch, CFG.num_mtp_layers), "mtp_weight": jnp.float32(T.mtp_weight)}
    poison = jnp.zeros((), jnp.float32)
    ref = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, CFG, T), has_aux=True))(
        params, bias, rest, batch, denoms, poison)
    return {"params": params, "bias": bias, "rest": rest, "batch": batch, "denoms": denoms, "poison": poison,
            "ref": ref}


def _close_tree(got, want, tol, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (what, path)
        scale = max(np.abs(a).max(), 1e-30)
        err = np.abs(a - b).max() / scale
        assert err <= tol, f"{what} {jax.tree_util.keystr(path)}: max error {err:.2e} of its largest entry > {tol}"


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipelined_gradients_equal_one_device(setup, mesh_spec, schedule):
    mesh = make_mesh(mesh_spec)
    pp = mesh.shape["stage"]
    p = validate_pipeline(PipelineConfig(schedule, _micro(schedule, pp)), CFG, pp, B,
                          DEFAULT_RULES.batch_shards(mesh))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=RT, mesh=mesh)))
    fn = jax.jit(make_pipeline_grad_fn(graphdef, CFG, RT, T, p, mesh))
    (total, aux), grads = fn(setup["params"], setup["bias"], setup["rest"], setup["batch"], setup["denoms"],
                             setup["poison"])
    (r_total, r_aux), r_grads = setup["ref"]
    for k in ("ce", "mtp", "balance"):
        np.testing.assert_allclose(aux[k], r_aux[k], rtol=LOSS_RTOL, err_msg=k)
        assert float(r_aux[k]) > 0
    np.testing.assert_allclose(total, r_total, rtol=LOSS_RTOL)
    np.testing.assert_array_equal(aux["counts"], r_aux["counts"])
    np.testing.assert_array_equal(aux["mtp_counts"], r_aux["mtp_counts"])
    _close_tree(grads, r_grads, GRAD_TOL, "gradient")
    # every parameter has a gradient (none silently dropped by a stage that does not own it)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    timeline = simulate(schedule, pp=pp, microbatches=p.microbatches)
    assert list(np.asarray(aux["activations"])) == timeline.activations
    # the ticks each device had work in, counted as the step ran, are the simulator's grid's
    ticks = timeline.ticks()
    assert list(np.asarray(aux["busy_ticks"])) == [sum(row[d] is not None for row in ticks) for d in range(pp)]


def _one_step(setup, mesh, pipeline=None):
    """One step of ``train_program`` on ``mesh`` from the setup's state: (program, state before, after, metrics)."""
    prog = train_program(CFG, RT, T, mesh, DEFAULT_RULES, pipeline=pipeline)
    state = {"params": setup["params"], "bias": setup["bias"], "rest": setup["rest"],
             "opt": prog.tx.init(setup["params"]), "applied": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state, prog.shardings)
    new, metrics = prog.step(state, jax.device_put(setup["batch"], prog.batch_sharding), setup["poison"])
    return prog, state, new, metrics


@pytest.fixture(scope="module")
def one_device_step(setup):
    return _one_step(setup, make_mesh(None, devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh_spec,schedule", [("stage=4,data=2", "1f1b"), ("stage=2,expert=4", "dualpipe")])
def test_pipelined_train_step_equals_one_device(setup, one_device_step, mesh_spec, schedule):
    """One AdamW step with the aux-free bias update, through ``train_program`` on each mesh."""
    mesh = make_mesh(mesh_spec)
    pp = mesh.shape["stage"]
    prog, _, new, m = _one_step(setup, mesh, PipelineConfig(schedule, _micro(schedule, pp)))
    _, state0, ref, rm = one_device_step
    # the MoE stack is stored split over stage: each stage group holds its own layers only
    assert new["params"]["moe_layers"]["mlp"]["experts"]["gate"].get_value().sharding.spec[0] == "stage"
    np.testing.assert_allclose(m["loss"], rm["loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(m["grad_norm"], rm["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(m["counts"], rm["counts"])
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(state0["params"])))
    assert moved > 1e-3                                  # the step did update the parameters
    _close_tree(new["params"], ref["params"], 1e-5, "parameter after AdamW")
    _close_tree(new["bias"], ref["bias"], 0.0, "router bias after the aux-free update")
    assert int(new["applied"]) == 1
    assert list(np.asarray(m["activations"])) == simulate(schedule, pp=pp, microbatches=_micro(schedule, pp)).activations


def test_uneven_split_gradients_equal_one_device(setup):
    """An explicit uneven split, [3, 1] MoE layers on ``stage=2,expert=4`` under DualPipe (each device runs
    3 padded rows of both directions): the stack goes in staged (2 x 3 rows, stage 1's two padding rows
    zero) and its gradient comes back staged; in layer order it equals the one-device gradient, the padding
    rows' gradient is exactly zero, and the counts come back [L, E] in layer order."""
    from dsv3_jax.train.program import restack
    mesh = make_mesh("stage=2,expert=4")
    p = validate_pipeline(PipelineConfig("dualpipe", 4, (3, 1)), CFG, 2, B, DEFAULT_RULES.batch_shards(mesh))
    sm = p.stage_map()
    assert (sm.lmax, list(sm.source), list(sm.active.reshape(-1))) == (3, [0, 1, 2, 3, 0, 0], [1, 1, 1, 1, 0, 0])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=RT, mesh=mesh)))
    fn = jax.jit(make_pipeline_grad_fn(graphdef, CFG, RT, T, p, mesh))
    staged = {k: restack(setup[k], sm.source, sm.active.reshape(-1)) for k in ("params", "bias", "rest")}
    (total, aux), grads = fn(staged["params"], staged["bias"], staged["rest"], setup["batch"], setup["denoms"],
                             setup["poison"])
    (r_total, r_aux), r_grads = setup["ref"]
    for k in ("ce", "mtp", "balance"):
        np.testing.assert_allclose(aux[k], r_aux[k], rtol=LOSS_RTOL, err_msg=k)
    np.testing.assert_allclose(total, r_total, rtol=LOSS_RTOL)
    np.testing.assert_array_equal(aux["counts"], r_aux["counts"])
    np.testing.assert_array_equal(aux["mtp_counts"], r_aux["mtp_counts"])
    np.testing.assert_array_equal(np.asarray(aux["stack_counts"])[4:], 0)     # padding rows routed nothing
    # GRAD_TOL of each leaf's largest entry, as for the even splits (measured 8.3e-7 and, in another CI
    # run, 1.06e-6: fp32 sums in another order)
    _close_tree(restack(grads, sm.rows), r_grads, GRAD_TOL, "gradient")
    pad = [np.asarray(g)[4:] for g in jax.tree.leaves(grads["moe_layers"])]
    assert all(np.all(g == 0) for g in pad)


def test_balanced_uneven_train_step_equals_one_device(setup, one_device_step):
    """The automatic split of 4 MoE layers over 3 stages (1F1B on 3 devices) is the cost-balanced [1, 2, 1];
    one AdamW step with the aux-free bias update in the staged layout equals the one-device step in layer
    order, and the padding rows (params, moments, bias) stay zero."""
    mesh = make_mesh("stage=3", devices=jax.devices()[:3])
    prog = train_program(CFG, RT, T, mesh, DEFAULT_RULES, pipeline=PipelineConfig("1f1b", 4))
    assert prog.staged and prog.stage_map.counts == (1, 2, 1)
    state = {"params": setup["params"], "bias": setup["bias"], "rest": setup["rest"],
             "opt": prog.tx.init(setup["params"]), "applied": jnp.zeros((), jnp.int32)}
    state = prog.to_staged(jax.device_put(state, prog.model_shardings))
    gate = state["params"]["moe_layers"]["mlp"]["experts"]["gate"].get_value()
    assert gate.shape[0] == 6 and gate.sharding.spec[0] == "stage"
    new, m = prog.step(state, jax.device_put(setup["batch"], prog.batch_sharding), setup["poison"])
    _, _, ref, rm = one_device_step
    np.testing.assert_allclose(m["loss"], rm["loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(m["grad_norm"], rm["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(m["counts"], rm["counts"])
    np.testing.assert_array_equal(m["bias_absmean"], rm["bias_absmean"])
    model = prog.to_model(new)
    _close_tree(model["params"], ref["params"], 1e-5, "parameter after AdamW")
    _close_tree(model["opt"], ref["opt"], 1e-5, "AdamW moments")
    _close_tree(model["bias"], ref["bias"], 0.0, "router bias after the aux-free update")
    pad = np.flatnonzero(~prog.stage_map.active.reshape(-1))
    for k in ("params", "bias", "opt"):
        for path, x in jax.tree_util.tree_leaves_with_path(new[k]):
            if any(getattr(q, "key", None) == "moe_layers" for q in path):
                assert np.all(np.asarray(x)[pad] == 0), (k, jax.tree_util.keystr(path))


@pytest.mark.parametrize("kw,match", [
    (dict(pp=3, split=(2, 1)), "names 2 stages but the mesh has stage=3"),
    (dict(schedule="dualpipe", pp=2, microbatches=5), "even number"),
    (dict(schedule="1f1b", pp=4, microbatches=2), "fewer than the 4 stages"),
    (dict(schedule="1f1b", pp=2, microbatches=4, batch=12), "not divisible by pipeline.microbatches"),
    (dict(schedule="1f1b", pp=2, microbatches=4, grad_accum=2), "grad_accum"),
    (dict(schedule="pipedream"), "unknown"),
])
def test_config_errors_name_the_fix(kw, match):
    p = PipelineConfig(kw.get("schedule", "1f1b"), kw.get("microbatches", 0), kw.get("split", ()))
    with pytest.raises(PipelineConfigError, match=match) as e:
        validate_pipeline(p, CFG, kw.get("pp", 2), kw.get("batch", 16), 2, kw.get("grad_accum", 1))
    assert isinstance(e.value, Dsv3Error) and "fix:" in str(e.value)


def test_odd_stages_for_dualpipe_named():
    cfg = dataclasses.replace(CFG, num_layers=4)        # 3 MoE layers: 3 stages divide them
    with pytest.raises(PipelineConfigError, match="even number of stages"):
        validate_pipeline(PipelineConfig("dualpipe", 6), cfg, 3, 12, 1)
