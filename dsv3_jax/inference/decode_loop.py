"""The decode loop on the device: up to ``chunk`` steps per call, no host round trip per token
(docs/design.md §Decode loop).

One call runs a ``lax.while_loop`` of plain or speculative (MTP draft + verify) steps and writes the
tokens it emits into a ``[B, chunk]`` (plain) or ``[B, 2·chunk]`` (speculative) buffer; the host
reads that buffer once per chunk to stream tokens. The loop state (cache included) is donated, so
the cache is updated in place. Stop tokens and ``max_new_tokens`` are checked on the device: a
finished row stops emitting and stops moving (its position is frozen, so it never writes past the
cache it was given), and the loop ends early once every row is finished.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class LoopState(NamedTuple):
    cache: Any                   # ModelCache
    nxt: jax.Array               # [B] int32: the last emitted token, the next one fed
    pos: jax.Array               # [B] int32: the cache position ``nxt`` is fed at
    count: jax.Array             # [B] int32: tokens emitted so far
    done: jax.Array              # [B] bool: stop token seen or max_new_tokens reached (or a padding row)
    key: jax.Array               # PRNG key (sampling)
    draft: jax.Array             # [B] int32: the MTP draft of the token after ``nxt`` (speculative)
    q_logits: Optional[jax.Array]  # [B, V] fp32: the filtered distribution ``draft`` was drawn from (spec. sampling)
    accepted: jax.Array          # int32: drafts accepted (live rows)
    proposed: jax.Array          # int32: drafts proposed (live rows)
    steps: jax.Array             # int32: decode steps run


def pad_stops(stops: list[int]) -> jax.Array:
    """Stop ids as a small int32 array padded with -1 (never a token id) to a multiple of 8, so a few
    stop lists share one compiled loop."""
    n = max(8, -(-len(stops) // 8) * 8)
    return jnp.asarray(list(stops) + [-1] * (n - len(stops)), jnp.int32)


def _step_fn(step: Callable, spec_step: Callable, spec_sample_step: Callable, sample: Callable, *, mode: str,
             temperature: float, top_k: int, top_p: float) -> Callable:
    """One decode step on the loop state: ``(state, ls, buf, nbuf, stops, max_new) -> (ls, buf, nbuf)``,
    appending what each live row emits to ``buf [B, W]`` at ``nbuf [B]``."""
    def put(tok, live, buf, nbuf, count, done, stops, max_new):
        rows = jnp.arange(buf.shape[0])
        at = jnp.minimum(nbuf, buf.shape[1] - 1)
        buf = buf.at[rows, at].set(jnp.where(live, tok, buf[rows, at]))
        count = count + live
        done = done | (live & (jnp.isin(tok, stops) | (count >= max_new)))
        return buf, nbuf + live, count, done

    def one(state, ls: LoopState, buf, nbuf, stops, max_new):
        live = ~ls.done
        key, sub = jax.random.split(ls.key)
        if mode == "plain":
            logits, _, cache = step(state, ls.nxt[:, None], ls.pos[:, None], ls.cache)
            tok = sample(logits[:, 0], sub, temperature, top_k, top_p)
            buf, nbuf, count, done = put(tok, live, buf, nbuf, ls.count, ls.done, stops, max_new)
            return ls._replace(cache=cache, nxt=tok, pos=ls.pos + live, count=count, done=done, key=key,
                               steps=ls.steps + jnp.any(live)), buf, nbuf
        if mode == "spec":
            a1, a2, ok, draft, cache = spec_step(state, ls.nxt, ls.draft, ls.pos, ls.cache)
            q = ls.q_logits
        else:
            a1, a2, ok, draft, q, cache = spec_sample_step(
                state, ls.nxt, ls.draft, ls.q_logits, ls.pos, ls.cache, sub,
                temperature=temperature, top_k=top_k, top_p=top_p)
        # a1 (the verified token at pos+1) always; a2 too when the draft was right and the row goes on
        buf, nbuf, count, done = put(a1, live, buf, nbuf, ls.count, ls.done, stops, max_new)
        buf, nbuf, count, done = put(a2, live & ok & ~done, buf, nbuf, count, done, stops, max_new)
        return ls._replace(cache=cache, nxt=jnp.where(ok, a2, a1), pos=ls.pos + jnp.where(live, 1 + ok, 0),
                           count=count, done=done, key=key, draft=draft, q_logits=q,
                           accepted=ls.accepted + jnp.sum(ok & live), proposed=ls.proposed + jnp.sum(live),
                           steps=ls.steps + jnp.any(live)), buf, nbuf
    return one


def build_chunk(step: Callable, spec_step: Callable, spec_sample_step: Callable, sample: Callable,
                on_device: bool = True) -> Callable:
    """``run(state, ls, stops, max_new, *, chunk, mode, temperature, top_k, top_p) -> (ls, buf, nbuf)``
    with ``ls`` donated. ``mode``: ``"plain"``, ``"spec"`` (greedy verify) or ``"spec_sample"``.
    ``buf [B, W]`` holds each row's tokens emitted in this call, ``nbuf [B]`` how many.

    ``on_device``: the ``chunk`` steps run as one ``lax.while_loop`` that ends early when every row is
    done. Otherwise (a mesh: an expert-parallel step, whose exchange takes a ``cond`` per expert group
    with collectives inside, stays the program it was tested as) each step is its own jitted call,
    dispatched asynchronously ``chunk`` times before the host reads the buffer: still one host round
    trip per chunk."""
    statics = ("mode", "temperature", "top_k", "top_p")
    fns = (step, spec_step, spec_sample_step, sample)

    def width(B, chunk, mode):
        return (B, chunk if mode == "plain" else 2 * chunk)

    @functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("chunk",) + statics)
    def loop(state, ls: LoopState, stops, max_new, *, chunk: int, mode: str, temperature: float, top_k: int,
             top_p: float):
        one = _step_fn(*fns, mode=mode, temperature=temperature, top_k=top_k, top_p=top_p)

        def body(carry):
            i, ls, buf, nbuf = carry
            return (i + 1,) + one(state, ls, buf, nbuf, stops, max_new)

        def cond(carry):
            return (carry[0] < chunk) & ~jnp.all(carry[1].done)

        B = ls.nxt.shape[0]
        carry = (jnp.int32(0), ls, jnp.zeros(width(B, chunk, mode), jnp.int32), jnp.zeros((B,), jnp.int32))
        _, ls, buf, nbuf = jax.lax.while_loop(cond, body, carry)
        return ls, buf, nbuf

    @functools.partial(jax.jit, donate_argnums=(1, 2, 3), static_argnames=statics)
    def single(state, ls, buf, nbuf, stops, max_new, *, mode: str, temperature: float, top_k: int, top_p: float):
        return _step_fn(*fns, mode=mode, temperature=temperature, top_k=top_k, top_p=top_p)(
            state, ls, buf, nbuf, stops, max_new)

    if on_device:
        return loop

    def stepped(state, ls, stops, max_new, *, chunk: int, **kw):
        B = ls.nxt.shape[0]
        zeros = jax.jit(lambda: (jnp.zeros(width(B, chunk, kw["mode"]), jnp.int32), jnp.zeros((B,), jnp.int32)),
                        out_shardings=stops.sharding)
        buf, nbuf = zeros()
        for _ in range(chunk):
            ls, buf, nbuf = single(state, ls, buf, nbuf, stops, max_new, **kw)
        return ls, buf, nbuf
    return stepped


__all__ = ["LoopState", "build_chunk", "pad_stops"]
