"""Long-context stages (docs/design.md §Long-context stages): a stage restores the pre-training
checkpoint under a new YaRN config, only RoPE fields may change, and the logits at positions inside
the pre-training length stay close to the pre-trained model's."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.checkpoint.orbax_io import Checkpointer
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.train import load_run_config
from dsv3_jax.train.stages import load_stages
from dsv3_jax.train.trainer import Trainer

PRE = ["num_layers=2", "first_k_dense=1", "rope_scaling.type=none", "max_position_embeddings=64", "init_std=0.05"]
YARN = ["rope_scaling.type=yarn", "rope_scaling.factor=4", "rope_scaling.original_max_position_embeddings=64",
        "max_position_embeddings=256"]
RUN = ["remat=none", "data.seq_len=256", "data.batch_size=2", "train.progress=false", "train.tensorboard=false",
       "train.eval_batches=0", "lr_schedule=constant", "batch_ramp_start=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pre-training checkpoint without YaRN (context 64), written without training (init std 0.05, so
    that attention is far from uniform and the RoPE change shows in the logits)."""
    from dsv3_jax.data import iter_documents, stdlib_source, train_tokenizer
    d = tmp_path_factory.mktemp("pre")
    train_tokenizer(iter_documents(stdlib_source(), range(30)), 320).save(d / "tok")
    cfg = dsv3.load_config("tiny", PRE)
    _, params, bias, rest = nnx.split(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(3)), nnx.Param, RouterBias, ...)
    bias = jax.tree.map(lambda b: b + 0.01, bias)       # a non-zero router bias must come along too
    ck = Checkpointer(d / "run" / "checkpoints", cfg, keep=1, async_save=False, tokenizer_file=d / "tok" / "tokenizer.json")
    ck.save(7, (params, bias, rest), {}, {"step": 7})
    ck.close()
    return d / "run" / "checkpoints" / "7"


def _stage(pre: Path, out: Path, *extra: str):
    return load_run_config("tiny", [*PRE, *YARN, *RUN, f"train.output_dir={out}", f"train.init_from={pre}", *extra])


def test_extension_stage_restores_pretraining_weights_with_yarn(pretrained, tmp_path):
    """The stage's Trainer restores every stored array exactly (router bias included) into the YaRN
    model. Its logits at positions < 64 (the pre-training length) vs the pre-trained model's, on 2×64
    random tokens: mean KL(pre ‖ yarn) ≤ 1e-3 nats (measured 1.0e-4), mean |Δlogit| ≤ 0.03 (measured
    0.009, logit std 0.40), max |Δlogit| ≤ 0.5 (measured 0.21), top-1 agreement ≥ 90% (measured 97%),
    position 0 identical. Close, not identical, because YaRN (a) divides by the factor the frequencies
    of the RoPE dimensions whose wavelength exceeds the original length (docs/architecture.md §3), so
    inside it those dimensions rotate less, and (b) scales the softmax by mscale² = (0.1·ln 4 + 1)² ≈ 1.29.
    The high-frequency dimensions, which carry the local order, are untouched; at position 0 nothing
    rotates and a single key makes the softmax scale irrelevant."""
    tr = Trainer(_stage(pretrained, tmp_path / "stage", "train.init_rope=true"), log=lambda m: None)
    assert tr.init_from == pretrained.resolve()
    tr.load_init_weights()
    _, pre_model = dsv3.load_checkpoint(pretrained)
    _, pre_params, pre_bias, _ = nnx.split(pre_model, nnx.Param, RouterBias, ...)
    for a, b in zip(jax.tree.leaves(tr.state["params"]) + jax.tree.leaves(tr.state["bias"]),
                    jax.tree.leaves(pre_params) + jax.tree.leaves(pre_bias)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tr.run.model.rope_scaling.type == "yarn" and tr.run.model.max_position_embeddings == 256
    yarn_model = dsv3.DeepSeekV3(tr.run.model, rngs=nnx.Rngs(0))
    nnx.update(yarn_model, nnx.state(pre_model))
    tokens = np.random.default_rng(0).integers(8, 320, (2, 64)).astype(np.int32)
    lp = np.asarray(pre_model(tokens).logits)
    ly = np.asarray(yarn_model(tokens).logits)
    p, y = jax.nn.log_softmax(lp, -1), jax.nn.log_softmax(ly, -1)
    kl = float((np.exp(p) * (p - y)).sum(-1).mean())
    assert 1e-7 < kl <= 1e-3, kl                                   # changed, but little
    assert np.abs(lp - ly).mean() <= 0.03 and np.abs(lp - ly).max() <= 0.5 and lp.std() > 0.3
    assert (lp.argmax(-1) == ly.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(lp[:, 0], ly[:, 0], atol=1e-5)     # position 0: no rotation either way


def test_init_from_accepts_only_a_rope_change(pretrained, tmp_path):
    with pytest.raises(dsv3.ConfigError, match="train.init_rope=true"):
        Trainer(_stage(pretrained, tmp_path / "a"), log=lambda m: None)
    with pytest.raises(dsv3.ConfigError, match="model.num_heads"):
        Trainer(_stage(pretrained, tmp_path / "b", "train.init_rope=true", "model.num_heads=2"), log=lambda m: None)
    with pytest.raises(dsv3.ConfigError, match="only applies with train.init_from"):
        load_run_config("tiny", ["train.init_rope=true"])


def test_demo_long_stages():
    """configs/demo_long.yaml: two stages, YaRN from the first on, each continuing the one before."""
    s1, s2 = load_stages("configs/demo_long.yaml")
    demo = load_run_config("demo")
    assert demo.model.rope_scaling.type == "none" and demo.data.seq_len == demo.model.max_position_embeddings == 256
    for s in (s1, s2):
        assert s.model.rope_scaling.type == "yarn" and s.model.rope_scaling.original_max_position_embeddings == 256
        assert s.model.max_position_embeddings == 4096 and s.train.init_rope and s.train.lr_schedule == "constant"
        assert s.train.lr == pytest.approx(demo.train.lr * 7.3e-6 / 2.2e-4, rel=1e-3)
    assert (s1.data.seq_len, s2.data.seq_len) == (1024, 4096)
    assert s1.train.init_from == "runs/demo/checkpoints/300"
    assert s2.train.init_from == str(Path(s1.train.output_dir) / "checkpoints" / str(s1.train.steps))
    s1b, s2b = load_stages("configs/demo_long.yaml", ["steps=3", "train.init_from=/x/ckpt"])
    assert (s1b.train.steps, s2b.train.steps, s1b.train.init_from) == (3, 3, "/x/ckpt")
    assert s2b.train.init_from.endswith("checkpoints/3")
