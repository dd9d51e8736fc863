"""Document encoding with document-level Fill-in-the-Middle (docs/architecture.md §7).

A document becomes one of (``bos`` is prepended to every document, as DeepSeek's tokenizer does; it is
the first token of each packed segment, so a document never starts without context marker)::

    plain (1 - fim_rate):  <｜begin▁of▁sentence｜> text <｜end▁of▁sentence｜>
    FIM   (fim_rate, PSM): <｜begin▁of▁sentence｜><｜fim▁begin｜>pre<｜fim▁hole｜>suf<｜fim▁end｜>middle<｜end▁of▁sentence｜>

The two split points are drawn uniformly on character (code point) positions ``0..len(text)``, so
``pre + middle + suf == text`` and any part may be empty. Every random choice comes from
``fim_rng(seed, doc_index, epoch)``: the same document in the same epoch is always encoded the same way,
whatever the shuffle, sharding or resume point; another epoch draws anew. The three parts are tokenized
separately and joined by the special ids (special-token text inside a document stays plain text).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from dsv3_jax.data.tokenizer import DEEPSEEK_SPECIAL_TOKENS, SpecialTokens, Tokenizer
from dsv3_jax.errors import DataError


def fim_rng(seed: int, doc_index: int, epoch: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(doc_index), int(epoch)])


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """``(prefix, middle, suffix)`` at two uniform character positions."""
    i, j = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return text[:i], text[i:j], text[j:]


def maybe_fim(text: str, rng: np.random.Generator, fim_rate: float) -> Optional[tuple[str, str, str]]:
    """The FIM split with probability ``fim_rate`` (one ``rng.random()`` draw first), else ``None``."""
    if not 0.0 <= fim_rate <= 1.0:
        raise DataError(f"fim_rate must be in [0, 1], got {fim_rate}.")
    if rng.random() < fim_rate:
        return fim_split(text, rng)
    return None


def format_fim(prefix: str, middle: str, suffix: str, special: SpecialTokens = DEEPSEEK_SPECIAL_TOKENS) -> str:
    """The PSM text of docs/architecture.md §7 (without the leading BOS)."""
    return (f"{special.fim_begin}{prefix}{special.fim_hole}{suffix}{special.fim_end}{middle}{special.eos}")


def encode_document(text: str, tokenizer: Tokenizer, *, fim_rate: float = 0.1, seed: int = 0,
                    doc_index: int = 0, epoch: int = 0, add_bos: bool = True) -> np.ndarray:
    """Token ids ``[T] int32`` of one document, FIM-transformed with probability ``fim_rate``."""
    parts = maybe_fim(text, fim_rng(seed, doc_index, epoch), fim_rate)
    head = [tokenizer.bos_id] if add_bos else []
    if parts is None:
        ids = head + tokenizer.encode(text) + [tokenizer.eos_id]
    else:
        pre, mid, suf = tokenizer.encode_batch(parts)
        ids = (head + [tokenizer.fim_begin_id] + pre + [tokenizer.fim_hole_id] + suf
               + [tokenizer.fim_end_id] + mid + [tokenizer.eos_id])
    return np.asarray(ids, dtype=np.int32)
