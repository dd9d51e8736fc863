"""Checkpoints stay layout-free with pipeline stages (docs/design.md §Pipeline): the train state of a
``stage=2`` mesh (MoE stack split over ``stage``) is the unsplit model's, so a checkpoint written with
stages restores on one device and one written on one device restores into the stage layout — exactly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.checkpoint.orbax_io import Checkpointer
from dsv3_jax.config import RuntimeConfig, load_config
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.pipeline.config import PipelineConfig
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.program import train_program
from sharding import DEFAULT_RULES, make_mesh

CFG = dataclasses.replace(load_config("tiny"), num_layers=5)
RT = RuntimeConfig(compute_dtype="float32")
T = TrainConfig(moment_dtype="float32")


def _program(mesh):
    return train_program(CFG, RT, T, mesh, DEFAULT_RULES, pipeline=PipelineConfig("1f1b", 2))


def _state(prog, seed):
    _, p, b, r = nnx.split(prog.build(), nnx.Param, RouterBias, ...)
    p = jax.tree.map(lambda x: x + seed, p)           # distinct values per direction
    st = {"params": p, "bias": b, "rest": r, "opt": prog.tx.init(p), "applied": jnp.asarray(3, jnp.int32)}
    return jax.device_put(st, prog.shardings)


def _roundtrip(src, dst, directory, seed):
    state = _state(src, seed)
    ck = Checkpointer(directory, CFG, keep=1, async_save=False)
    ck.save(1, (state["params"], state["bias"], state["rest"]), state["opt"], {"applied": 3})
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), dst.abstract,
                            dst.shardings)
    (p, b, r), opt, _ = ck.restore(1, (abstract["params"], abstract["bias"], abstract["rest"]), abstract["opt"])
    for got, want in ((p, state["params"]), (b, state["bias"]), (opt, state["opt"])):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    return p


def test_stage_checkpoint_restores_without_stages_and_back(tmp_path):
    staged = _program(make_mesh("stage=2,expert=4"))
    single = _program(make_mesh(None, devices=jax.devices()[:1]))
    spec = lambda p: p["moe_layers"]["mlp"]["experts"]["gate"].get_value().sharding.spec  # noqa: E731
    p = _roundtrip(staged, single, tmp_path / "a", 0.0)        # written with stages, read on one device
    assert len(p["moe_layers"]["mlp"]["experts"]["gate"].get_value().sharding.device_set) == 1
    p = _roundtrip(single, staged, tmp_path / "b", 1.0)        # written on one device, read into stages
    assert spec(p)[0] == "stage"


def test_stage_axis_splits_the_moe_stack_memory():
    """Per device, the MoE stack's parameters and AdamW moments shrink by the stage count; the leaves every
    stage holds (embedding, dense layers, head, MTP) do not (docs/design.md §Pipeline)."""
    def per_device(prog, moe: bool):
        total = 0
        for k in ("params", "opt"):
            flat_a = jax.tree_util.tree_leaves_with_path(prog.abstract[k])
            flat_s = jax.tree.leaves(prog.shardings[k])
            for (path, a), s in zip(flat_a, flat_s):
                if any(getattr(p, "key", None) == "moe_layers" for p in path) == moe:
                    total += int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
        return total
    staged = _program(make_mesh("stage=2,expert=4"))
    flat = _program(make_mesh("expert=4", devices=jax.devices()[:4]))
    assert per_device(staged, moe=True) * 2 == per_device(flat, moe=True) > 0
    assert per_device(staged, moe=False) == per_device(flat, moe=False) > 0


def test_uneven_stage_checkpoint_is_layout_free(tmp_path):
    """An uneven split (3 MoE layers over stage=2 as [2, 1], stored as 2 x 2 rows with one padding row):
    the trainer's path — staged state → ``to_model`` → checkpoint — writes the [L] stacks in layer order,
    which restore exactly on one device; a one-device checkpoint restored into the model layout and
    ``to_staged`` gives the staged state back, padding rows zero."""
    cfg = dataclasses.replace(CFG, num_layers=4)           # 1 dense + 3 MoE layers
    staged = train_program(cfg, RT, T, make_mesh("stage=2,expert=4"), DEFAULT_RULES,
                           pipeline=PipelineConfig("1f1b", 2, (2, 1)))
    single = train_program(cfg, RT, T, make_mesh(None, devices=jax.devices()[:1]), DEFAULT_RULES)
    assert staged.staged and staged.abstract["params"]["moe_layers"]["attn_norm"]["scale"].shape[0] == 4
    assert staged.model_abstract["params"]["moe_layers"]["attn_norm"]["scale"].shape[0] == 3

    def model_state(prog, seed):
        _, p, b, r = nnx.split(prog.build(), nnx.Param, RouterBias, ...)
        p = jax.tree.map(lambda x: x + seed, p)
        return {"params": p, "bias": b, "rest": r, "opt": prog.tx.init(p)}

    def abstract(prog, model_layout):
        a, s = (prog.model_abstract, prog.model_shardings) if model_layout else (prog.abstract, prog.shardings)
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), a, s)

    def save(directory, st):
        ck = Checkpointer(directory, cfg, keep=1, async_save=False)
        ck.save(1, (st["params"], st["bias"], st["rest"]), st["opt"], {"applied": 3})
        return ck

    def restore(ck, a):
        (p, b, r), opt, _ = ck.restore(1, (a["params"], a["bias"], a["rest"]), a["opt"])
        return {"params": p, "bias": b, "rest": r, "opt": opt}

    def equal(got, want):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # written with the uneven stages (from the staged state, as the trainer does), read on one device
    want = model_state(single, 0.5)
    live = staged.to_staged(jax.device_put(want, {k: staged.model_shardings[k] for k in want}))
    ck = save(tmp_path / "a", staged.to_model(live))
    equal(restore(ck, abstract(single, True)), want)
    # written on one device, read into the uneven stages
    ck = save(tmp_path / "b", jax.device_put(want, {k: single.shardings[k] for k in want}))
    got = staged.to_staged(restore(ck, abstract(staged, True)))
    equal(got, live)
    gate = got["params"]["moe_layers"]["mlp"]["experts"]["gate"].get_value()
    assert gate.sharding.spec[0] == "stage" and np.all(np.asarray(gate)[3] == 0)   # stage 1's padding row
    np.testing.assert_array_equal(np.asarray(gate)[[0, 1, 2]], np.asarray(want["params"]["moe_layers"]["mlp"]
                                                                          ["experts"]["gate"].get_value()))
