"""The pipeline schedule simulator: lays a schedule's per-device work lists on a timeline and measures it.

Every item starts as soon as its device is free (in the device's own order) and the inputs of its ops
exist; messages between neighbouring devices take no time (docs/pipeline.md §Simulator). Dependencies:
``F(m, s)`` needs ``F(m, s-1)`` of the same chunk; the backward (``B`` or ``I``) of ``(m, s)`` needs
``F(m, s)`` and the backward of ``(m, s+1)`` (the last stage computes the loss, so it needs only its own
forward); ``W(m, s)`` needs ``I(m, s)``.

Durations: ``f`` a forward chunk, ``b`` a full backward chunk, ``w`` its weight-gradient half (so the
input-gradient half ``I`` takes ``b - w``), ``fb`` a forward and a full backward chunk run overlapped (a pair
with a split backward takes ``fb - w``). Times may be ints, floats or ``Fraction``s (exact), or sympy
expressions whose assumptions decide every comparison the layout makes (e.g. ``f = W + P`` with positive
``W, P`` says ``W <= F``); an undecidable comparison is a ``PipelineConfigError``, never a guess.

The report's bubble table (docs/architecture.md §9) holds exactly under its assumptions, which the tests
check symbolically and with random Fractions (docs/pipeline.md §Assumptions): 1F1B and GPipe always; ZB1P
when ``w <= f`` and ``w <= b - w`` (a deferred W fits the gap it fills); DualPipe when ``b - w == f``,
``w <= f`` and ``max(f, b) <= fb <= f + b``, with at least ``2 pp`` micro-batches. Other times give what the
schedule does, not the formula.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from numbers import Real
from typing import Any, Callable, Optional

from dsv3_jax.errors import PipelineConfigError
from dsv3_jax.pipeline.plot import plot_timeline
from dsv3_jax.pipeline.schedules import Item, Op, device_ops, stage_of


@dataclasses.dataclass(frozen=True)
class Event:
    """One work item as laid out: which device, when it starts and ends, and its op(s)."""
    device: int
    start: Any
    end: Any
    ops: Item


@dataclasses.dataclass
class Timeline:
    """A simulated schedule. ``bubble`` is the report's bubble figure: the idle time of the device that idles
    most (for 1F1B, ZB1P and GPipe every device idles alike). ``bubbles[d]`` is device d's idle time
    (makespan minus its busy time), ``activations[d]`` its peak number of stashed micro-batch chunks (a
    forward's activations stay until that chunk's weight gradient, ``B`` or ``W``, has finished),
    ``param_copies`` the stage copies each device holds (2 for DualPipe)."""
    schedule: str
    pp: int
    microbatches: int
    events: list[Event]
    bubble: Any
    bubbles: list[Any]
    param_copies: int
    activations: list[int]
    makespan: Any

    def ticks(self) -> list[list[Optional[Item]]]:
        """The schedule on an integer grid, every item taking one tick: ``ticks[t][device]`` is the item the
        device runs at tick ``t``, or ``None`` when it idles. This is the table the executor runs (an item at
        tick t sends its outputs to the neighbour, which may use them from tick t+1)."""
        unit = _layout(self.schedule, self.pp, self.microbatches, lambda item: 1)
        grid: list[list[Optional[Item]]] = [[None] * self.pp for _ in range(max(e.end for e in unit))]
        for e in unit:
            grid[e.start][e.device] = e.ops
        return grid

    def plot(self, path: str, *, title: Optional[str] = None) -> None:
        """Draw the timeline as a PNG (one row per device, like the report's DualPipe figure)."""
        plot_timeline(self, path, title=title)


def _durations(f, b, w, fb) -> Callable[[Item], Any]:
    table = {"F": f, "B": b, "I": b - w, "W": w}

    def duration(item: Item) -> Any:
        if len(item) == 1:
            return table[item[0].kind]
        kinds = sorted(op.kind for op in item)
        if kinds == ["B", "F"]:
            return fb
        if kinds == ["F", "I"]:
            return fb - w
        raise PipelineConfigError(f"an overlapped item must be a forward and a backward, got {item} "
                                  "(fix: pair one F with one B or I)")
    return duration


def _max(values: list) -> Any:
    try:
        return max(values)
    except TypeError:  # sympy: the symbols' assumptions do not decide which time is later
        shown = ", ".join(map(str, values[:4])) + (", ..." if len(values) > 4 else "")
        raise PipelineConfigError(f"simulate: cannot tell which of the symbolic times {shown} is latest (fix: "
                                  "pass numbers, or symbols whose assumptions order them, e.g. F = W + P with "
                                  "P positive for W <= F)") from None


def _deps(op: Op, device: int, pp: int) -> list[tuple[str, int, int, int]]:
    """Keys (done-kind, micro-batch, chunk, stage) that must have finished before ``op`` may start."""
    s = stage_of(op.chunk, device, pp)
    m, c = op.microbatch, op.chunk
    if op.kind == "F":
        return [("F", m, c, s - 1)] if s > 0 else []
    if op.kind in ("B", "I"):
        return [("F", m, c, s)] + ([("X", m, c, s + 1)] if s < pp - 1 else [])
    return [("X", m, c, s)]  # W needs its own I


_DONE = {"F": ("F",), "B": ("X", "W"), "I": ("X",), "W": ("W",)}  # X: input gradient done, W: weight gradient


def _done_keys(op: Op, device: int, pp: int) -> list[tuple[str, int, int, int]]:
    s = stage_of(op.chunk, device, pp)
    return [(k, op.microbatch, op.chunk, s) for k in _DONE[op.kind]]


def _layout(schedule: str, pp: int, microbatches: int, duration: Callable[[Item], Any]) -> list[Event]:
    """List-schedule every device's items in order, each as early as its device and its inputs allow."""
    lists = device_ops(schedule, pp, microbatches)
    done: dict[tuple, Any] = {}
    nxt, free = [0] * pp, [0] * pp
    events: list[Event] = []
    remaining = sum(map(len, lists))
    while remaining:
        progressed = False
        for d in range(pp):
            while nxt[d] < len(lists[d]):
                item = lists[d][nxt[d]]
                deps = [k for op in item for k in _deps(op, d, pp)]
                if any(k not in done for k in deps):
                    break
                start = _max([free[d]] + [done[k] for k in deps])
                end = start + duration(item)
                for op in item:
                    for k in _done_keys(op, d, pp):
                        if k in done:
                            raise PipelineConfigError(f"{schedule}: {op} runs twice on device {d} (a schedule bug)")
                        done[k] = end
                events.append(Event(d, start, end, item))
                free[d], nxt[d] = end, nxt[d] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {d: lists[d][nxt[d]] for d in range(pp) if nxt[d] < len(lists[d])}
            raise PipelineConfigError(f"{schedule}: the work lists deadlock at {stuck} (a schedule bug)")
    return events


def _check_number(name: str, v: Any) -> None:
    if isinstance(v, (Real, Fraction)) and not isinstance(v, bool):
        if v < 0:
            raise PipelineConfigError(f"simulate: {name} = {v} is negative (fix: pass a duration >= 0)")
        return
    try:
        import sympy
    except ImportError:
        sympy = None
    if sympy is None or not isinstance(v, sympy.Expr):
        raise PipelineConfigError(f"simulate: {name} = {v!r} is not a number (fix: pass an int, float, Fraction"
                                  " or sympy expression)")


def simulate(schedule: str, *, pp: int, microbatches: int, f=1, b=2, w=1, fb=None) -> Timeline:
    """Simulate ``schedule`` on ``pp`` devices with ``microbatches`` micro-batches and the given chunk times
    (``fb`` defaults to ``f + b``: no overlap gain). See the module docstring for the timing model."""
    for name, v in (("f", f), ("b", b), ("w", w)) + ((("fb", fb),) if fb is not None else ()):
        _check_number(name, v)
    fb = f + b if fb is None else fb
    if isinstance(w, Real) and isinstance(b, Real) and w > b:
        raise PipelineConfigError(f"simulate: w = {w} exceeds b = {b}, but the weight gradient is part of the full "
                                  "backward (fix: pass 0 <= w <= b)")
    duration = _durations(f, b, w, fb)
    events = _layout(schedule, pp, microbatches, duration)
    last = {e.device: e.end for e in events}  # events are appended in each device's order
    makespan = _max([last[d] for d in range(pp)])
    busy = [sum((duration(e.ops) for e in events if e.device == d), 0) for d in range(pp)]
    bubbles = [makespan - x for x in busy]
    return Timeline(schedule=schedule, pp=pp, microbatches=microbatches, events=events, bubble=_max(bubbles),
                    bubbles=bubbles, param_copies=2 if schedule == "dualpipe" else 1,
                    activations=[_peak_stash(events, d) for d in range(pp)], makespan=makespan)


def _peak_stash(events: list[Event], device: int) -> int:
    """Peak number of micro-batch chunks whose forward has started and whose weight gradient has not ended.
    A device's items run one after another, so item order is time order; a chunk released at the end of one
    item frees its buffer before the next item's forward starts (no time comparisons: works for symbols)."""
    peak = level = 0
    for e in (e for e in events if e.device == device):
        level += sum(op.kind == "F" for op in e.ops)
        peak = max(peak, level)
        level -= sum(op.kind in ("B", "W") for op in e.ops)
    return peak
