"""One checkpoint layout: the trainer's ``Checkpointer`` and the converter write the same ``params/``
tree, ``load_checkpoint`` reads both (without Orbax warnings), and a training checkpoint appears only
once complete."""
from __future__ import annotations

import json
import logging

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.checkpoint import convert, mapping, orbax_io
from dsv3_jax.checkpoint.safetensors_io import save_file
from dsv3_jax.model.layers import RouterBias
from tests.model.test_parity import BASE

CFG = dsv3.load_config({**BASE, "num_mtp_layers": 1})


def _split(model):
    _, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    return params, bias, rest


@pytest.fixture(scope="module")
def model():
    m = dsv3.DeepSeekV3(CFG, rngs=nnx.Rngs(3))
    # a non-zero router bias, as after training with the aux-loss-free update
    for layer in (m.moe_layers, m.mtp[0].block):
        b = layer.mlp.router.bias
        b.set_value(jax.random.normal(jax.random.key(1), b.get_value().shape) * 0.01)
    return m


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """A training checkpoint of ``model`` written by the trainer's Checkpointer (with AdamW state)."""
    d = tmp_path_factory.mktemp("run") / "checkpoints"
    params, bias, rest = _split(model)
    opt = optax.adamw(1e-3).init(params)
    ck = orbax_io.Checkpointer(d, CFG, keep=2, async_save=True)
    ck.save(5, (params, bias, rest), opt, {"step": 5, "applied": 5, "seed": 0, "data_state": {"i": 5}})
    ck.close()
    return d / "5", opt


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    """The same weights exported to HF safetensors and converted back (float32)."""
    root = tmp_path_factory.mktemp("conv")
    hf = root / "hf"
    hf.mkdir()
    save_file(dict(mapping.params_to_hf(mapping.model_params(model), CFG)), hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(CFG.to_hf()))
    convert.hf_to_orbax(hf, root / "ckpt", dtype="float32", progress=False)
    return root / "ckpt"


def _tree(path) -> dict:
    md = orbax_io.flatten(dict(orbax_io.ocp().metadata(path / orbax_io.PARAMS_DIR).metadata))
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in md.items()}


def test_training_and_converted_checkpoints_share_one_layout(trained, converted, model):
    ckpt, _ = trained
    a, b = _tree(ckpt), _tree(converted)
    assert a == b  # same keys (one per layer), shapes and dtypes
    assert ("moe_layers", "1", "mlp", "experts", "gate") in a and ("mtp", "0", "block", "0", "attn_norm", "scale") in a
    ma, mb = orbax_io.read_marker(ckpt), orbax_io.read_marker(converted)
    assert ma["layout"] == mb["layout"] == "per_layer"
    assert {**ma["config"], "name": ""} == {**mb["config"], "name": ""}  # the name is the source directory's
    assert {orbax_io.MARKER, orbax_io.PARAMS_DIR} <= {p.name for p in ckpt.iterdir()} & {p.name for p in converted.iterdir()}
    # both load, to the same weights (the router bias included)
    want = mapping.model_params(model)
    for path in (ckpt, converted):
        cfg, m = dsv3.load_checkpoint(path)
        assert cfg.replace(name=CFG.name) == CFG
        got = mapping.model_params(m)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{path.name}: {k}")


def test_loading_emits_no_orbax_warnings(trained, converted, caplog):
    from absl import logging as absl_logging
    with caplog.at_level(logging.WARNING):
        absl_logging.warning("probe")  # absl warnings do reach caplog
    assert any("probe" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for path in (trained[0], converted):
            dsv3.load_checkpoint(path)
            orbax_io.read_params(path, [("embed",)])
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not bad, bad


def test_resume_restores_optimizer_and_train_state(trained, model):
    ckpt, opt = trained
    params, bias, rest = _split(model)
    ck = orbax_io.Checkpointer(ckpt.parent, CFG, keep=2, async_save=True)
    assert ck.latest_step() == 5
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            ((params, bias, rest), opt))
    (p, b, r), o, meta = ck.restore(5, *abstract)
    assert meta == {"step": 5, "applied": 5, "seed": 0, "data_state": {"i": 5}}
    for x, y in zip(jax.tree.leaves((params, bias, rest, opt)), jax.tree.leaves((p, b, r, o))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(o) == jax.tree.structure(opt)


def test_step_appears_only_complete_and_keep_n(model, tmp_path, monkeypatch):
    params, bias, rest = _split(model)
    opt = optax.sgd(1e-3).init(params)
    d = tmp_path / "checkpoints"
    ck = orbax_io.Checkpointer(d, CFG, keep=2, async_save=False)
    for step in (1, 2, 3):
        ck.save(step, (params, bias, rest), opt, {"step": step})
    assert ck.steps() == [2, 3]  # keep=2
    # a write that fails midway (e.g. disk full) leaves no step directory and no temporary one
    real = orbax_io.write_marker

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(orbax_io, "write_marker", broken)
    with pytest.raises(OSError):
        ck.save(4, (params, bias, rest), opt, {"step": 4})
    monkeypatch.setattr(orbax_io, "write_marker", real)
    assert sorted(p.name for p in d.iterdir()) == ["2", "3"]
    # a killed write's temporary directory is removed by the next Checkpointer
    (d / ".7.tmp-deadbeef" / "params").mkdir(parents=True)
    ck2 = orbax_io.Checkpointer(d, CFG, keep=2, async_save=True)
    assert sorted(p.name for p in d.iterdir()) == ["2", "3"] and ck2.latest_step() == 3


def test_old_stacked_training_layout_is_refused_clearly(trained, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(trained[0], old)
    meta = json.loads((old / orbax_io.MARKER).read_text())
    (old / orbax_io.MARKER).write_text(json.dumps({**meta, "version": 1, "layout": "stacked"}))
    with pytest.raises(dsv3.CheckpointError, match="layout 'stacked'.*fix: train into a fresh"):
        dsv3.load_checkpoint(old)
