"""Token-level distillation: the KL term is zero exactly when teacher = student (and positive, with a
gradient, otherwise); a distill run whose teacher is its own starting checkpoint starts at KL 0."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.train import load_run_config
from dsv3_jax.train.distill import DistillTrainer, distill_kl_sum
from tests.train.test_sft import pretrained  # noqa: F401 - the shared tiny pre-trained checkpoint
from tests.train.test_trainer import _metrics


def test_kl_zero_iff_same_distribution():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    s, n = distill_kl_sum(logits, logits, mask)
    assert float(s) == 0.0 and float(n) == 7.0
    g = jax.grad(lambda x: distill_kl_sum(x, logits, mask)[0])(logits)
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-7)   # the minimum: fp32 rounding of p − q
    other = logits + jax.random.normal(jax.random.key(1), logits.shape)
    s2, _ = distill_kl_sum(other, logits, mask)
    # by hand for one token: Σ p_t (log p_t − log p_s)
    p, q = jax.nn.softmax(logits[0, 0]), jax.nn.softmax(other[0, 0])
    one, _ = distill_kl_sum(other[:1, :1], logits[:1, :1], jnp.ones((1, 1)))
    np.testing.assert_allclose(float(one), float((p * (jnp.log(p) - jnp.log(q))).sum()), rtol=1e-5)
    assert float(s2) > 0
    # the shift-invariance of softmax: adding a constant per token changes nothing
    assert float(distill_kl_sum(logits + 3.0, logits, mask)[0]) == pytest.approx(0.0, abs=1e-5)


def test_distill_from_itself_starts_at_zero(pretrained, tmp_path):  # noqa: F811
    from tests.train.conftest import BASE, MODEL
    ckpt, _ = pretrained
    base = [*MODEL, *[b for b in BASE if "tokenizer" not in b], "train.objective=distill", f"train.teacher={ckpt}",
            f"train.output_dir={tmp_path / 'd'}", "steps=3", "checkpoint_every=3", "eval_every=3"]
    run = load_run_config("tiny", [*base, f"train.init_from={ckpt}"])
    res = DistillTrainer(run, log=lambda *a: None).train()
    recs = _metrics(tmp_path / "d")
    # the student is the teacher at step 1: KL 0 up to fp32 rounding of two programs (1e-6 nats)
    assert recs[0]["loss"] < 1e-3 and abs(recs[0]["loss"] - 1e-4 * recs[0]["balance"]) < 1e-6
    assert recs[-1]["step"] == 3 and res["step"] == 3
    with pytest.raises(ConfigError, match="vocabulary"):
        DistillTrainer(load_run_config("tiny", [*base, "model.vocab_size=640"]), log=lambda *a: None)
