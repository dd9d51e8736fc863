"""GRPO: the objective and its gradient against a hand-computed example, group advantages, a policy update
on the tiny model that favours the rewarded sample, and rewards that cannot hang a step."""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.errors import ConfigError
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.train import rewards
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.grpo import group_advantages, grpo_objective, k3_kl, make_grpo_step, make_logprob_fn
from dsv3_jax.train.grpo_trainer import rollout_batch
from dsv3_jax.train.optim import lr_schedule, make_optimizer
from tests.train.test_sft import pretrained  # noqa: F401 - the shared tiny pre-trained checkpoint

EPS, BETA = 0.2, 0.1


def test_group_advantages_by_hand():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 0.0]])
    a = np.asarray(group_advantages(r))
    # group 1: mean 0.5, population std 0.5; group 2: all equal → 0; group 3: mean 0.75, std √(27/16)
    np.testing.assert_allclose(a[0], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(a[1], 0.0)
    sd = math.sqrt(27 / 16)
    np.testing.assert_allclose(a[2], (np.array([3, 0, 0, 0]) - 0.75) / (sd + 1e-4), rtol=1e-6)


def test_objective_and_gradient_by_hand():
    # five sequences, two tokens each; log-ratio d = logp − old_logp chosen to hit every case of the clip
    d = np.array([[0.5, 0.5],     # A>0, ρ=1.65 > 1+ε: clipped at 1.2, no gradient
                  [-0.5, -0.5],   # A<0, ρ=0.61 < 1−ε: clipped at 0.8, no gradient
                  [0.1, 0.1],     # A>0, ρ inside: ρA
                  [0.5, 0.5],     # A<0, ρ > 1+ε: the min keeps the unclipped ρA (pessimistic side)
                  [-0.5, 0.3]])   # A>0, ρ < 1−ε: unclipped ρA; second token masked out
    adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0])
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]])
    old = np.full((5, 2), -2.0)
    ref = np.array([[-2.0, -1.5]] * 5)
    logp = old + d
    loss, parts = grpo_objective(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                 jnp.asarray(mask), EPS, BETA)
    grad = np.asarray(jax.grad(lambda lp: grpo_objective(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                                         jnp.asarray(mask), EPS, BETA)[0])(jnp.asarray(logp)))
    # by hand, token by token
    want_loss, want_grad, kls = 0.0, np.zeros((5, 2)), []
    for i in range(5):
        n = mask[i].sum()
        for t in range(2):
            if not mask[i, t]:
                continue
            rho, A = math.exp(d[i, t]), adv[i]
            clipped = (A > 0 and rho > 1 + EPS) or (A < 0 and rho < 1 - EPS)
            surr = (min(max(rho, 1 - EPS), 1 + EPS) if clipped else rho) * A
            dsurr = 0.0 if clipped else rho * A
            q = ref[i, t] - logp[i, t]
            kl = math.exp(q) - q - 1           # k3
            dkl = 1 - math.exp(q)              # d kl / d logp
            kls.append((i, kl / n))
            want_loss -= (surr - BETA * kl) / n / 5
            want_grad[i, t] = -(dsurr - BETA * dkl) / n / 5
    # fp32 arithmetic on O(1) values: 1e-6 relative
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    # the clipped sequences get only the KL part of the gradient
    for i in (0, 1):
        q = ref[i] - logp[i]
        np.testing.assert_allclose(grad[i], BETA * (1 - np.exp(q)) / 2 / 5, rtol=1e-5)
    np.testing.assert_allclose(float(parts["kl"]), sum(k for _, k in kls) / 5, rtol=1e-6)
    assert float(parts["clip_frac"]) == pytest.approx(4 / 9)   # 2 tokens each of sequences 0 and 1, of 9
    # k3 is zero exactly when the policy equals the reference, positive otherwise
    assert float(k3_kl(jnp.float32(-1.0), jnp.float32(-1.0))) == 0.0
    assert float(k3_kl(jnp.float32(-1.0), jnp.float32(-2.0))) > 0


def test_grpo_step_raises_logprob_of_rewarded_sample():
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1"])
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    t = TrainConfig(steps=10, lr=3e-3, lr_schedule="constant", weight_decay=0.0, moment_dtype="float32")
    tx = make_optimizer(t, params)
    state = {"params": params, "bias": bias, "rest": rest, "opt": tx.init(params), "applied": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, 500, 6).tolist() for _ in range(2)]
    comps = [rng.integers(8, 500, 5).tolist() for _ in range(4)]
    rows = [prompts[0], prompts[0], prompts[1], prompts[1]]
    batch = rollout_batch(rows, comps, 16)
    rw = jnp.array([[1.0, 0.0], [0.0, 1.0]])     # sample 0 of prompt 0 and sample 1 of prompt 1 are right
    batch["adv"] = np.asarray(group_advantages(rw)).reshape(-1)
    logprob = jax.jit(make_logprob_fn(graphdef))
    before = logprob(params, bias, rest, batch)
    batch["old_logp"] = batch["ref_logp"] = before
    step = jax.jit(make_grpo_step(graphdef, tx, lr_schedule(t), EPS, BETA))
    new, m = step(state, batch)
    assert bool(m["finite"]) and float(m["kl"]) == 0.0 and float(m["ratio_mean"]) == pytest.approx(1.0)
    after = logprob(new["params"], bias, rest, batch)
    seq = lambda lp: (np.asarray(lp) * batch["mask"]).sum(-1)  # noqa: E731 - log π(completion | prompt)
    gain = seq(after) - seq(before)
    assert gain[0] > 0 and gain[3] > 0 and gain[1] < 0 and gain[2] < 0, gain
    assert len(m["imbalance"]) == cfg.num_moe_layers


