"""Shared tiny training setup: one tokenizer for the session, one small run config (same shapes in
every test, so the train step compiles once and the persistent compilation cache serves the rest)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dsv3_jax.train import load_run_config

MODEL = ["num_layers=2", "first_k_dense=1", "remat=none"]
BASE = ["data.seq_len=32", "data.batch_size=8", "data.val_fraction=0.05", "train.lr=3e-3", "train.progress=false",
        "train.tensorboard=false", "train.eval_batches=1", "train.async_checkpoint=true"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from dsv3_jax.data import iter_documents, stdlib_source, train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    src = stdlib_source()
    train_tokenizer(iter_documents(src, range(40)), 320).save(d)
    return d


@pytest.fixture
def make_run(tokenizer_dir, tmp_path):
    def make(*overrides: str, out: Path | None = None):
        out = out or tmp_path / "run"
        return load_run_config("tiny", [*MODEL, *BASE, f"data.tokenizer={tokenizer_dir}",
                                        f"train.output_dir={out}", *overrides])
    return make
