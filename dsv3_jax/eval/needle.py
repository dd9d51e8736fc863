"""Needle in a Haystack (``dsv3 eval needle``), as the report checks the long-context extension
(docs/architecture.md §3; docs/design.md §Evaluation).

One trial at context length ``L`` and depth ``d`` %: a haystack of real code (held-out documents,
concatenated from a random one on), a needle line ``\\nPASSKEY = <5 random digits>\\n`` inserted
after ``round(d/100 · n_hay)`` haystack tokens, then the question: the line's prefix again
(``\\nPASSKEY = ``). The prompt is exactly ``L`` tokens: ``BOS + hay[:p] + needle + hay[p:] + question``.
The model answers by greedy decoding (``Generator``, the latent cache) and a trial counts when the
answer's tokens equal the needle's digits-and-newline tokens. The needle's pieces are tokenized
separately and joined as ids, so the answer the model must copy is exactly the ids it has seen, and
token boundaries of the haystack are not disturbed. All trials of one length run as one batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from ..data.tokenizer import Tokenizer
from ..errors import DataError
from ..inference.generate import Generator

PREFIX = "\nPASSKEY = "
DEPTHS = tuple(range(0, 101, 10))


@dataclasses.dataclass
class NeedleTrial:
    tokens: list[int]        # the prompt, exactly `length` tokens
    answer: list[int]        # what greedy decoding must produce
    needle_start: int        # index in `tokens` of the needle's first token
    length: int
    depth: float


@dataclasses.dataclass
class NeedleResult:
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]   # [len(lengths)][len(depths)]
    trials: int

    def to_json(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "accuracy": self.accuracy}


def make_trial(tokenizer: Tokenizer, hay_ids: Sequence[int], length: int, depth: float,
               rng: np.random.Generator) -> NeedleTrial:
    """One prompt of ``length`` tokens with the needle at ``depth`` % of the haystack (see module doc).
    ``hay_ids``: a token stream at least as long as the haystack, read from a random offset."""
    if not 0 <= depth <= 100:
        raise DataError(f"needle depth {depth!r}: must be in [0, 100] % (fix: e.g. --depths 0,50,100).")
    key = "".join(str(int(x)) for x in rng.integers(0, 10, 5))
    prefix = tokenizer.encode(PREFIX)
    answer = tokenizer.encode(f"{key}\n")
    needle = prefix + answer
    n_hay = length - 1 - len(needle) - len(prefix)
    if n_hay < 1:
        raise DataError(f"needle length {length}: too short for a haystack around a {len(needle) + len(prefix)}-token "
                        "needle and question (fix: use lengths of at least 64 tokens).")
    if len(hay_ids) < n_hay:
        raise DataError(f"the held-out documents hold {len(hay_ids)} tokens, fewer than the {n_hay}-token haystack "
                        f"of length {length} (fix: use shorter --lengths or a larger --data corpus).")
    start = int(rng.integers(0, len(hay_ids) - n_hay + 1))
    hay = list(hay_ids[start:start + n_hay])
    p = round(depth / 100 * n_hay)
    tokens = [tokenizer.bos_id] + hay[:p] + needle + hay[p:] + prefix
    return NeedleTrial(tokens, answer, 1 + p, length, float(depth))


def haystack_stream(tokenizer: Tokenizer, texts: Sequence[str], need: int) -> list[int]:
    """Held-out code as one token stream of at least ``need`` tokens when the documents allow it
    (documents joined by a blank line, as files would be concatenated)."""
    out: list[int] = []
    for ids in tokenizer.encode_batch([t + "\n\n" for t in texts]):
        out += ids
        if len(out) >= need:
            break
    return out


def needle_eval(model, tokenizer: Tokenizer, texts: Sequence[str], *, lengths: Sequence[int],
                depths: Sequence[float] = DEPTHS, trials: int = 4, seed: int = 0, batch_size: int = 16,
                generator: Optional[Generator] = None) -> NeedleResult:
    """Accuracy grid ``[length][depth]`` over ``trials`` random keys and haystacks per cell."""
    if trials < 1:
        raise DataError(f"trials={trials}: must be >= 1 (fix: e.g. --trials 4).")
    if not lengths or not depths:
        raise DataError("needle: give at least one length and one depth (fix: e.g. --lengths 256,1024).")
    ctx = model.cfg.max_position_embeddings
    n_answer = len(tokenizer.encode("00000\n"))
    too_long = [L for L in lengths if L + n_answer + 2 > ctx]
    if too_long:
        raise DataError(f"needle length(s) {too_long} + the answer exceed the model's context of {ctx} tokens "
                        f"(fix: use lengths up to {ctx - n_answer - 2}).")
    rng = np.random.default_rng(seed)
    stream = haystack_stream(tokenizer, texts, max(lengths))
    gen = generator or Generator(model)
    acc = []
    for L in lengths:
        cells = [make_trial(tokenizer, stream, L, d, rng) for d in depths for _ in range(trials)]
        longest = max(len(c.answer) for c in cells)
        out: list[list[int]] = []
        for i in range(0, len(cells), batch_size):
            out += gen([c.tokens for c in cells[i:i + batch_size]], max_new_tokens=longest).tokens
        hits = np.array([r[:len(c.answer)] == c.answer for r, c in zip(out, cells)], float)
        acc.append([float(x) for x in hits.reshape(len(depths), trials).mean(1)])
    return NeedleResult([int(x) for x in lengths], [int(d) if float(d).is_integer() else float(d) for d in depths],
                        acc, trials)


def plot_needle(res: NeedleResult, path: str, title: str = "") -> None:
    """Heatmap like the report's: context length across, needle depth down, accuracy as colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.asarray(res.accuracy).T      # [depth, length]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(res.lengths), 4.2))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(res.lengths)), [str(x) for x in res.lengths])
    ax.set_yticks(range(len(res.depths)), [f"{d:g}" for d in res.depths])
    for (i, j), v in np.ndenumerate(grid):   # the value in each cell (colour alone hides 0.9 vs 1)
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title or f"Needle in a Haystack ({res.trials} trials per cell)")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["NeedleTrial", "NeedleResult", "make_trial", "haystack_stream", "needle_eval", "plot_needle",
           "DEPTHS", "PREFIX"]
