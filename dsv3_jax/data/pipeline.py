"""The training/validation input pipeline on ``grain`` (dataset API).

    document ids ─ split (train/validation) ─ shard (process) ─ shuffle (seed, per epoch) ─ repeat
      ─ read + encode (FIM, BOS/EOS, vocab check) ─ pack (seq_len + 1) ─ batch ─ {inputs, targets,
        segment_ids, positions, loss_mask}: [B, S] int32 numpy

- Split: documents are ranked by a hash of their index (independent of ``seed``); the first
  ``round(val_fraction · N)`` (at least 1 when ``val_fraction > 0``) are validation, the rest train.
  Disjoint by construction, and stable when ``seed`` or sharding change.
- Sharding: shard ``i`` of ``n`` gets ``ids[i::n]`` of its split (before shuffling): disjoint shards that
  cover the split. ``make_dataset`` defaults to ``jax.process_index()/process_count()``.
- Virtual shards (what the trainer reads, ``ShardedBatches``): the global batch of ``batch_size`` rows is
  cut into ``data.shards`` equal row groups (default ``gcd(batch_size, 64)``); group ``v`` is always
  filled from virtual shard ``v`` (its own document shard, shuffle and packing). A process reads only the
  shards whose rows its devices hold (``process_shards``), so the global batch at every step is the same
  for any number of processes (1 × 8 devices or 2 × 4 see the same rows in the same places), and the
  saved iterator state (one entry per virtual shard) resumes on any process count.
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
import math
from typing import Any, Iterable, Optional, Sequence, Union

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
    shards: int = 0                      # virtual data shards (row groups of the global batch); 0: gcd(batch_size, 64)

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
        need(self.shards >= 0 and (self.shards == 0 or self.batch_size % self.shards == 0),
             f"shards={self.shards} must divide batch_size={self.batch_size} (fix: pick a divisor, or 0 for "
             "the default gcd(batch_size, 64))")


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


def encoded_documents(ids: np.ndarray, config: DataConfig, split: str, num_epochs: Optional[int],
                      encode) -> grain.IterDataset:
    """The shard's documents ``ids`` as grain reads them: shuffled per epoch when training (``config.shuffle``),
    repeated ``num_epochs`` times (default: forever for ``train``, once otherwise), each passed through
    ``encode(index, document_id)`` on ``config.read_threads`` threads. Shared by pre-training text and SFT
    conversations, so both keep the same order and resumable iterator state."""
    train = split == "train"
    ds = grain.MapDataset.source(ids.tolist())
    if train and config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(num_epochs if num_epochs is not None else (None if train else 1))
    ds = ds.map_with_index(encode)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                prefetch_buffer_size=config.prefetch_documents))


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
        if tid is not None and tid >= vocab_size:
            raise DataError(f"token id {tid} of the special token {role!r} is outside the model vocabulary "
                             f"of size {vocab_size}: the tokenizer (vocab {tokenizer.vocab_size}) does not fit "
                             "the model.")
    if source is None:
        source = open_source(config.path, glob=config.glob, text_field=config.text_field)
    ids = document_ids(len(source), config, split, shard_index=shard_index, shard_count=shard_count)
    if len(ids) == 0:
        raise DataError(f"no {split} documents for this shard ({len(source)} documents in {config.path!r}, "
                         f"val_fraction={config.val_fraction}, shard {shard_index}/{shard_count}).")
    ds = encoded_documents(ids, config, split, num_epochs,
                           _EncodeDocument(source, tokenizer, config, vocab_size, len(ids)))
    # a shuffled epoch holds every document once, so a document with text comes within 2 epochs
    ds = PackIterDataset(ds, config.seq_len, pad_id=tokenizer.pad_id, mask_documents=config.mask_documents,
                         max_empty_run=2 * len(ids), source=f"{len(ids)} {split} documents of {config.path!r}")
    ds = ds.batch(config.batch_size)
    ds = ds.map(functools.partial(_pad_batch, batch_size=config.batch_size, pad_id=tokenizer.pad_id))
    return ds


# ---- the global batch, cut into virtual shards -----------------------------------------------------
MAX_AUTO_SHARDS = 64


def num_shards(config: DataConfig) -> int:
    """The number of virtual data shards: ``config.shards``, or ``gcd(batch_size, 64)`` when 0."""
    return config.shards or math.gcd(config.batch_size, MAX_AUTO_SHARDS)


def process_shards(sharding, config: DataConfig) -> list[int]:
    """The virtual shards whose rows the devices of this process hold when a ``[batch_size, ...]`` batch
    is laid out by ``sharding`` (a ``jax.sharding.Sharding``); ascending, so their rows concatenated are
    this process's rows of the global batch in order (what ``jax.make_array_from_process_local_data``
    takes). ``DataError`` when the process's rows are not whole shards."""
    b, v = config.batch_size, num_shards(config)
    per = b // v
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((b,)).values():
        rows.update(range(*index[0].indices(b)))
    shards = sorted({r // per for r in rows})
    if rows != {r for s in shards for r in range(s * per, (s + 1) * per)}:
        raise DataError(f"this process holds rows {sorted(rows)[:8]}... of the {b}-row batch, which are not whole "
                        f"virtual data shards of {per} rows (data.shards={v}) (fix: set data.shards to a multiple of "
                        "the number of processes that divides data.batch_size).")
    return shards


def empty_rows(n: int, seq_len: int, pad_id: int) -> dict:
    """``n`` padding rows (``loss_mask`` 0: they add nothing to a loss)."""
    return {k: np.full((n, seq_len), pad_id if k in ("inputs", "targets") else 0, np.int32) for k in FIELDS}


class ShardedBatches:
    """This process's rows of the global batch stream: ``data.batch_size / data.shards`` rows from each of
    its virtual ``shards`` (default: all), concatenated in shard order. Each virtual shard is a
    ``make_dataset`` pipeline over document shard ``v`` of ``num_shards``. A finite stream (validation)
    continues with padding rows once a shard ends (every process runs the same number of steps);
    ``exhausted`` says when all of this process's shards have ended.

    ``get_state()`` holds this process's shards (``{"num_shards", "shards": {v: state}}``);
    ``merge_states`` joins the states of all processes; ``set_state`` takes such a merged state and
    restores the shards this process reads, whatever process count wrote it."""

    def __init__(self, config: DataConfig, tokenizer: Union[Tokenizer, str, None] = None, *, split: str = "train",
                 shards: Optional[Iterable[int]] = None, vocab_size: Optional[int] = None,
                 source: Optional[Sequence[str]] = None):
        v = num_shards(config)
        self.num_shards, self.split, self.config = v, split, config
        self.shards = sorted(set(range(v) if shards is None else (int(s) for s in shards)))
        if not self.shards or not 0 <= self.shards[0] <= self.shards[-1] < v:
            raise DataError(f"virtual shards {self.shards} are not a non-empty subset of range({v}).")
        if tokenizer is None:
            tokenizer = config.tokenizer
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(tokenizer)
        if source is None:
            source = open_source(config.path, glob=config.glob, text_field=config.text_field)
        self.rows_per_shard = config.batch_size // v
        n = len(self.shards)
        sub = dataclasses.replace(config, batch_size=self.rows_per_shard, shards=1,
                                  read_threads=-(-config.read_threads // n),
                                  prefetch_documents=-(-config.prefetch_documents // n))
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self._its: dict[int, Any] = {}
        for s in self.shards:
            if len(document_ids(len(source), config, split, shard_index=s, shard_count=v)) == 0:
                if split == "train":
                    raise DataError(f"virtual data shard {s} of {v} has no training documents ({len(source)} "
                                    f"documents in {config.path!r}) (fix: lower data.shards, or use more documents).")
                self._its[s] = None                       # an empty validation shard: padding only
            else:
                self._its[s] = iter(self.shard_dataset(sub, tokenizer, split=split, vocab_size=vocab_size,
                                                       shard_index=s, shard_count=v, source=source))

    # one virtual shard's batches; a subclass packs other records the same way (SFT conversations)
    shard_dataset = staticmethod(make_dataset)

    @property
    def exhausted(self) -> bool:
        return all(it is None for it in self._its.values())

    def __iter__(self) -> "ShardedBatches":
        return self

    def __next__(self) -> dict:
        parts = []
        for s in self.shards:
            it, batch = self._its[s], None
            if it is not None:
                try:
                    batch = next(it)
                except StopIteration:
                    self._its[s] = None
            parts.append(batch if batch is not None else
                         empty_rows(self.rows_per_shard, self.config.seq_len, self.pad_id))
        return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}

    def get_state(self) -> dict:
        return {"num_shards": self.num_shards,
                "shards": {str(s): (it.get_state() if it is not None else None) for s, it in self._its.items()}}

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """One state from the states of every process (each holds its own shards)."""
        shards: dict = {}
        for st in states:
            shards.update(st["shards"])
        return {"num_shards": states[0]["num_shards"], "shards": dict(sorted(shards.items(), key=lambda kv: int(kv[0])))}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "shards" not in state:
            raise DataError("the saved data-iterator state predates virtual data shards, so it cannot place this "
                            "process's rows (fix: train into a fresh train.output_dir).")
        if int(state["num_shards"]) != self.num_shards:
            raise DataError(f"the saved data-iterator state has {state['num_shards']} virtual data shards, this run "
                            f"{self.num_shards} (fix: resume with data.shards={state['num_shards']} and the same "
                            "data.batch_size).")
        missing = [s for s in self.shards if str(s) not in state["shards"]]
        if missing:
            raise DataError(f"the saved data-iterator state lacks virtual shards {missing} (the checkpoint is "
                            "incomplete).")
        for s in self.shards:
            st = state["shards"][str(s)]
            if st is None:
                self._its[s] = None
            elif self._its[s] is not None:
                self._its[s].set_state(st)


__all__ = ["DataConfig", "make_dataset", "check_token_ids", "split_document_ids", "shard_ids", "document_ids",
           "FIELDS", "ShardedBatches", "num_shards", "process_shards", "empty_rows"]
