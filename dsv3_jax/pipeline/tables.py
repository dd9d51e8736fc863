"""The static tables the pipelined train step runs from (docs/design.md §Pipeline).

A schedule's unit-time timeline (``simulate(..., f=1, b=1, w=1, fb=1).ticks()``) says what each device
does at each tick. From it this module derives, in plain Python before tracing:

* which branch each device takes at each tick (a *combo*: the tuple of ``(kind, chunk)`` it runs,
  ``()`` when idle) and the micro-batch of each of its ops;
* where every stage input and every output gradient waits between its arrival and its last use: a
  *slot* in a per-chunk stash, assigned by interval colouring so that a stash holds only as many
  micro-batches as are alive at once on the busiest device;
* into which slot a message arriving at the end of a tick is written (or nowhere).

Conventions: a message sent at tick ``t`` (an F's output to the next stage, a B's or I's input
gradient to the previous one) is written into its slot after the ops of tick ``t`` have run, so it can
take the slot of a value whose last read is at tick ``t``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from .schedules import Op, device_of, stage_of

OPS = ("-", "F", "B", "I", "W")   # kind codes of the tables (0: no op)


@dataclasses.dataclass(frozen=True)
class TickTables:
    """Per tick ``t`` and device ``d`` (numpy arrays, ``T = n_ticks``, ``PP`` devices, ``C`` chunks):

    ``combo [T, PP]``: index into ``combos`` (0: idle); ``kind/chunk [T, PP, 2]``: the item's ops
    (kind: index into ``OPS``, 0 = none); ``mb [T, PP, 2]``: their micro-batches; ``x_slot/g_slot [T, PP, 2]``: stash slot of the op's stage input / output gradient (the
    stash size when the op has none); ``recv_x/recv_g [T, PP, C]``: slot receiving the activation /
    gradient that arrives for chunk c at the end of tick t (the stash size: nothing arrives)."""
    pp: int
    chunks: int
    combos: tuple
    combo: np.ndarray
    kind: np.ndarray
    chunk: np.ndarray
    mb: np.ndarray
    x_slot: np.ndarray
    g_slot: np.ndarray
    recv_x: np.ndarray
    recv_g: np.ndarray
    n_x: tuple
    n_g: tuple

    @property
    def n_ticks(self) -> int:
        return self.combo.shape[0]


def _colour(intervals: dict, n_dev: int) -> tuple[dict, int]:
    """Greedy interval colouring per device: ``intervals[(d, key)] = (write_tick, last_read_tick)``;
    a slot is free for a value written at tick w once its occupant's last read is at a tick <= w.
    Returns (slot of each key, slots needed on the busiest device)."""
    slots, need = {}, 0
    for d in range(n_dev):
        items = sorted(((w, e, k) for (dd, k), (w, e) in intervals.items() if dd == d), key=lambda x: (x[0], x[1]))
        free_at: list[int] = []          # per slot: last read tick of its current occupant
        for w, e, k in items:
            for i, busy_until in enumerate(free_at):
                if busy_until <= w:
                    free_at[i] = e
                    slots[(d, k)] = i
                    break
            else:
                slots[(d, k)] = len(free_at)
                free_at.append(e)
        need = max(need, len(free_at))
    return slots, need


def build_tables(ticks: Sequence[Sequence[Optional[tuple]]], pp: int) -> TickTables:
    """The tables of a unit-time timeline ``ticks[t][d]`` (an item: a tuple of ``Op``, or None)."""
    T = len(ticks)
    where: dict = {}                                   # (kind, chunk, m, stage) -> (tick, device)
    chunks = 1
    for t, row in enumerate(ticks):
        for d, item in enumerate(row):
            for op in item or ():
                op = op if isinstance(op, Op) else Op(*op)
                chunks = max(chunks, op.chunk + 1)
                where[(op.kind, op.chunk, op.microbatch, stage_of(op.chunk, d, pp))] = (t, d)

    def tick(kind, c, m, s):
        return where[(kind, c, m, s)][0] if (kind, c, m, s) in where else None

    def backward_tick(c, m, s):          # the op that makes the input gradient: B, or I of a split backward
        return tick("B", c, m, s) if tick("B", c, m, s) is not None else tick("I", c, m, s)

    def last_use(c, m, s):
        return max(x for x in (tick("F", c, m, s), backward_tick(c, m, s), tick("W", c, m, s)) if x is not None)

    x_iv, g_iv = {}, {}
    for (kind, c, m, s), (t, d) in where.items():
        if kind != "F":
            continue
        if s > 0:                        # the input arrives from stage s-1 at the end of its F
            x_iv[(d, (c, m))] = (tick("F", c, m, s - 1), last_use(c, m, s))
        if s < pp - 1:                   # the output gradient arrives from stage s+1
            g_iv[(d, (c, m))] = (backward_tick(c, m, s + 1),
                                 max(x for x in (backward_tick(c, m, s), tick("W", c, m, s)) if x is not None))
    x_slots, n_x = _colour(x_iv, pp)
    g_slots, n_g = _colour(g_iv, pp)
    # one stash per chunk, sized by the busiest device (the program is the same on every device)
    n_xc = tuple(max([x_slots[(d, k)] + 1 for (d, k) in x_slots if k[0] == c] or [0]) for c in range(chunks))
    n_gc = tuple(max([g_slots[(d, k)] + 1 for (d, k) in g_slots if k[0] == c] or [0]) for c in range(chunks))

    combos: list[tuple] = [()]
    combo = np.zeros((T, pp), np.int32)
    kind = np.zeros((T, pp, 2), np.int32)
    chunk = np.zeros((T, pp, 2), np.int32)
    mb = np.zeros((T, pp, 2), np.int32)
    x_slot = np.zeros((T, pp, 2), np.int32)
    g_slot = np.zeros((T, pp, 2), np.int32)
    recv_x = np.zeros((T, pp, chunks), np.int32) + np.asarray(n_xc, np.int32)
    recv_g = np.zeros((T, pp, chunks), np.int32) + np.asarray(n_gc, np.int32)
    for t, row in enumerate(ticks):
        for d, item in enumerate(row):
            ops = tuple(op if isinstance(op, Op) else Op(*op) for op in (item or ()))
            key = tuple((op.kind, op.chunk) for op in ops)
            if key not in combos:
                combos.append(key)
            combo[t, d] = combos.index(key)
            for j, op in enumerate(ops):
                c, m = op.chunk, op.microbatch
                kind[t, d, j], chunk[t, d, j], mb[t, d, j] = OPS.index(op.kind), c, m
                x_slot[t, d, j] = x_slots.get((d, (c, m)), n_xc[c])
                g_slot[t, d, j] = g_slots.get((d, (c, m)), n_gc[c])
                s = stage_of(c, d, pp)
                if op.kind == "F" and s < pp - 1:      # its output lands on the device of stage s+1
                    dn = device_of(c, s + 1, pp)
                    recv_x[t, dn, c] = x_slots[(dn, (c, m))]
                if op.kind in ("B", "I") and s > 0:    # its input gradient lands on the device of stage s-1
                    dp = device_of(c, s - 1, pp)
                    recv_g[t, dp, c] = g_slots[(dp, (c, m))]
    return TickTables(pp, chunks, tuple(combos), combo, kind, chunk, mb, x_slot, g_slot, recv_x, recv_g, n_xc, n_gc)


def in_flight(tables: TickTables) -> list[int]:
    """Peak in-flight micro-batches per device read off the tables (an F starts one; a full B, or the
    W of a split backward, ends it; an item's ops count as running together)."""
    out = []
    for d in range(tables.pp):
        live = peak = 0
        for t in range(tables.n_ticks):
            kinds = [k for k, _ in tables.combos[tables.combo[t, d]]]
            live += kinds.count("F")
            peak = max(peak, live)
            live -= kinds.count("B") + kinds.count("W")
        out.append(peak)
    return out


__all__ = ["TickTables", "build_tables", "in_flight", "OPS"]
