"""Pipeline schedules as static per-device work lists (pure Python, no JAX).

A schedule says, for every device of a ``pp``-deep pipeline, the order in which it runs the forward and
backward chunks of ``microbatches`` micro-batches (docs/architecture.md §9, docs/pipeline.md). The simulator
(``simulate.py``) turns these lists into a timeline; the executor runs the same lists tick by tick.

Four schedules:

* ``gpipe`` — all forwards, then all backwards (the comparison baseline; activations = micro-batches).
* ``1f1b`` — device d warms up with ``pp-1-d`` forwards, then alternates one forward and one backward,
  then drains the remaining backwards.
* ``zb1p`` — zero-bubble H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split
  into the input-gradient half ``I`` (on the critical path) and the weight-gradient half ``W`` (off it).
  Device d keeps ``d`` weight-gradient halves pending, which is exactly the slack its 1F1B peak of ``pp-d``
  stashed micro-batches leaves under device 0's ``pp``; the pending ``W``s fill the cool-down bubbles.
* ``dualpipe`` — DeepSeek-V3's bidirectional schedule (docs/architecture.md §9): micro-batches
  ``0..M/2-1`` enter at device 0 and run the stages forward (chunk 0), micro-batches ``M/2..M-1`` enter at
  device ``pp-1`` and run them in reverse device order (chunk 1); every device holds two stages (stage d of
  chunk 0 and stage ``pp-1-d`` of chunk 1, hence two parameter copies) and, in its main phase, overlaps the
  forward of one chunk with the full backward of the other. The phase order (eight phases per device:
  forwards, forward pairs of both chunks, zero-bubble backwards, overlapped forward/backward pairs,
  backward pairs, deferred weight gradients) follows the public reference description of the schedule;
  devices in the second half mirror the first half with the chunks swapped.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from dsv3_jax.errors import PipelineConfigError

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe")
KINDS = ("F", "B", "I", "W")


@dataclasses.dataclass(frozen=True)
class Op:
    """One chunk of work for one micro-batch on one device.

    ``kind``: ``"F"`` forward, ``"B"`` full backward (input and weight gradients), ``"I"`` the input-gradient
    half of a split backward, ``"W"`` its weight-gradient half. ``chunk``: 0 for the forward-direction pipeline
    (device d runs stage d), 1 for DualPipe's reverse pipeline (device d runs stage ``pp-1-d``)."""
    kind: str
    microbatch: int
    chunk: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PipelineConfigError(f"pipeline op kind {self.kind!r} is unknown (fix: use one of {list(KINDS)})")
        if self.chunk not in (0, 1):
            raise PipelineConfigError(f"pipeline op chunk {self.chunk!r} is not 0 or 1 (fix: 0 is the forward "
                                      "direction, 1 DualPipe's reverse direction)")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + ("'" if self.chunk else "")


Item = tuple[Op, ...]  # one Op, or (F op, B-or-I op) run overlapped on one device (DualPipe)


def stage_of(chunk: int, device: int, pp: int) -> int:
    """The pipeline stage that ``device`` runs for ``chunk``: chunk 0 runs stage ``device``, chunk 1 (DualPipe's
    reverse pipeline) runs stage ``pp-1-device``."""
    return device if chunk == 0 else pp - 1 - device


def device_of(chunk: int, stage: int, pp: int) -> int:
    """The device that runs ``stage`` of ``chunk`` (the inverse of :func:`stage_of`)."""
    return stage if chunk == 0 else pp - 1 - stage


