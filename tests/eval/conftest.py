"""A tiny checkpoint for the eval tests, written without training (a randomly initialised model,
the run's tokenizer, a train_state.json naming the data split, and an EMA item), so that no train
step has to compile."""
from __future__ import annotations

from pathlib import Path

import jax
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.checkpoint.orbax_io import Checkpointer
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.train.ema import flat_host

MODEL = ["num_layers=2", "first_k_dense=1", "max_position_embeddings=512"]
DATA = {"path": "stdlib", "val_fraction": 0.05}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from dsv3_jax.data import iter_documents, stdlib_source, train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_documents(stdlib_source(), range(40)), 320).save(d)
    return d


def write_checkpoint(directory: Path, cfg, tokenizer_dir: Path, *, ema_scale: float | None = 0.5, seed: int = 0) -> Path:
    """``directory/checkpoints/1``: ``cfg``'s model at init ``seed``; ``ema/`` = the parameters × ``ema_scale``."""
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(seed))
    _, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    ema = None if ema_scale is None else {k: v * ema_scale for k, v in flat_host(jax.device_get(params)).items()}
    ck = Checkpointer(directory / "checkpoints", cfg, keep=1, async_save=False,
                      tokenizer_file=tokenizer_dir / "tokenizer.json")
    ck.save(1, (params, bias, rest), {}, {"step": 1, "config": {"data": DATA}}, ema=ema)
    ck.close()
    return directory / "checkpoints" / "1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    cfg = dsv3.load_config("tiny", MODEL)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, tokenizer_dir)


@pytest.fixture
def checkpoint_writer(tokenizer_dir):
    """``write(directory, **kw)``: a tiny checkpoint like ``tiny_checkpoint`` (see ``write_checkpoint``)."""
    return lambda directory, **kw: write_checkpoint(directory, dsv3.load_config("tiny", MODEL), tokenizer_dir, **kw)
