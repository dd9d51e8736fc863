"""Packing token documents into fixed-length rows (docs/architecture.md §7: packed, with or without document masking).

A row holds ``L = seq_len + 1`` tokens so that ``inputs = row[:-1]`` and ``targets = row[1:]``. Documents
are placed greedily in stream order (deterministic, no reordering):

- a document that fits in the row's free space is appended whole;
- one that does not fit, but fits an empty row, closes the row (the rest is padding) and starts the next;
- one longer than a row fills the free space and continues in the following rows. Each continuation row
  starts with the last token of the previous piece, so every transition ``t_i → t_{i+1}`` of the
  document is a target exactly once and none is lost at a row edge.
- Positions restart at 0 in every row, continuations included (our choice): every row is self-contained,
  positions stay below ``seq_len``, and a continuation is treated like a document that begins mid-text,
  as in unmasked concatenate-and-split training.

Outputs per row (``[S]`` int32, S = seq_len); a batch stacks them to ``[B, S]``:

- ``inputs``, ``targets``: token ids (padding uses the tokenizer's pad id);
- ``segment_ids``: 1, 2, 3… for the document pieces of the row, 0 for padding. With
  ``mask_documents=False`` (the report's setting: no cross-sample masking) every non-pad token is 1;
- ``positions``: per-piece ``0, 1, …`` (padding 0); with ``mask_documents=False``, ``0..S-1`` for the row;
- ``loss_mask``: 1 where the target is a real token of the same segment as the input, i.e. 0 for padding
  targets and, with masking on, for a document's last token (it must not predict the next document's BOS).
  Without masking only padding targets are masked.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import grain
import numpy as np

from dsv3_jax.errors import DataError

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def build_row(pieces: list[np.ndarray], seq_len: int, pad_id: int, mask_documents: bool = True) -> dict:
    """One packed row from ``pieces`` (token arrays whose lengths sum to at most ``seq_len + 1``)."""
    L = seq_len + 1
    n = sum(len(p) for p in pieces)
    assert 0 < n <= L, (n, L)
    tokens = np.full(L, pad_id, np.int32)
    seg = np.zeros(L, np.int32)
    pos = np.zeros(L, np.int32)
    start = 0
    for k, piece in enumerate(pieces, start=1):
        end = start + len(piece)
        tokens[start:end] = piece
        seg[start:end] = k if mask_documents else 1
        pos[start:end] = np.arange(len(piece))
        start = end
    if not mask_documents:
        pos = np.arange(L, dtype=np.int32)
    valid_target = seg[1:] != 0
    if mask_documents:
        valid_target &= seg[1:] == seg[:-1]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
            "loss_mask": valid_target.astype(np.int32)}


class _Packer:
    """Greedy packing state machine shared by ``pack_documents`` and the grain iterator.

    ``take(doc, offset)`` consumes ``doc[offset:]`` into the open row and returns
    ``(row or None, new offset or None)``: ``None`` offset means the document is fully placed."""

    def __init__(self, seq_len: int, pad_id: int, mask_documents: bool):
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}.")
        self.seq_len, self.L, self.pad_id, self.mask_documents = seq_len, seq_len + 1, pad_id, mask_documents
        self.pieces: list[np.ndarray] = []
        self.used = 0

    def _emit(self) -> dict:
        row = build_row(self.pieces, self.seq_len, self.pad_id, self.mask_documents)
        self.pieces, self.used = [], 0
        return row

    def take(self, doc: np.ndarray, offset: int) -> tuple[Optional[dict], Optional[int]]:
        rest = doc[offset:]
        space = self.L - self.used
        if len(rest) <= space:                       # fits: append whole
            self.pieces.append(rest)
            self.used += len(rest)
            return (self._emit() if self.used == self.L else None), None
        if len(rest) <= self.L and self.used > 0:    # fits an empty row: close this one
            return self._emit(), offset
        self.pieces.append(rest[:space])             # longer than a row: split, overlap one token
        self.used = self.L
        return self._emit(), offset + space - 1

    def flush(self) -> Optional[dict]:
        return self._emit() if self.used else None


def pack_documents(documents: Iterable[np.ndarray], seq_len: int, *, pad_id: int = 0,
                   mask_documents: bool = True) -> Iterator[dict]:
    """Rows (dicts of ``[seq_len]`` int32 arrays, see module doc) from token documents, in order.
    The last row is padded; empty documents are skipped."""
    packer = _Packer(seq_len, pad_id, mask_documents)
    for doc in documents:
        if doc is None or len(doc) == 0:
            continue
        doc = np.asarray(doc, np.int32)
        offset: Optional[int] = 0
        while offset is not None:
            row, offset = packer.take(doc, offset)
            if row is not None:
                yield row
    row = packer.flush()
    if row is not None:
        yield row


def stack_rows(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in FIELDS}


class PackIterDataset(grain.IterDataset):
    """``grain`` transformation: token documents (``[T]`` int arrays; ``None`` skipped) → packed rows.

    Checkpointable without storing tokens: the state is the parent's state *before* the document being
    placed plus the token offset reached in it; restoring re-reads that document (the upstream encoding is
    deterministic) and continues exactly where it stopped.

    ``max_empty_run``: raise ``DataError`` (naming ``source``) after that many empty documents in a row,
    which an endless stream of only empty documents would otherwise loop over forever."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, *, pad_id: int, mask_documents: bool = True,
                 max_empty_run: Optional[int] = None, source: str = "the data source"):
        super().__init__(parent)
        _Packer(seq_len, pad_id, mask_documents)   # validate arguments now
        self.seq_len, self.pad_id, self.mask_documents = seq_len, pad_id, mask_documents
        self.max_empty_run, self.source = max_empty_run, source

    def __iter__(self) -> "_PackIterator":
        it = _PackIterator(self._parent.__iter__(), self.seq_len, self.pad_id, self.mask_documents)
        it._max_empty_run, it._source = self.max_empty_run, self.source
        return it

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.seq_len}, mask_documents={self.mask_documents})"


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, mask_documents: bool):
        super().__init__(parent)
        self._packer = _Packer(seq_len, pad_id, mask_documents)
        self._doc: Optional[np.ndarray] = None     # document being placed, from `_offset` on
        self._offset = 0
        self._state_before_doc: Optional[dict[str, Any]] = None
        self._exhausted = False
        self._max_empty_run: Optional[int] = None
        self._source = "the data source"

    def __next__(self) -> dict:
        empty = 0
        while not self._exhausted:
            if self._doc is None:
                before = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:
                    self._exhausted = True
                    break
                if doc is None or len(doc) == 0:
                    empty += 1
                    if self._max_empty_run is not None and empty >= self._max_empty_run:
                        raise DataError(f"{self._source}: {empty} documents in a row are empty, so no sequence "
                                        "can be packed (fix: point the data path at files with text; empty "
                                        "files are skipped).")
                    continue
                empty = 0
                self._doc, self._offset, self._state_before_doc = np.asarray(doc, np.int32), 0, before
            row, offset = self._packer.take(self._doc, self._offset)
            if offset is None:
                self._doc = None
            else:
                self._offset = offset
            if row is not None:
                return row
        row = self._packer.flush()
        if row is None:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        # Between calls to __next__ the open row is always empty (rows are emitted as soon as they close).
        assert self._packer.used == 0 or self._exhausted
        if self._doc is None:
            return {"parent": self._parent.get_state(), "doc_offset": -1}
        return {"parent": self._state_before_doc, "doc_offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._packer = _Packer(self._packer.seq_len, self._packer.pad_id, self._packer.mask_documents)
        self._exhausted = False
        self._doc = None
        if state["doc_offset"] >= 0:
            self._state_before_doc = state["parent"]
            self._doc = np.asarray(next(self._parent), np.int32)
            self._offset = int(state["doc_offset"])

    def __str__(self) -> str:
        return "PackIterator"
