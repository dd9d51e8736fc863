"""Held-out perplexity (``dsv3 eval ppl``): each held-out document, encoded as the trainer encodes
a plain document (BOS, text, EOS; no FIM), is cut into windows of ``seq_len`` tokens; every token
after a window's first is scored given the window before it. Windows are scored in batches by one
jitted forward that returns only the per-token NLL (no ``[B, S, V]`` logits leave the device), on the
model's mesh when it has one. The NLL per position is kept too: the long-context curve of ``--plot``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import distributed
from ..data.tokenizer import Tokenizer
from ..errors import DataError


@dataclasses.dataclass
class PplResult:
    ppl: float
    tokens: int
    nll_by_position: np.ndarray      # [seq_len - 1]: mean NLL of the tokens predicted at each position
    count_by_position: np.ndarray    # [seq_len - 1]: how many tokens each mean is over

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens}


def windows(docs: Sequence[Sequence[int]], seq_len: int, pad_id: int, max_tokens: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [N, seq_len], mask [N, seq_len - 1])``: each document cut into consecutive windows
    (the last one right-padded; windows of a single token predict nothing and are dropped); ``mask``
    marks the predicted tokens. ``max_tokens`` > 0: stop once that many tokens are scored."""
    rows, masks, scored = [], [], 0
    for ids in docs:
        for s in range(0, len(ids), seq_len):
            w = list(ids[s:s + seq_len])
            if len(w) < 2:
                continue
            rows.append(w + [pad_id] * (seq_len - len(w)))
            masks.append([1] * (len(w) - 1) + [0] * (seq_len - len(w)))
            scored += len(w) - 1
            if max_tokens and scored >= max_tokens:
                return np.asarray(rows, np.int32), np.asarray(masks, np.int32)
    return np.asarray(rows, np.int32).reshape(-1, seq_len), np.asarray(masks, np.int32).reshape(-1, seq_len - 1)


def _nll_fn(graphdef):
    @jax.jit
    def nll(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens, mtp=False).logits[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return nll


def perplexity(model, tokenizer: Tokenizer, texts: Sequence[str], *, seq_len: int, batch_size: int = 8,
               max_tokens: int = 0) -> PplResult:
    """Perplexity of ``model`` on ``texts`` (see module doc)."""
    if not 2 <= seq_len <= model.cfg.max_position_embeddings:
        raise DataError(f"seq_len={seq_len}: must be in [2, {model.cfg.max_position_embeddings}] (the model's "
                        "context) (fix: pass a smaller --seq-len).")
    docs = [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(list(texts))]
    toks, mask = windows(docs, seq_len, tokenizer.pad_id, max_tokens)
    if not len(toks):
        raise DataError("the held-out documents hold no token to score (fix: evaluate on more documents).")
    graphdef, state = nnx.split(model)
    mesh = getattr(model, "mesh", None)
    step = batch_size
    if mesh is not None:
        shards = model.rules.batch_shards(mesh)
        step = -(-batch_size // shards) * shards
    fn = _nll_fn(graphdef)
    total = np.zeros(seq_len - 1)
    count = np.zeros(seq_len - 1)
    for i in range(0, len(toks), step):
        b, m = toks[i:i + step], mask[i:i + step]
        n = len(b)
        if n < step:  # a fixed batch shape: one compile; padded rows carry no mask
            b = np.concatenate([b, np.repeat(b[-1:], step - n, 0)])
        x = jax.device_put(b, model.rules.batch_sharding(mesh)) if mesh is not None else jnp.asarray(b)
        nll = np.asarray(distributed.host_value(fn(state, x)), np.float64)[:n]
        total += (nll * m).sum(0)
        count += m.sum(0)
    n_tok = int(count.sum())
    mean = float(total.sum() / n_tok)
    with np.errstate(invalid="ignore", divide="ignore"):
        by_pos = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return PplResult(float(np.exp(mean)), n_tok, by_pos, count)


def plot_nll_by_position(res: PplResult, path: str, title: str = "") -> None:
    """Mean NLL against position (bucketed to ~64 points): flat where the model uses its context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    S = len(res.nll_by_position)
    edges = np.unique(np.linspace(0, S, min(64, S) + 1).astype(int))
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        c = res.count_by_position[a:b]
        if c.sum():
            xs.append((a + b) / 2)
            ys.append(float(np.nansum(res.nll_by_position[a:b] * c) / c.sum()))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, marker=".")
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(title or f"held-out perplexity {res.ppl:.2f} over {res.tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["PplResult", "perplexity", "windows", "plot_nll_by_position"]
