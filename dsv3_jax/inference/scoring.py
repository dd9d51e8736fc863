"""Score token sequences with a model: per-token negative log-likelihood and perplexity.

The forward pass is one ``jax.jit`` of ``(graphdef, state, tokens)`` (docs/design.md §Functional at the
boundary); token ids are checked against the vocabulary before they reach it.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .. import distributed
from ..data.tokenizer import load_tokenizer
from ..errors import ConfigError, TokenRangeError
from ..model import check_tokens


class Scores(NamedTuple):
    nll: np.ndarray                   # [B, S-1] fp32: -log p(t_{i+1} | t_{<=i})
    logits: np.ndarray                # [B, S, V] fp32
    mtp_logits: Optional[np.ndarray]  # [Dmtp, B, S, V] fp32, or None

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean()) if self.nll.size else float("nan")

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_nll))


_JIT_CACHE: dict = {}


def _forward(graphdef, mtp: bool):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    key = (graphdef, mtp)
    if key not in _JIT_CACHE:
        @jax.jit
        def fwd(state, tokens):
            model = nnx.merge(graphdef, state)
            out = model(tokens, mtp=mtp)
            logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            return out.logits, out.mtp_logits, nll
        _JIT_CACHE[key] = fwd
    return _JIT_CACHE[key]


def as_token_array(tokens, what: str = "tokens") -> np.ndarray:
    """``tokens`` (an array or a list of equal-length id lists; one 1-D sequence is a batch of one) →
    ``[B, S]`` integer ids. ``TokenRangeError`` naming the rank, dtype or ragged row, and the fix."""
    if isinstance(tokens, (str, bytes)):
        raise TokenRangeError(f"{what} must be token ids, got text (fix: encode it first, e.g. "
                              "dsv3_jax.inference.scoring.tokenize(checkpoint, text)).")
    if not hasattr(tokens, "shape"):
        rows = list(tokens) if isinstance(tokens, (list, tuple)) else None
        if rows and all(isinstance(r, (list, tuple, np.ndarray)) for r in rows):
            lengths = sorted({len(r) for r in rows})
            if len(lengths) > 1:
                raise TokenRangeError(f"{what}: the sequences have different lengths {lengths} (fix: score them "
                                      "one at a time, or as separate batches of equal length).")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as e:
        raise TokenRangeError(f"{what} cannot be read as an array of token ids: {e} (fix: pass a [batch, seq] "
                              "int32 array).") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise TokenRangeError(f"{what} must be [batch, seq] (or one 1-D sequence), got shape {arr.shape} "
                              "(fix: pass a 2-D array).")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TokenRangeError(f"{what} must be integer token ids, got dtype {arr.dtype} (fix: cast to int32).")
    return arr


def check_score_tokens(tokens: np.ndarray, cfg=None, what: str = "tokens") -> None:
    """``[B, S]`` ids that can be scored: at least one sequence of at least 2 tokens (the first token
    has no prediction, so one token scores nothing), and — given the model config — no longer than its
    context and inside its vocabulary. ``TokenRangeError`` otherwise, naming ``what``."""
    if tokens.shape[0] == 0:
        raise TokenRangeError(f"{what} holds no sequences (shape {tokens.shape}) (fix: pass at least one sequence "
                              "of 2 or more tokens).")
    if tokens.shape[1] < 2:
        raise TokenRangeError(f"{what} has sequences of {tokens.shape[1]} token(s) (shape {tokens.shape}): scoring "
                              "needs at least 2, since token i+1 is scored given tokens 0..i and the first has no "
                              "prediction (fix: pass longer sequences).")
    if cfg is not None:
        if tokens.shape[1] > cfg.max_position_embeddings:
            raise TokenRangeError(f"{what} has sequences of {tokens.shape[1]} tokens, longer than the model's "
                                  f"context of {cfg.max_position_embeddings} (max_position_embeddings) (fix: split "
                                  f"them into windows of at most {cfg.max_position_embeddings} tokens).")
        check_tokens(tokens, cfg.vocab_size, what)


def score(model, tokens, *, mtp: bool = False) -> Scores:
    """``tokens: [B, S]`` int ids (an array or a list of equal-length lists; a 1-D sequence is a batch
    of one) → :class:`Scores` over ``S - 1`` predicted tokens per row, so ``S >= 2``; at most the
    model's context. Raises ``TokenRangeError`` for the wrong rank/dtype/length and for ids outside
    the vocabulary (JAX gathers would clamp them silently). A model built for a mesh gets its batch
    padded to a multiple of the mesh's batch shards; the padding rows are dropped from the result."""
    import jax
    from flax import nnx

    tokens = as_token_array(tokens)
    check_score_tokens(tokens, model.cfg)
    if mtp and not len(model.mtp):
        raise ConfigError("this model has no MTP module (num_mtp_layers=0), so there are no MTP logits "
                          "(fix: score with mtp=False).")
    n = tokens.shape[0]
    tokens = tokens.astype(np.int32)
    if getattr(model, "mesh", None) is not None:
        pad = -n % model.rules.batch_shards(model.mesh)
        if pad:  # repeat the last row: real ids, so nothing special reaches the model
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
        tokens = jax.device_put(tokens, model.rules.batch_sharding(model.mesh))
    graphdef, state = nnx.split(model)
    # (a model spread over several processes: the outputs are gathered to every process)
    logits, mtp_logits, nll = distributed.host_value(_forward(graphdef, mtp)(state, tokens))
    return Scores(np.asarray(nll, np.float32)[:n], np.asarray(logits, np.float32)[:n],
                  None if mtp_logits is None else np.asarray(mtp_logits, np.float32)[:, :n])


def tokenize(checkpoint: str | Path, text: str) -> np.ndarray:
    """Encode ``text`` with the checkpoint's own ``tokenizer.json`` → ``[1, S]`` int32 (with the
    tokenizer's post-processor, e.g. DeepSeek's BOS, as ``transformers`` encodes)."""
    tok = load_tokenizer(checkpoint, require=(), fix="pass --token-ids FILE.npy, or convert from a model directory "
                                                     "that has tokenizer.json")
    return np.asarray([tok.encode(text, allow_special=True, add_special_tokens=True)], np.int32)
