"""The pipeline schedules and their simulator (docs/pipeline.md): every schedule is complete and respects its
dependencies, and the simulator reproduces the report's bubble / parameter / activation table
(docs/architecture.md §9) exactly, with Fraction arithmetic (no tolerance), under the stated assumptions."""
import random
from collections import Counter
from fractions import Fraction as Fr

import pytest
import sympy

import dsv3_jax
from dsv3_jax.errors import Dsv3Error, PipelineConfigError
from dsv3_jax.pipeline import SCHEDULES, Op, device_ops, simulate, stage_of
from dsv3_jax.pipeline.simulate import _deps, _done_keys

# (pp, micro-batches): several depths, the report's PP 8 x 20, the DualPipe minimum 2*PP, and odd M for 1F1B
SHAPES = [(4, 8), (4, 10), (8, 16), (8, 20), (16, 32), (16, 36)]


def _times(seed: int, n: int = 3, *, i_equals_f: bool):
    """Random exact chunk times with 0 < W <= F and W <= I = B - W (I = F when asked), F&B in [max(F,B), F+B]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        f = Fr(rng.randint(2, 40), rng.randint(1, 4))
        w = f * Fr(rng.randint(1, 10), 10)
        i = f if i_equals_f else max(w, f * Fr(rng.randint(3, 30), 10))
        b = i + w
        fb = max(f, b) + (f + b - max(f, b)) * Fr(rng.randint(0, 10), 10)
        out.append((f, b, w, fb))
    return out


def _all_cases():
    for sched in SCHEDULES:
        for pp, m in SHAPES:
            if sched == "dualpipe" and (m % 2 or m < 2 * pp):
                continue
            yield sched, pp, m
    yield "1f1b", 4, 4   # micro-batches == stages: the least that is allowed
    yield "zb1p", 8, 13


@pytest.mark.parametrize("sched,pp,m", list(_all_cases()))
def test_every_microbatch_once_and_dependencies_hold(sched, pp, m):
    f, b, w, fb = Fr(3), Fr(7), Fr(2), Fr(8)
    t = simulate(sched, pp=pp, microbatches=m, f=f, b=b, w=w, fb=fb)
    # exactly one F and one backward (B, or I and W) per (micro-batch, stage); the chunk is the direction
    chunks = (lambda mb: int(mb >= m // 2)) if sched == "dualpipe" else (lambda mb: 0)
    seen = Counter()
    for e in t.events:
        assert 1 <= len(e.ops) <= 2
        if len(e.ops) == 2:
            assert sched == "dualpipe" and sorted(op.kind for op in e.ops) == ["B", "F"]
            assert e.ops[0].chunk != e.ops[1].chunk
        for op in e.ops:
            assert op.chunk == chunks(op.microbatch)
            seen[op.kind, op.microbatch, stage_of(op.chunk, e.device, pp)] += 1
    for mb in range(m):
        for s in range(pp):
            assert seen["F", mb, s] == 1
            assert (seen["B", mb, s], seen["I", mb, s], seen["W", mb, s]) in ((1, 0, 0), (0, 1, 1))
    assert sum(seen.values()) == sum(len(e.ops) for e in t.events)
    # dependencies: every input finished before the item starts; and the item starts as soon as it may
    end = {k: e.end for e in t.events for op in e.ops for k in _done_keys(op, e.device, pp)}
    per_device = {d: sorted((e for e in t.events if e.device == d), key=lambda e: e.start) for d in range(pp)}
    for d, evs in per_device.items():
        free = 0
        for e in evs:
            ready = max([free] + [end[k] for op in e.ops for k in _deps(op, d, pp)])
            assert e.start == ready  # never before its inputs / its device; never later than both
            assert e.start >= free   # no device runs two items at once
            free = e.end
        # the device runs its items in the order device_ops gave
        assert [e.ops for e in evs] == device_ops(sched, pp, m)[d]


@pytest.mark.parametrize("pp,m", SHAPES)
def test_report_table_1f1b_zb1p_gpipe(pp, m):
    # ZB1P's (PP-1)(F+B-2W) is Qi et al.'s H1 bubble; it needs the deferred W to fit the gaps: W <= F, W <= B-W
    for f, b, w, fb in _times(pp * 100 + m, i_equals_f=False):
        for sched, bubble, acts in (("1f1b", (pp - 1) * (f + b), [pp - d for d in range(pp)]),
                                    ("zb1p", (pp - 1) * (f + b - 2 * w), [pp] * pp),
                                    ("gpipe", (pp - 1) * (f + b), [m] * pp)):
            t = simulate(sched, pp=pp, microbatches=m, f=f, b=b, w=w, fb=fb)
            assert t.bubble == bubble, (sched, f, b, w)
            assert t.bubbles == [bubble] * pp            # single-direction schedules idle alike on every device
            assert t.makespan == m * (f + b) + bubble
            assert t.param_copies == 1
            assert t.activations == acts                 # the report's PP is the worst device's (device 0)


@pytest.mark.parametrize("pp,m", [(p, q) for p, q in SHAPES if q >= 2 * p] + [(6, 12), (8, 32)])
def test_report_table_dualpipe(pp, m):
    # The report's (PP/2-1)(F&B+B-3W) holds exactly when the input-gradient half takes as long as a forward
    # (B - W = F) and W <= F (docs/pipeline.md §Assumptions); the worst devices are the middle ones.
    for f, b, w, fb in _times(pp * 1000 + m, 4, i_equals_f=True) + [(1, 2, 1, 3)]:
        t = simulate("dualpipe", pp=pp, microbatches=m, f=f, b=b, w=w, fb=fb)
        assert t.bubble == (Fr(pp, 2) - 1) * (fb + b - 3 * w), (f, b, w, fb)
        assert t.bubble == t.bubbles[pp // 2 - 1] == t.bubbles[pp // 2]
        assert t.param_copies == 2
        assert t.activations == [pp + 1] * pp          # every device peaks at PP+1 stashed chunks
        busy = [t.makespan - x for x in t.bubbles]
        assert max(busy) <= m * (f + b)                 # overlapped pairs only ever save time


def test_dualpipe_formula_needs_its_assumption():
    # outside B - W = F the simulator reports what the schedule does, not the formula: here less bubble
    f, b, w, fb = Fr(2), Fr(4), Fr(1), Fr(5)  # I = 3 > F = 2
    t = simulate("dualpipe", pp=8, microbatches=20, f=f, b=b, w=w, fb=fb)
    assert t.bubble != 3 * (fb + b - 3 * w)
    assert t.bubbles == [14, 15, 16, 16, 16, 16, 15, 14]  # middle devices idle 3(F&B+B-3W) - 2 = 16


def test_report_figure_pp8_20():
    # the report's figure: PP 8, 20 micro-batches (10 per direction); unit-ish times with I = F = W
    t = simulate("dualpipe", pp=8, microbatches=20, f=1, b=2, w=1, fb=3)
    assert (t.bubble, t.makespan, max(t.activations), t.param_copies) == (6, 66, 9, 2)
    # device 0 starts with 2*(PP/2-1) = 6 forwards of its own direction, then one of each direction
    first = [str(item[0]) for item in device_ops("dualpipe", 8, 20)[0][:9]]
    assert first == ["F0", "F1", "F2", "F3", "F4", "F5", "F6", "F10'", "I10'"]


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 20), (16, 36)])
def test_dualpipe_phase_counts(pp, m):
    # the per-device phase lengths of the reference schedule (docs/pipeline.md §Schedules), h = distance to
    # the nearer end, "own" direction = chunk 0 on the first half of the devices, chunk 1 on the second
    for d, items in enumerate(device_ops("dualpipe", pp, m)):
        h, own = min(d, pp - 1 - d), int(d >= pp // 2)
        warm = 2 * (pp // 2 - h - 1)
        assert all(len(x) == 1 and x[0].kind == "F" and x[0].chunk == own for x in items[:warm])
        assert [x[0].chunk for x in items[warm:warm + 2 * (h + 1)]] == [own, 1 - own] * (h + 1)
        tail = len(items) - max(i for i, x in enumerate(items) if x[0].kind != "W") - 1
        assert tail == h + 1
        pairs = sum(len(x) == 2 for x in items)
        assert pairs == 2 * (m // 2 - pp + h + 1) + (pp // 2 - h - 1) - (h == pp // 2 - 1)


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 20), (16, 32)])
def test_report_table_symbolic(pp, m):
    # The table for symbolic times: positive symbols W, P, R encode the assumptions (W <= F via F = W + P,
    # W <= B - W via B = 2W + R; DualPipe: B - W = F, F&B from B to F + B), so the simulator can order every
    # pair of times it compares and the bubble comes out as an expression, compared by expansion.
    W, P, R = sympy.symbols("W P R", positive=True)
    F = W + P
    for sched, b, bubble in (("1f1b", 2 * W + R, (pp - 1) * (F + 2 * W + R)),
                             ("gpipe", 2 * W + R, (pp - 1) * (F + 2 * W + R)),
                             ("zb1p", 2 * W + R, (pp - 1) * (F + (2 * W + R) - 2 * W))):
        t = simulate(sched, pp=pp, microbatches=m, f=F, b=b, w=W)
        assert sympy.expand(t.bubble - bubble) == 0, (sched, t.bubble)
    B = F + W
    for fb in (F + B, B, B + W, B + P):
        t = simulate("dualpipe", pp=pp, microbatches=m, f=F, b=B, w=W, fb=fb)
        assert sympy.expand(t.bubble - sympy.Rational(pp - 2, 2) * (fb + B - 3 * W)) == 0, (fb, t.bubble)
        assert t.activations == [pp + 1] * pp
    # times whose order the symbols do not decide (is W <= F?): a clear error, not a guess
    with pytest.raises(PipelineConfigError, match="cannot tell which"):
        simulate("zb1p", pp=pp, microbatches=m, f=P, b=R + W, w=W)


@pytest.mark.parametrize("sched", SCHEDULES)
def test_ticks_unit_grid(sched):
    pp, m = 4, 8
    t = simulate(sched, pp=pp, microbatches=m)
    grid = t.ticks()
    placed = {}
    for tick, row in enumerate(grid):
        assert len(row) == pp
        for d, item in enumerate(row):
            if item is not None:
                for op in item:
                    for k in _done_keys(op, d, pp):
                        placed[k] = tick
    n_items = sum(len(x) for x in device_ops(sched, pp, m))
    assert sum(item is not None for row in grid for item in row) == n_items
    for tick, row in enumerate(grid):
        for d, item in enumerate(row):
            for op in item or ():
                assert all(placed[k] < tick for k in _deps(op, d, pp))  # inputs from earlier ticks only
    assert grid[-1] != [None] * pp and grid[0][0] is not None
    if sched == "1f1b":
        assert len(grid) == 2 * (m + pp - 1)  # F and B one tick each: (M + PP - 1)(1 + 1)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(schedule="interleaved", pp=4, microbatches=8), "use one of"),
    (dict(schedule="dualpipe", pp=5, microbatches=10), "even number of stages"),
    (dict(schedule="dualpipe", pp=4, microbatches=9), "even number"),
    (dict(schedule="dualpipe", pp=4, microbatches=6), "at least 2 x stages"),
    (dict(schedule="1f1b", pp=8, microbatches=4), "use at least 8 micro-batches"),
    (dict(schedule="zb1p", pp=0, microbatches=4), "positive integer"),
])
def test_errors_name_the_fix(kwargs, needle):
    with pytest.raises(PipelineConfigError, match="fix") as err:
        device_ops(kwargs["schedule"], kwargs["pp"], kwargs["microbatches"])
    assert needle in str(err.value) and isinstance(err.value, Dsv3Error)
    with pytest.raises(PipelineConfigError):
        simulate(kwargs["schedule"], pp=kwargs["pp"], microbatches=kwargs["microbatches"])


def test_bad_times_and_ops():
    with pytest.raises(PipelineConfigError, match="fix: pass 0 <= w <= b"):
        simulate("zb1p", pp=4, microbatches=8, f=1, b=1, w=2)
    with pytest.raises(PipelineConfigError, match="negative"):
        simulate("1f1b", pp=4, microbatches=8, f=-1)
    with pytest.raises(PipelineConfigError, match="not a number"):
        simulate("1f1b", pp=4, microbatches=8, f="1")
    with pytest.raises(PipelineConfigError, match="kind"):
        Op("X", 0)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "dualpipe.png"
    dsv3_jax.pipeline.simulate("dualpipe", pp=4, microbatches=8, f=1, b=2, w=1, fb=3).plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
