"""SFT through `dsv3 train` (train.objective=sft): starts from a checkpoint's weights and tokenizer, learns
only the assistant tokens of packed conversations (MTP on the same mask, balancing on), and resumes after
kill -9 exactly as pre-training does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import dsv3_jax as dsv3
from dsv3_jax.data.conversations import SFTBatches, write_conversations
from dsv3_jax.train import Trainer
from dsv3_jax.train.losses import token_ce_sum
from tests.train.test_trainer import _metrics, kill_and_resume


def arithmetic(n: int):
    rng = np.random.default_rng(0)
    return [[{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
            for a, b in rng.integers(0, 50, (n, 2))]


@pytest.fixture(scope="module")
def pretrained(tokenizer_dir, tmp_path_factory):
    """A 2-step tiny pre-training run: its checkpoint (weights + tokenizer) starts every SFT test."""
    from dsv3_jax.train import load_run_config
    from tests.train.conftest import BASE, MODEL
    out = tmp_path_factory.mktemp("pre")
    run = load_run_config("tiny", [*MODEL, *BASE, f"data.tokenizer={tokenizer_dir}", f"train.output_dir={out}",
                                   "steps=2", "checkpoint_every=2"])
    res = Trainer(run, log=lambda *a: None).train()
    data = write_conversations(out / "sft.jsonl", arithmetic(200))
    return Path(res["checkpoint"]), data


def _sft(pre, out: Path, *extra: str) -> list[str]:
    ckpt, data = pre
    from tests.train.conftest import BASE, MODEL
    return [*MODEL, *[b for b in BASE if "tokenizer" not in b], "train.objective=sft", f"train.init_from={ckpt}",
            f"data.path={data}", "train.lr_schedule=finetune", f"train.output_dir={out}", *extra]


def test_sft_starts_from_checkpoint_and_learns_assistant_tokens(pretrained, tmp_path):
    from dsv3_jax.train import load_run_config
    run = load_run_config("tiny", _sft(pretrained, tmp_path / "sft", "steps=6", "checkpoint_every=6",
                                       "eval_every=6", "train.lr=3e-3"))
    tr = Trainer(run, log=lambda *a: None)
    assert tr.run.data.tokenizer.startswith(str(pretrained[0]))   # the checkpoint's tokenizer
    first = next(iter(tr._dataset("train")))
    _, model = dsv3.load_checkpoint(pretrained[0])
    res = tr.train()
    recs = _metrics(tmp_path / "sft")
    # step 1's CE is the starting checkpoint's CE on the assistant tokens of the first batch (fp32, same
    # program up to op order: 1e-5 relative)
    out = model(first["inputs"], segment_ids=first["segment_ids"], positions=first["positions"])
    s, n = token_ce_sum(out.logits, first["targets"], first["loss_mask"])
    assert recs[0]["loss_tokens"] == int(n) == int(first["loss_mask"].sum())
    # the tokens learned: only digits and EOS (assistant answers), nothing of the prompts
    tok = tr.tokenizer
    learned = set(np.asarray(first["targets"])[np.asarray(first["loss_mask"]) == 1].tolist())
    assert tok.eos_id in learned and all(tok.decode([t]).isdigit() for t in learned - {tok.eos_id})
    np.testing.assert_allclose(recs[0]["ce"], float(s / n), rtol=1e-5)
    assert recs[-1]["ce"] < recs[0]["ce"]
    assert recs[-1]["mtp"] > 0 and recs[-1]["balance"] > 0 and recs[-1]["bias_absmean"][0] > 0
    assert "eval_loss" in res


def test_sft_resume_after_kill_is_exact(pretrained, tmp_path):
    cli = lambda out: [sys.executable, "-m", "dsv3_jax.cli", "train", "--config", "tiny", *_sft(  # noqa: E731
        pretrained, out, "steps=12", "checkpoint_every=3", "eval_every=100", "train.async_checkpoint=true")]
    got, want, err, _ = kill_and_resume(cli, tmp_path, 3, 5)
    assert "resumed from" in err
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for s in want:  # bit-identical on the same CPU and config
        assert got[s]["loss"] == want[s]["loss"] and got[s]["grad_norm"] == want[s]["grad_norm"], s
