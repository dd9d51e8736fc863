"""Score token sequences with a model: per-token negative log-likelihood and perplexity.

The forward pass is one ``jax.jit`` of ``(graphdef, state, tokens)`` (DESIGN.md "Functional at the
boundary"); token ids are checked against the vocabulary before they reach it.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

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


def score(model, tokens, *, mtp: bool = False) -> Scores:
    """``tokens: [B, S]`` int ids → :class:`Scores`. Raises ``TokenRangeError`` for ids outside
    the vocabulary (JAX gathers would clamp them silently)."""
    from flax import nnx

    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise TokenRangeError(f"token ids must be [batch, seq], got shape {tokens.shape} (fix: pass a 2-D array).")
    check_tokens(tokens, model.cfg.vocab_size)
    if mtp and not len(model.mtp):
        raise ConfigError("this model has no MTP module (num_mtp_layers=0), so there are no MTP logits "
                          "(fix: score with mtp=False).")
    graphdef, state = nnx.split(model)
    logits, mtp_logits, nll = _forward(graphdef, mtp)(state, tokens.astype(np.int32))
    return Scores(np.asarray(nll, np.float32), np.asarray(logits, np.float32),
                  None if mtp_logits is None else np.asarray(mtp_logits, np.float32))


def tokenize(checkpoint: str | Path, text: str) -> np.ndarray:
    """Encode ``text`` with the checkpoint's own ``tokenizer.json`` → ``[1, S]`` int32 (with the
    tokenizer's post-processor, e.g. DeepSeek's BOS, as ``transformers`` encodes)."""
    tok = load_tokenizer(checkpoint, require=(), fix="pass --token-ids FILE.npy, or convert from a model directory "
                                                     "that has tokenizer.json")
    return np.asarray([tok.encode(text, allow_special=True, add_special_tokens=True)], np.int32)
