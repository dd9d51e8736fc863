"""Batched generation over the latent cache, with optional MTP speculative decoding (docs/architecture.md §2, §5).

Prompts of different lengths are right-padded into one batch; every sequence keeps its own
position, so a step writes each sequence's new token at its own cache position. With
``speculative="mtp"`` the MTP module drafts the token after next and the main model verifies it in
the same step (two tokens per step when the draft is right); greedy output is identical to plain
greedy decoding. With sampling (temperature > 0) the draft is sampled from the MTP head's filtered
distribution q and kept with probability min(1, p/q) under the main model's p, else replaced by a
sample of max(p − q, 0) (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): the output
is distributed exactly as plain sampling with the same temperature / top-k / top-p.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import distributed
from ..checkpoint.orbax_io import load_checkpoint
from ..errors import GenerationError
from ..model import DeepSeekV3, check_tokens, init_cache
from ..model.transformer import CACHE_DTYPE
from .decode_loop import LoopState, build_chunk, pad_stops


CACHE_DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]                  # generated ids per prompt (prompt excluded)
    steps: int                               # decode steps after the prefill
    acceptance_rate: Optional[float] = None  # MTP drafts accepted / proposed (speculative only)

    @property
    def tokens_per_step(self) -> float:
        return sum(map(len, self.tokens)) / max(1, self.steps * len(self.tokens))


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """``logits: [B, V]`` → fp32 logits of the sampling distribution: divided by ``temperature``,
    -inf outside the ``top_k`` largest and outside the nucleus of mass ``top_p``."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, -1), -1)
        cutoff = jnp.take_along_axis(srt, jnp.sum(cum < top_p, -1, keepdims=True), -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def greedy(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` as int32 (the first maximum; the first NaN if any), as two plain
    reductions: XLA:CPU runs argmax's (value, index) reduction 15-20x slower, 110 µs for the verify
    step's ``[16, 2, 512]`` logits against 7 µs (docs/design.md §Speculative decoding)."""
    top = jnp.max(logits, -1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    idx = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, idx, logits.shape[-1]), -1)


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """``logits: [B, V]`` → ``[B]`` int32: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return greedy(logits)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def speculative_accept(key: jax.Array, p_logits: jax.Array, q_logits: jax.Array, draft: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """The speculative-sampling rule for one drafted token. ``p_logits`` (target) and ``q_logits``
    (the distribution ``draft [B]`` was sampled from) are filtered logits ``[B, V]``. Keeps the draft
    with probability ``min(1, p(d)/q(d))``, else draws from ``max(p − q, 0)`` renormalised; the
    returned token ``[B]`` is distributed exactly as ``p``. Returns ``(token, accepted)``."""
    p, q = jax.nn.softmax(p_logits, -1), jax.nn.softmax(q_logits, -1)
    pd = jnp.take_along_axis(p, draft[:, None], -1)[:, 0]
    qd = jnp.take_along_axis(q, draft[:, None], -1)[:, 0]
    k_u, k_r = jax.random.split(key)
    accepted = jax.random.uniform(k_u, pd.shape) * qd < pd
    residual = jnp.maximum(p - q, 0.0)
    # p == q leaves no residual mass, but then every draft is accepted; fall back to p to stay finite
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    other = jax.random.categorical(k_r, jnp.log(residual)).astype(jnp.int32)
    return jnp.where(accepted, draft, other), accepted


def _prompt_list(prompts) -> list[list[int]]:
    """``prompts`` (a list of token-id lists, or a ``[batch, seq]`` integer array) → ``list[list[int]]``;
    ``GenerationError`` naming what is wrong (a flat list, text, floats, the wrong rank) and the fix."""
    if isinstance(prompts, (str, bytes)):
        raise GenerationError("prompts must be token ids, got text (fix: encode it first, e.g. "
                              "[tokenizer.encode(text)], or use `dsv3 generate --prompt`).")
    if hasattr(prompts, "shape") and hasattr(prompts, "dtype"):  # numpy / jax arrays
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            fix = "one prompt is ids[None]" if arr.ndim == 1 else "pass a list of token-id lists"
            raise GenerationError(f"prompts array must be [batch, seq] (rank 2), got shape {arr.shape} (fix: {fix}).")
        if not np.issubdtype(arr.dtype, np.integer):
            raise GenerationError(f"prompts array must hold integer token ids, got dtype {arr.dtype} "
                                  "(fix: .astype(np.int32)).")
        return arr.tolist()
    try:
        items = list(prompts)
    except TypeError:
        raise GenerationError(f"prompts must be a list of token-id lists, got a {type(prompts).__name__} "
                              "(fix: e.g. [[1, 2, 3]]).") from None
    if not items:
        raise GenerationError("no prompts given (fix: pass at least one, e.g. [[1, 2, 3]]).")
    if all(_is_int(t) for t in items):
        raise GenerationError(f"prompts is one flat list of {len(items)} token ids, expected a list of prompts "
                              "(fix: wrap one prompt in a list: [ids], e.g. [[1, 2, 3]]).")
    out = []
    for i, p in enumerate(items):
        if isinstance(p, (str, bytes)):
            raise GenerationError(f"prompt {i} is text, not token ids (fix: encode it first with the tokenizer).")
        if hasattr(p, "shape") and hasattr(p, "dtype"):
            a = np.asarray(p)
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise GenerationError(f"prompt {i} must be a 1-D sequence of integer token ids, got an array of "
                                      f"shape {a.shape} and dtype {a.dtype} (fix: a list of ints, or .astype(np.int32)).")
            out.append(a.tolist())
            continue
        try:
            p = list(p)
        except TypeError:
            raise GenerationError(f"prompt {i} is a {type(p).__name__}, expected a sequence of token ids "
                                  "(fix: prompts is a list of lists, e.g. [[1, 2, 3]]).") from None
        for j, t in enumerate(p):
            if not _is_int(t):
                raise GenerationError(f"prompt {i} token {j} is {t!r} ({type(t).__name__}), expected an integer "
                                      "token id (fix: pass int ids, e.g. [[1, 2, 3]]).")
        out.append([int(t) for t in p])
    return out


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_sampling(*, max_new_tokens, temperature, top_k, top_p, seed) -> None:
    """``GenerationError`` for a sampling parameter that is not finite or out of range (naming it)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1 (fix: e.g. 64).")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature={temperature!r}: must be a finite number >= 0 (0 = greedy) "
                              "(fix: e.g. 0.7, or 0 for greedy).")
    if not _is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k={top_k!r}: must be an integer >= 0 (0 = no top-k filter) (fix: e.g. 50).")
    if not _is_real(top_p) or not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p!r}: must be a number in (0, 1] (1 = no nucleus filter) (fix: e.g. 0.9).")
    if not _is_int(seed):
        raise GenerationError(f"seed={seed!r}: must be an integer (fix: e.g. 0).")


class Generator:
    """Compiled prefill / decode / verify steps of one model (functional over ``nnx.split``), all
    through the model's own forward with its latent cache (``DeepSeekV3.__call__(..., cache=)``)."""

    def __init__(self, model: DeepSeekV3, mesh=None, ep_strategy: Optional[str] = None,
                 cache_dtype: str = CACHE_DTYPE, chunk: int = 16):
        """A model built for a mesh (``load_checkpoint(..., mesh=)``, ``DeepSeekV3(..., mesh=)``) runs
        with its parameters placed by its rules and its MoE layers expert-parallel; batches are padded
        to a multiple of the batch shards. ``mesh``/``ep_strategy`` rebuild a model for another layout.
        ``cache_dtype``: the latent cache's dtype (bf16 by default: attention reads it as stored and
        accumulates in fp32; ``"float32"`` for an exact cache). ``chunk``: decode steps per device call
        (tokens reach the host, and ``on_token``, once per chunk)."""
        if cache_dtype not in CACHE_DTYPES:
            raise GenerationError(f"cache_dtype={cache_dtype!r}: must be one of {list(CACHE_DTYPES)} "
                                  "(fix: e.g. cache_dtype='bfloat16', or 'float32' for an exact cache).")
        if not _is_int(chunk) or chunk < 1:
            raise GenerationError(f"chunk={chunk!r}: must be an integer >= 1 (decode steps per device call) "
                                  "(fix: e.g. chunk=16).")
        self.cache_dtype, self.chunk = cache_dtype, int(chunk)
        if mesh is not None or ep_strategy is not None:
            rt = model.runtime if ep_strategy is None else model.runtime.replace(ep_strategy=ep_strategy)
            model = model.with_runtime(rt, mesh=mesh if mesh is not None else model.mesh)
        self.cfg = model.cfg
        self.mesh, self.rules = model.mesh, model.rules
        self.graphdef, self.state = nnx.split(model)
        if self.mesh is not None:
            self.state = self.rules.place(self.state, self.mesh)
        g = self.graphdef

        @jax.jit
        def prefill(state, tokens, cache):
            out = nnx.merge(g, state)(tokens, cache=cache)
            return out.logits, out.hidden, out.cache

        @jax.jit
        def step(state, tokens, positions, cache):
            out = nnx.merge(g, state)(tokens, positions=positions, cache=cache)
            return out.logits, out.hidden, out.cache

        @jax.jit
        def mtp(state, hidden, next_tokens, positions, cache):
            """The MTP draft head (depth 1) at ``positions`` (None: a prompt from position 0)."""
            logits, _, cache = nnx.merge(g, state).mtp_forward(hidden, next_tokens[None], positions=positions,
                                                               cache=cache)
            return logits[0], cache

        @jax.jit
        def spec_step(state, nxt, draft, pos, cache):
            """Verify ``[nxt, draft]`` at ``pos, pos+1``; draft again from the accepted position."""
            two = pos[:, None] + jnp.arange(2, dtype=jnp.int32)
            logits, h, cache = self.step(state, jnp.stack([nxt, draft], 1), two, cache)
            a = greedy(logits)                                           # [B, 2]: both rows at once
            ok = a[:, 0] == draft
            # the MTP depth runs on both rows: row pos is always kept, row pos+1 only when the draft was
            # right (else the next step overwrites its cache entry); the draft comes from the last kept row
            mtp_logits, cache = self.mtp(state, h, a, two, cache)
            new_draft = greedy(jnp.where(ok[:, None], mtp_logits[:, 1], mtp_logits[:, 0]))
            return a[:, 0], a[:, 1], ok, new_draft, cache

        @functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
        def spec_sample_step(state, nxt, draft, q_logits, pos, cache, key, *, temperature, top_k, top_p):
            """Speculative sampling: verify the sampled ``draft`` (drawn from ``q_logits``) at ``pos+1``."""
            two = pos[:, None] + jnp.arange(2, dtype=jnp.int32)
            logits, h, cache = self.step(state, jnp.stack([nxt, draft], 1), two, cache)
            f = functools.partial(filter_logits, temperature=temperature, top_k=top_k, top_p=top_p)
            k_acc, k_next, k_draft = jax.random.split(key, 3)
            a1, ok = speculative_accept(k_acc, f(logits[:, 0]), q_logits, draft)
            a2 = jax.random.categorical(k_next, f(logits[:, 1])).astype(jnp.int32)  # used only if ok
            mtp_logits, cache = self.mtp(state, h, jnp.stack([a1, a2], 1), two, cache)
            new_q = jnp.where(ok[:, None], f(mtp_logits[:, 1]), f(mtp_logits[:, 0]))
            new_draft = jax.random.categorical(k_draft, new_q).astype(jnp.int32)
            return a1, a2, ok, new_draft, new_q, cache

        self.prefill, self.step, self.mtp = prefill, step, mtp
        # both call self.mtp at trace time, so a substituted draft head is honoured
        self.spec_step, self.spec_sample_step = spec_step, spec_sample_step
        # the on-device decode loop (decode_loop.py); looks the steps up at trace time, like spec_step
        self._run_chunk = build_chunk(lambda *a: self.step(*a), lambda *a: self.spec_step(*a),
                                      lambda *a, **k: self.spec_sample_step(*a, **k), sample,
                                      on_device=self.mesh is None)

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (),
                 speculative: Optional[str] = None, on_token: Optional[Callable[[int, int], None]] = None
                 ) -> GenerateResult:
        cfg = self.cfg
        prompts = _prompt_list(prompts)
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise GenerationError(f"prompt {empty[0]} is empty: every prompt needs at least one token "
                                  "(fix: pass a non-empty prompt).")
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if top_k >= cfg.vocab_size:
            top_k = 0                        # keeps every token: the same as no top-k filter
        try:
            stop_list = [t for t in stop_tokens]
        except TypeError:
            raise GenerationError(f"stop_tokens={stop_tokens!r}: must be a sequence of token ids "
                                  "(fix: e.g. stop_tokens=[1]).") from None
        bad = [t for t in stop_list if not _is_int(t)]
        if bad:
            raise GenerationError(f"stop_tokens holds {bad[0]!r} ({type(bad[0]).__name__}), expected integer "
                                  "token ids (fix: e.g. stop_tokens=[1]).")
        check_tokens(np.asarray(stop_list, np.int64), cfg.vocab_size, "stop_tokens")
        lengths = np.array([len(p) for p in prompts], np.int32)
        total = int(lengths.max()) + max_new_tokens
        if total > cfg.max_position_embeddings:
            raise GenerationError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                                  f"exceeds the model's context of {cfg.max_position_embeddings} tokens "
                                  "(fix: shorten the prompt or lower max_new_tokens).")
        if speculative not in (None, "mtp"):
            raise GenerationError(f"speculative={speculative!r}: only 'mtp' (or none) is supported.")
        if speculative and not cfg.num_mtp_layers:
            raise GenerationError("speculative='mtp' needs a model with an MTP module (num_mtp_layers >= 1).")
        n_real = len(prompts)
        if self.mesh is not None:  # pad the batch to a multiple of the batch shards (extra rows dropped)
            shards = self.rules.batch_shards(self.mesh)
            prompts = prompts + [prompts[-1]] * (-len(prompts) % shards)
            lengths = np.array([len(p) for p in prompts], np.int32)
        B, P = len(prompts), int(lengths.max())
        tokens = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        check_tokens(tokens, cfg.vocab_size, "prompt tokens")
        if self.mesh is not None:
            tokens = jax.device_put(tokens, self.rules.batch_sharding(self.mesh))
        # a mesh over several processes: the host-made values become replicated global arrays, and the
        # sampled tokens are read back from all processes (every process runs this loop alike)
        spread = self.mesh is not None and jax.process_count() > 1
        # on any mesh the host-made loop values are replicated over it: the decode loop's buffers are made
        # where its stop ids live (decode_loop.build_chunk), and one call may not mix device sets
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()) if self.mesh is not None else None
        glob = (lambda x: jax.device_put(x, rep)) if rep is not None else jnp.asarray  # noqa: E731
        host = distributed.host_value if spread else jax.device_get  # a pytree of arrays → numpy, one transfer
        make_cache = functools.partial(init_cache, cfg, B, total + 2, self.cache_dtype, mtp=bool(speculative))
        cache = jax.jit(make_cache, out_shardings=rep)() if spread else make_cache()
        logits, hidden, cache = self.prefill(self.state, tokens, cache)
        rows = glob(np.arange(B))
        last = glob(lengths - 1)
        key = jax.jit(lambda: jax.random.key(seed), out_shardings=rep)() if spread else jax.random.key(seed)
        key, sub = jax.random.split(key)
        nxt = sample(logits[rows, last], sub, temperature, top_k, top_p)
        out: list[list[int]] = [[] for _ in range(B)]
        stops = set(int(s) for s in stop_list)
        # the first token (from the prefill) is emitted here; the rest by the device loop, chunk by chunk
        done = np.zeros(B, bool)
        done[n_real:] = True  # padding rows of a sharded batch
        for b, t in enumerate(host(nxt)[:n_real]):
            out[b].append(int(t))
            if on_token is not None:
                on_token(b, int(t))
            done[b] = int(t) in stops or max_new_tokens <= 1

        sampling = temperature > 0
        draft, q_logits = jnp.zeros_like(nxt), None
        if speculative:
            # MTP drafts for the prompt: position i combines h_i with t_{i+1} (the sampled token at the end).
            shifted = jnp.asarray(tokens).at[:, :-1].set(jnp.asarray(tokens)[:, 1:])
            shifted = shifted.at[rows, last].set(nxt)
            mtp_logits, cache = self.mtp(self.state, hidden, shifted, None, cache)
            if sampling:
                q_logits = filter_logits(mtp_logits[rows, last], temperature, top_k, top_p)
                key, sub = jax.random.split(key)
                draft = jax.random.categorical(sub, q_logits).astype(jnp.int32)
            else:
                draft = greedy(mtp_logits[rows, last])
        # separate buffers: the loop state is donated, and one buffer may not be donated twice
        ls = LoopState(cache, nxt, glob(lengths), glob(np.ones(B, np.int32)), glob(done), key, draft, q_logits,
                       *(glob(np.int32(0)) for _ in range(3)))
        mode = "plain" if not speculative else ("spec_sample" if sampling else "spec")
        stop_ids, limit = glob(pad_stops(sorted(stops))), glob(np.int32(max_new_tokens))
        while not done.all():
            ls, buf, nbuf = self._run_chunk(self.state, ls, stop_ids, limit, chunk=self.chunk, mode=mode,
                                            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
            buf, nbuf, done = host((buf, nbuf, ls.done))
            for b in range(n_real):
                for t in buf[b, :nbuf[b]]:
                    out[b].append(int(t))
                    if on_token is not None:
                        on_token(b, int(t))
        steps, accepted, proposed = (int(v) for v in host((ls.steps, ls.accepted, ls.proposed)))
        if not speculative:
            return GenerateResult(out[:n_real], steps)
        return GenerateResult(out[:n_real], steps, accepted / max(1, proposed))


def generate(model_or_checkpoint, prompts: Sequence[Sequence[int]], **kw) -> GenerateResult:
    """``dsv3_jax.generate(model | (cfg, model) | checkpoint_dir, prompts, max_new_tokens=…,
    temperature=…, top_k=…, top_p=…, seed=…, stop_tokens=…, speculative=None|"mtp", cache_dtype=…, chunk=…)``."""
    model = model_or_checkpoint
    if isinstance(model, tuple) and len(model) == 2:
        model = model[1]
    elif isinstance(model, (str, os.PathLike)):
        model = load_checkpoint(model)[1]
    gen_kw = {k: kw.pop(k) for k in ("cache_dtype", "chunk") if k in kw}
    if not isinstance(model, DeepSeekV3):
        raise GenerationError(f"generate() takes a DeepSeekV3 model, a (cfg, model) pair or a checkpoint directory, "
                              f"got a {type(model_or_checkpoint).__name__} (fix: e.g. dsv3.generate('ckpt/', [[1, 2]])).")
    return Generator(model, **gen_kw)(prompts, **kw)
