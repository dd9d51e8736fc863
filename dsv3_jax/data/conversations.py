"""SFT data: JSONL conversations → DeepSeek-V3's chat template → packed rows whose loss mask covers only
the assistant's tokens (docs/design.md §Post-training).

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}          one conversation per line

- Each conversation is encoded whole (``Tokenizer.encode_chat``) and cut to ``seq_len + 1`` tokens, then
  shifted into ``inputs``/``targets``; the target mask is the chat mask shifted by one, so a row never
  learns a user turn, a system prompt or the turn markers, and never a token of another conversation.
- Conversations are never split across rows: ``grain``'s first-fit packing places whole conversations in
  ``batch_size`` bins and pads the rest, giving ``segment_ids`` (1, 2, … per conversation; 0 padding) and
  per-conversation ``positions``, so attention stays inside a conversation.
- Split, virtual shards, shuffling and checkpointable iterator state are the pre-training pipeline's
  (``ShardedBatches``), so an SFT run resumes after ``kill -9`` with exactly the batches it would have seen.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from dsv3_jax.data.pipeline import (DataConfig, ShardedBatches, _pad_batch, check_token_ids, document_ids,
                                    encoded_documents)
from dsv3_jax.data.sources import JSONL_SUFFIXES, list_files
from dsv3_jax.data.tokenizer import Tokenizer, load_tokenizer
from dsv3_jax.errors import DataError, DataNotFoundError

MESSAGES = "messages"


class ConversationSource(Sequence[list]):
    """The conversations of JSONL files, one per non-blank line (``{"messages": [...]}``); parsed on access,
    with errors naming the file and line."""

    def __init__(self, files: Sequence[Union[str, os.PathLike]]):
        self.lines: list[tuple[Path, int, str]] = []
        for f in map(Path, files):
            with open(f, encoding="utf-8") as fh:
                self.lines += [(f, i + 1, line) for i, line in enumerate(fh) if line.strip()]
        if not self.lines:
            raise DataError(f"no conversations in {', '.join(map(str, files))} (fix: write one JSON object "
                            '{"messages": [...]} per line).')

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> list:  # type: ignore[override]
        return self.record(index)[MESSAGES]

    def record(self, index: int) -> dict:
        """The whole JSON object of conversation ``index`` (GRPO prompts carry an ``"answer"`` beside it)."""
        f, n, line = self.lines[index]
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{n}: not valid JSON ({e.msg}) (fix: one JSON object per line).") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(MESSAGES), list):
            raise DataError(f"{f}:{n}: expected an object with a {MESSAGES!r} list (fix: "
                            '{"messages": [{"role": "user", "content": "..."}, ...]}).')
        return obj

    def describe(self, index: int) -> str:
        f, n, _ = self.lines[index]
        return f"{f}:{n}"


def open_conversations(path: Union[str, os.PathLike], glob: str = "**/*") -> ConversationSource:
    """A ``.jsonl`` file, or the ``.jsonl``/``.ndjson`` files of a directory (``glob``)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"SFT data {path} does not exist (fix: set data.path to a JSONL file of "
                                "conversations, or a directory of them).")
    files = [p] if p.is_file() else [f for f in list_files(p, glob) if f.suffix in JSONL_SUFFIXES]
    if not files or any(f.suffix not in JSONL_SUFFIXES for f in files):
        raise DataError(f"SFT data {path}: expected .jsonl files of conversations (fix: one "
                        '{"messages": [...]} object per line, in files named *.jsonl).')
    return ConversationSource(files)


class _EncodeConversation:
    """``(index, source index) → {inputs, targets, loss_mask}`` of one conversation (cut to a row)."""

    def __init__(self, source: ConversationSource, tokenizer: Tokenizer, seq_len: int, vocab_size: int):
        self.source, self.tokenizer, self.seq_len, self.vocab_size = source, tokenizer, seq_len, vocab_size

    def __call__(self, index: int, doc_id) -> dict:
        doc_id = int(doc_id)
        try:
            ids, mask = self.tokenizer.encode_chat(self.source[doc_id])
        except DataError as e:
            raise DataError(f"{self.source.describe(doc_id)}: {e}") from None
        ids = np.asarray(ids[:self.seq_len + 1], np.int32)
        mask = np.asarray(mask[:self.seq_len + 1], np.int32)
        check_token_ids(ids, self.vocab_size, f" (conversation {self.source.describe(doc_id)})")
        return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def _row(packed: dict) -> dict:
    return {"inputs": packed["inputs"], "targets": packed["targets"], "segment_ids": packed["inputs_segment_ids"],
            "positions": packed["inputs_positions"], "loss_mask": packed["loss_mask"]}


def make_sft_dataset(config: DataConfig, tokenizer: Union[Tokenizer, str, None] = None, *, split: str = "train",
                     vocab_size: Optional[int] = None, shard_index: Optional[int] = None,
                     shard_count: Optional[int] = None, num_epochs: Optional[int] = None,
                     source: Optional[ConversationSource] = None) -> grain.IterDataset:
    """Batches of packed conversations (the ``make_dataset`` contract: dicts of ``[batch_size, seq_len]``
    int32 arrays ``inputs, targets, segment_ids, positions, loss_mask``), ``loss_mask`` 1 only on targets
    that an assistant turn produced."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer or config.tokenizer)
    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    source = source if source is not None else open_conversations(config.path, config.glob)
    ids = document_ids(len(source), config, split, shard_index=shard_index, shard_count=shard_count)
    if len(ids) == 0:
        raise DataError(f"no {split} conversations for this shard ({len(source)} in {config.path!r}, "
                        f"val_fraction={config.val_fraction}).")
    ds = encoded_documents(ids, config, split, num_epochs,
                           _EncodeConversation(source, tokenizer, config.seq_len, vocab_size))
    S = config.seq_len
    ds = FirstFitPackIterDataset(ds, length_struct={"inputs": S, "targets": S, "loss_mask": S},
                                 num_packing_bins=config.batch_size, shuffle_bins=False)
    ds = ds.map(_row).batch(config.batch_size)
    return ds.map(lambda b: _pad_batch(b, config.batch_size, tokenizer.pad_id))


class SFTBatches(ShardedBatches):
    """``ShardedBatches`` over conversations: the same virtual shards, global batch and resumable state."""
    shard_dataset = staticmethod(make_sft_dataset)

    def __init__(self, config: DataConfig, tokenizer: Union[Tokenizer, str, None] = None, *, split: str = "train",
                 shards=None, vocab_size: Optional[int] = None, source: Optional[ConversationSource] = None):
        if source is None:
            source = open_conversations(config.path, config.glob)
        super().__init__(config, tokenizer, split=split, shards=shards, vocab_size=vocab_size, source=source)


def write_conversations(path: Union[str, os.PathLike], conversations: Sequence[list]) -> Path:
    """Write ``conversations`` (lists of messages) as SFT JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({MESSAGES: c}, ensure_ascii=False) + "\n" for c in conversations),
                    encoding="utf-8")
    return path


__all__ = ["ConversationSource", "open_conversations", "make_sft_dataset", "SFTBatches", "write_conversations"]
