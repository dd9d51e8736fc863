"""Fill-in-the-middle exact match on held-out standard-library functions (``dsv3 eval fim``;
docs/design.md §Evaluation).

From the held-out documents, every function definition (``ast``) whose body has at least three
lines is a candidate; a seeded draw picks ``n`` of them and, in each, one body line (not the first
nor the last) as the middle span. The prompt is the data pipeline's PSM format
(``data/fim.py``): ``BOS fim▁begin <prefix> fim▁hole <suffix> fim▁end`` with prefix and suffix the
function's text before and after that line, tokenized separately and joined by the special ids as
the trainer does; samples whose prompt and answer do not fit the context are skipped. Greedy decoding
(``Generator``, batched) runs until EOS or the middle's length plus a margin; a sample counts when the
decoded tokens before EOS equal the middle line exactly.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np

from ..data.tokenizer import Tokenizer
from ..errors import DataError
from ..inference.generate import Generator

MAX_NEW = 64   # tokens generated at most: middle lines of up to MAX_NEW - MARGIN tokens are asked for
MARGIN = 8     # tokens allowed past the middle's length (an answer that runs on is a miss, but ends)


@dataclasses.dataclass
class FimSample:
    prefix: str
    middle: str
    suffix: str


@dataclasses.dataclass
class FimResult:
    exact_match: float
    n: int
    samples: list[tuple[str, str]]   # (expected middle, generated) per sample

    def to_json(self) -> dict:
        return {"exact_match": self.exact_match, "n": self.n}


def functions(text: str) -> Iterator[str]:
    """Source text of each function (or method) definition in ``text``; nothing when it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield "".join(lines[first - 1:node.end_lineno])


def fim_samples(texts: Sequence[str], n: int, seed: int = 0, max_chars: int = 2000) -> list[FimSample]:
    """``n`` samples (see module doc), or fewer when the documents hold fewer candidates."""
    rng = np.random.default_rng(seed)
    cands = []
    for t in texts:
        for f in functions(t):
            lines = f.splitlines(keepends=True)
            if len(lines) >= 4 and len(f) <= max_chars:
                cands.append(lines)
    if not cands:
        raise DataError("the held-out documents hold no function of 4-plus lines to fill in (fix: evaluate on "
                        "Python sources, e.g. --data stdlib).")
    out = []
    for i in rng.permutation(len(cands))[:n]:
        lines = cands[int(i)]
        body = [j for j in range(1, len(lines) - 1) if lines[j].strip()]
        if not body:
            continue
        j = int(body[int(rng.integers(0, len(body)))])
        out.append(FimSample("".join(lines[:j]), lines[j], "".join(lines[j + 1:])))
    return out


def fim_prompt(tokenizer: Tokenizer, s: FimSample) -> list[int]:
    pre, suf = tokenizer.encode_batch([s.prefix, s.suffix])
    return [tokenizer.bos_id, tokenizer.fim_begin_id] + pre + [tokenizer.fim_hole_id] + suf + [tokenizer.fim_end_id]


def fim_eval(model, tokenizer: Tokenizer, texts: Sequence[str], *, n: int = 64, seed: int = 0,
             batch_size: int = 16, generator: Optional[Generator] = None) -> FimResult:
    """Exact-match rate of the restored middle lines (see module doc)."""
    if n < 1:
        raise DataError(f"n={n}: must be >= 1 (fix: e.g. --n 64).")
    ctx = model.cfg.max_position_embeddings
    samples = []
    for s in fim_samples(texts, 4 * n, seed):   # every prompt leaves room for any sample's answer in its batch
        if len(tokenizer.encode(s.middle)) + MARGIN <= MAX_NEW and len(fim_prompt(tokenizer, s)) + MAX_NEW <= ctx:
            samples.append(s)
        if len(samples) == n:
            break
    if not samples:
        raise DataError(f"no held-out function fits the model's context of {ctx} tokens (fix: a model with a "
                        "longer context, or --data with shorter functions).")
    gen = generator or Generator(model)
    eos = tokenizer.eos_id
    pairs = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        budget = max(len(tokenizer.encode(s.middle)) for s in chunk) + MARGIN
        res = gen([fim_prompt(tokenizer, s) for s in chunk], max_new_tokens=budget, stop_tokens=[eos])
        for s, ids in zip(chunk, res.tokens):
            ids = ids[:ids.index(eos)] if eos in ids else ids
            pairs.append((s.middle, tokenizer.decode(ids)))
    hits = sum(a == b for a, b in pairs)
    return FimResult(hits / len(pairs), len(pairs), pairs)


__all__ = ["FimSample", "FimResult", "functions", "fim_samples", "fim_prompt", "fim_eval"]