def check(schedule: str, pp: int, microbatches: int) -> None:
    """Raise ``PipelineConfigError`` naming the fix when ``schedule``/``pp``/``microbatches`` cannot run."""
    if schedule not in SCHEDULES:
        raise PipelineConfigError(f"pipeline.schedule {schedule!r} is unknown (fix: use one of {list(SCHEDULES)})")
    for name, v in (("pipeline stages (pp)", pp), ("pipeline.microbatches", microbatches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PipelineConfigError(f"{name} = {v!r} is not a positive integer (fix: pass a whole number >= 1)")
    if microbatches < pp:
        raise PipelineConfigError(f"pipeline.microbatches = {microbatches} is fewer than the {pp} stages, so some "
                                  f"stage would never be busy (fix: use at least {pp} micro-batches)")
    if schedule == "dualpipe":
        if pp % 2:
            raise PipelineConfigError(f"dualpipe needs an even number of stages, got {pp} (fix: use {pp + 1} or "
                                      f"{max(pp - 1, 2)} stages, or another schedule)")
        if microbatches % 2:
            raise PipelineConfigError(f"dualpipe feeds half the micro-batches from each end, so it needs an even "
                                      f"number, got {microbatches} (fix: use {microbatches + 1})")
        if microbatches < 2 * pp:
            raise PipelineConfigError(f"dualpipe needs at least 2 x stages = {2 * pp} micro-batches, got "
                                      f"{microbatches} (fix: raise pipeline.microbatches to {2 * pp})")


def device_ops(schedule: str, pp: int, microbatches: int) -> list[list[Item]]:
    """Per device, its ordered work items; an item is one ``Op``, or two Ops run overlapped (DualPipe's
    forward-and-backward pair: ``(F op, B op)`` of different chunks). Raises ``PipelineConfigError`` naming
    the fix for an unknown schedule, fewer micro-batches than stages, or (DualPipe) odd ``pp``, odd
    micro-batches or fewer than ``2*pp`` micro-batches."""
    check(schedule, pp, microbatches)
    build = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "zb1p": _zb1p, "dualpipe": _dualpipe}[schedule]
    return [build(d, pp, microbatches) for d in range(pp)]


def _gpipe(d: int, pp: int, m: int) -> list[Item]:
    return [(Op("F", i),) for i in range(m)] + [(Op("B", i),) for i in range(m)]


def _one_f_one_b(d: int, pp: int, m: int) -> list[Item]:
    warm = pp - 1 - d
    items: list[Item] = [(Op("F", i),) for i in range(warm)]
    for i in range(m - warm):
        items += [(Op("F", warm + i),), (Op("B", i),)]
    items += [(Op("B", i),) for i in range(m - warm, m)]
    return items


def _zb1p(d: int, pp: int, m: int) -> list[Item]:
    # Device d lets d weight-gradient halves wait (its activation slack under device 0's pp, see the module
    # docstring); each W runs as soon as more than d are pending, the rest fill the tail.
    warm = pp - 1 - d
    items: list[Item] = [(Op("F", i),) for i in range(warm)]
    pending: deque[int] = deque()

    def backward(i: int) -> None:
        items.append((Op("I", i),))
        pending.append(i)
        if len(pending) > d:
            items.append((Op("W", pending.popleft()),))

    for i in range(m - warm):
        items.append((Op("F", warm + i),))
        backward(i)
    for i in range(m - warm, m):
        backward(i)
    items += [(Op("W", i),) for i in pending]
    return items


def _dualpipe(rank: int, pp: int, m: int) -> list[Item]:
    """DualPipe's per-device order. ``phase`` 0/1 are the device's "own" and "other" directions: for the first
    half of the devices phase 0 is chunk 0, for the second half (mirrored) it is chunk 1."""
    half_pp, half_m = pp // 2, m // 2
    h = min(rank, pp - 1 - rank)  # distance from the nearer end
    middle = h == half_pp - 1
    swap = int(rank >= half_pp)
    next_f, next_b = [0, 0], [0, 0]  # per chunk: the next micro-batch (within the chunk) to run F / backward
    weights: deque[Op] = deque()     # deferred W halves, first in first out
    items: list[Item] = []

    def mb(chunk: int, k: int) -> int:  # global micro-batch number: chunk 1 holds M/2..M-1
        return chunk * half_m + k

    def fwd(phase: int) -> Op:
        c = phase ^ swap
        op = Op("F", mb(c, next_f[c]), c)
        next_f[c] += 1
        return op

    def bwd(phase: int, split: bool = False) -> Op:
        c = phase ^ swap
        k = mb(c, next_b[c])
        next_b[c] += 1
        if split:
            weights.append(Op("W", k, c))
        return Op("I" if split else "B", k, c)

    def F(phase): items.append((fwd(phase),))
    def B(phase, split=False): items.append((bwd(phase, split),))
    def FB(p0, p1): items.append((fwd(p0), bwd(p1)))
    def W(): items.append((weights.popleft(),))

    for _ in range(2 * (half_pp - h - 1)):        # 1: forwards of the own direction
        F(0)
    for _ in range(h + 1):                         # 2: forward pairs of both directions
        F(0)
        F(1)
    for _ in range(half_pp - h - 1):               # 3: zero-bubble backward, weights, forward (other dir.)
        B(1, split=True)
        W()
        F(1)
    for i in range(half_m - pp + h + 1):           # 4: main phase, overlapped forward/backward pairs
        if i == 0 and middle:                      # the reference runs this first pair unoverlapped
            F(0)
            B(1)
        else:
            FB(0, 1)
        FB(1, 0)
    for _ in range(half_pp - h - 1):               # 5: backward, then an overlapped pair
        B(1)
        FB(1, 0)
    zb = False
    for i in range(h + 1):                         # 6: backwards of both directions, later half split
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        B(1, zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        B(0, zb)
    for _ in range(half_pp - h - 1):               # 7: a deferred weight, then a split backward
        W()
        B(0, split=True)
    while weights:                                 # 8: the remaining deferred weights
        W()
    return items