def test_rollout_rows_mask_the_completion():
    b = rollout_batch([[0, 6, 9, 7], [0, 6, 7]], [[11, 12, 1], [13]], 8)
    assert b["inputs"][0].tolist() == [0, 6, 9, 7, 11, 12, 1, 0]
    assert b["targets"][0][b["mask"][0] == 1].tolist() == [11, 12, 1]
    assert b["targets"][1][b["mask"][1] == 1].tolist() == [13]
    assert b["segment_ids"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ConfigError, match="data.seq_len"):
        rollout_batch([[0] * 8], [[1, 2]], 8)


def _hang(prompt, completion, answer):
    end = time.perf_counter() + 2.0   # busy far past the limit (bounded, so the abandoned thread ends)
    while time.perf_counter() < end:
        pass
    return 1.0


def _sleep(prompt, completion, answer):
    time.sleep(2.0)
    return 1.0


def _boom(prompt, completion, answer):
    raise RuntimeError("bad reward")


def test_rewards_that_hang_or_fail_cannot_hang_a_step(monkeypatch):
    items = [("p", "42", "42"), ("p", "41", "42")]
    t0 = time.perf_counter()
    for fn in (_hang, _sleep, _boom):
        got, failed = rewards.score(fn, items, timeout=0.2)
        assert got == [0.0, 0.0] and failed == 2     # a late answer is not used
    assert time.perf_counter() - t0 < 4.0         # 4 time-outs of 0.2 s (+ thread start-up, a busy GIL)
    assert rewards.score(rewards.exact_answer, items, timeout=1.0) == ([1.0, 0.0], 0)
    # code is run in a subprocess that is killed at its limit
    monkeypatch.setattr(rewards, "UNIT_TEST_SECONDS", 1.0)
    t0 = time.perf_counter()
    assert rewards.unit_test("", "while True:\n    pass", "assert True") == 0.0
    assert time.perf_counter() - t0 < 5.0
    assert rewards.unit_test("", "def add(a, b):\n    return a + b", "assert add(2, 3) == 5") == 1.0
    assert rewards.unit_test("", "def add(a, b):\n    return a - b", "assert add(2, 3) == 5") == 0.0


def test_load_reward():
    both = rewards.load_reward("dsv3_jax.train.rewards:exact_answer, dsv3_jax.train.rewards:format_check")
    assert both("", "42", "42") == pytest.approx(1.1) and both("", "x", "42") == 0.0
    for bad, needle in (("nomodule", "module:callable"), ("dsv3_jax.train.rewards:nope", "cannot load"),
                        ("dsv3_jax.train.rewards:INTEGER", "not callable")):
        with pytest.raises(ConfigError, match=needle):
            rewards.load_reward(bad)


def test_grpo_run_resumes_after_kill_exactly(pretrained, tmp_path):  # noqa: F811
    """`dsv3 train` with train.objective=grpo, killed with SIGKILL after its first checkpoint and run again,
    logs the same steps with the same numbers as an uninterrupted run (prompts and sampling keys are
    functions of the step; the policy and optimizer come from the checkpoint)."""
    import json
    import sys

    from tests.train.conftest import MODEL
    from tests.train.test_trainer import kill_and_resume
    ckpt, _ = pretrained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{a}="}],
                                           "answer": str(2 * a)}) + "\n" for a in range(1, 10)))
    cli = lambda out: [sys.executable, "-m", "dsv3_jax.cli", "train", "--config", "tiny", *MODEL,  # noqa: E731
                       "train.objective=grpo", f"train.init_from={ckpt}", f"data.path={prompts}",
                       "data.seq_len=24", "data.batch_size=2", "data.val_fraction=0", "train.group_size=3",
                       "train.max_new_tokens=3", "train.policy_updates=2", "train.lr=3e-3", "train.steps=4",
                       "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false",
                       f"train.output_dir={out}",
                       "train.reward=dsv3_jax.train.rewards:exact_answer,dsv3_jax.train.rewards:format_check"]
    got, want, err, _ = kill_and_resume(cli, tmp_path, 2, 2)
    assert "resumed from" in err
    assert sorted(got) == sorted(want) == list(range(1, 5))
    for s in want:
        for k in ("loss", "reward", "kl", "grad_norm", "response_len", "pass_rate"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])
    last = want[4]
    assert len(last["imbalance"]) == 1 and len(last["expert_load"][0]) == 16 and last["reward_failures"] == 0
    assert 1 <= last["response_len"] <= 3 and 0 <= last["pass_rate"] <= 1
