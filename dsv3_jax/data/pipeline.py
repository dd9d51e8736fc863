"""The training/validation input pipeline on ``grain`` (dataset API).

    document ids ─ split (train/validation) ─ shard (process) ─ shuffle (seed, per epoch) ─ repeat
      ─ read + encode (FIM, BOS/EOS, vocab check) ─ pack (seq_len + 1) ─ batch ─ {inputs, targets,
        segment_ids, positions, loss_mask}: [B, S] int32 numpy

- Split: documents are ranked by a hash of their index (independent of ``seed``); the first
  ``round(val_fraction · N)`` (at least 1 when ``val_fraction > 0``) are validation, the rest train.
  Disjoint by construction, and stable when ``seed`` or sharding change.
- Sharding: process ``i`` of ``n`` gets ``ids[i::n]`` of its split (before shuffling): disjoint shards that
  cover the split. Defaults to ``jax.process_index()/process_count()``.
- Shuffle: a permutation of the shard per epoch from ``seed`` (``grain`` index shuffle), so train data is
  an endless stream by default; validation is read once, in order. A finite stream's last batch is
  padded with empty rows (``loss_mask`` 0): no data is dropped and every batch has the same shape.
- ``iter(ds)`` gives a ``grain.DatasetIterator``; ``get_state()`` is a small JSON-able dict and
  ``set_state()`` on a fresh iterator of the same config resumes with exactly the same batches.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Optional, Sequence, Union

import grain
import numpy as np

from dsv3_jax.data.fim import encode_document
from dsv3_jax.data.packing import FIELDS, PackIterDataset
from dsv3_jax.data.sources import STDLIB, open_source
from dsv3_jax.data.tokenizer import Tokenizer, load_tokenizer
from dsv3_jax.errors import DataError

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it. ``path``: ``"stdlib"``, a file or a directory."""
    path: str = STDLIB
    tokenizer: Optional[str] = None      # tokenizer.json file or its directory (or pass a Tokenizer)
    glob: str = "**/*"                   # files inside a directory
    text_field: str = "text"             # JSONL field holding the document
    seq_len: int = 256
    batch_size: int = 8
    fim_rate: float = 0.1
    mask_documents: bool = True          # False: no cross-document masking (as in the report)
    add_bos: bool = True
    val_fraction: float = 0.01
    seed: int = 0
    shuffle: bool = True
    read_threads: int = 2                # grain threads reading + tokenizing documents (0: inline)
    prefetch_documents: int = 64

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise DataError(f"DataConfig: {msg}")
        need(self.seq_len >= 1, f"seq_len must be ≥ 1, got {self.seq_len}")
        need(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")
        need(0.0 <= self.fim_rate <= 1.0, f"fim_rate must be in [0, 1], got {self.fim_rate}")
        need(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        need(self.read_threads >= 0 and self.prefetch_documents >= 0, "read_threads/prefetch_documents ≥ 0")


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "") -> None:
    """Raise ``DataError`` (a ``ValueError``) naming the first id outside ``[0, vocab_size)`` (JAX gathers would clamp it)."""
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        tid = int(ids[bad[0]])
        raise DataError(f"token id {tid} is outside the model vocabulary of size {vocab_size}{where}; the "
                         "tokenizer is larger than the model's vocab_size: use a tokenizer that fits or raise "
                         "vocab_size in the model config.")


def split_document_ids(num_documents: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, validation_ids)``, each sorted, disjoint, covering ``range(num_documents)``."""
    n_val = 0
    if val_fraction > 0 and num_documents > 1:
        n_val = min(max(1, round(val_fraction * num_documents)), num_documents - 1)
    key = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8).digest() for i in range(num_documents)]
    order = sorted(range(num_documents), key=key.__getitem__)
    val = np.sort(np.asarray(order[:n_val], np.int64))
    train = np.sort(np.asarray(order[n_val:], np.int64))
    return train, val


def shard_ids(ids: np.ndarray, shard_index: int, shard_count: int) -> np.ndarray:
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, shard_count={shard_count}).")
    return ids[shard_index::shard_count]


def document_ids(num_documents: int, config: DataConfig, split: str = "train", *,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None) -> np.ndarray:
    """The source indices one process reads for ``split`` (before shuffling)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    train, val = split_document_ids(num_documents, config.val_fraction)
    return shard_ids(train if split == "train" else val, shard_index, shard_count)


class _EncodeDocument:
    """``(index in the repeated stream, source index) → token ids``; epoch = index // shard length."""

    def __init__(self, source, tokenizer: Tokenizer, config: DataConfig, vocab_size: int, docs_per_epoch: int):
        self.source, self.tokenizer, self.config = source, tokenizer, config
        self.vocab_size, self.docs_per_epoch = vocab_size, docs_per_epoch

    def __call__(self, index: int, doc_id) -> Optional[np.ndarray]:
        doc_id = int(doc_id)
        text = self.source[doc_id]
        if not text.strip():
            return np.zeros(0, np.int32)  # empty files carry nothing to learn (and not None, which grain
                                          # drops unseen: the packer counts empty documents, see below)
        c = self.config
        ids = encode_document(text, self.tokenizer, fim_rate=c.fim_rate, seed=c.seed, doc_index=doc_id,
                              epoch=index // self.docs_per_epoch, add_bos=c.add_bos)
        describe = getattr(self.source, "describe", None)
        check_token_ids(ids, self.vocab_size, f" (document {doc_id}: {describe(doc_id) if describe else ''})")
        return ids


def _pad_batch(batch: dict, batch_size: int, pad_id: int) -> dict:
    n = batch["inputs"].shape[0]
    if n == batch_size:
        return batch
    out = {}
    for k, v in batch.items():
        fill = np.full((batch_size - n,) + v.shape[1:], pad_id if k in ("inputs", "targets") else 0, v.dtype)
        out[k] = np.concatenate([v, fill])
    return out


def make_dataset(config: DataConfig, tokenizer: Union[Tokenizer, str, None] = None, *, split: str = "train",
                 vocab_size: Optional[int] = None, shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None, num_epochs: Optional[int] = None,
                 source: Optional[Sequence[str]] = None) -> grain.IterDataset:
    """Batches of packed sequences for ``split`` ("train" | "validation") on this process.

    ``tokenizer``: a ``Tokenizer``, a path, or ``None`` for ``config.tokenizer``. ``vocab_size``: the
    model's vocabulary (default: the tokenizer's); ids must be below it. ``num_epochs``: default endless
    for train, 1 for validation. ``source``: a ready ``Sequence[str]`` instead of ``config.path``.
    Elements: dict of ``[batch_size, seq_len]`` int32 arrays (``inputs, targets, segment_ids, positions,
    loss_mask``)."""
    if tokenizer is None:
        if config.tokenizer is None:
            raise DataError("make_dataset needs a tokenizer: pass one or set DataConfig.tokenizer to a "
                             "tokenizer.json (train one with `dsv3 tokenizer train --output DIR`).")
        tokenizer = config.tokenizer
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    for role, tid in tokenizer.special_ids.items():
        if tid >= vocab_size:
            raise DataError(f"token id {tid} of the special token {role!r} is outside the model vocabulary "
                             f"of size {vocab_size}: the tokenizer (vocab {tokenizer.vocab_size}) does not fit "
                             "the model.")
    if source is None:
        source = open_source(config.path, glob=config.glob, text_field=config.text_field)
    ids = document_ids(len(source), config, split, shard_index=shard_index, shard_count=shard_count)
    if len(ids) == 0:
        raise DataError(f"no {split} documents for this shard ({len(source)} documents in {config.path!r}, "
                         f"val_fraction={config.val_fraction}, shard {shard_index}/{shard_count}).")
    train = split == "train"
    ds = grain.MapDataset.source(ids.tolist())
    if train and config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if num_epochs is None:
        num_epochs = None if train else 1
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_EncodeDocument(source, tokenizer, config, vocab_size, len(ids)))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.prefetch_documents))
    # a shuffled epoch holds every document once, so a document with text comes within 2 epochs
    ds = PackIterDataset(ds, config.seq_len, pad_id=tokenizer.pad_id, mask_documents=config.mask_documents,
                         max_empty_run=2 * len(ids), source=f"{len(ids)} {split} documents of {config.path!r}")
    ds = ds.batch(config.batch_size)
    ds = ds.map(functools.partial(_pad_batch, batch_size=config.batch_size, pad_id=tokenizer.pad_id))
    return ds


__all__ = ["DataConfig", "make_dataset", "check_token_ids", "split_document_ids", "shard_ids", "document_ids",
           "FIELDS"]
