"""The executor's static tables (dsv3_jax/pipeline/tables.py, docs/design.md §Pipeline), replayed in Python:
for every schedule at several depths, each op reads the stash slot that holds its own micro-batch's stage
input / output gradient (no value is overwritten while still needed), every message lands in a slot, and
the stash is no larger than the values alive at once on the busiest device."""
import pytest

from dsv3_jax.pipeline import SCHEDULES, simulate, stage_of
from dsv3_jax.pipeline.tables import OPS, build_tables, in_flight

CASES = [(s, pp, m) for s in SCHEDULES for pp, m in ((2, 4), (4, 8), (4, 10), (8, 16))
         if not (s == "dualpipe" and (m % 2 or m < 2 * pp))] + [("1f1b", 4, 4), ("zb1p", 8, 13)]


@pytest.mark.parametrize("schedule,pp,m", CASES)
def test_slots_hold_the_right_values(schedule, pp, m):
    timeline = simulate(schedule, pp=pp, microbatches=m, f=1, b=1, w=1, fb=1)
    ticks = timeline.ticks()
    tb = build_tables(ticks, pp)
    assert tb.n_ticks == len(ticks)
    # per device, chunk and slot: which micro-batch's value it holds (None: empty)
    xs = [[[None] * tb.n_x[c] for c in range(tb.chunks)] for _ in range(pp)]
    gs = [[[None] * tb.n_g[c] for c in range(tb.chunks)] for _ in range(pp)]
    last = pp - 1
    for t in range(tb.n_ticks):
        sent_x, sent_g = [], []
        for d in range(pp):
            for j, op in enumerate(ticks[t][d] or ()):
                assert (OPS[tb.kind[t, d, j]], tb.chunk[t, d, j], tb.mb[t, d, j]) == (op.kind, op.chunk, op.microbatch)
                c, mb, s = op.chunk, op.microbatch, stage_of(op.chunk, d, pp)
                if s > 0:                                    # reads its stashed input
                    assert xs[d][c][tb.x_slot[t, d, j]] == mb, (t, d, op)
                if op.kind != "F" and s < last:              # reads its stashed output gradient
                    assert gs[d][c][tb.g_slot[t, d, j]] == mb, (t, d, op)
                if op.kind == "F" and s < last:
                    sent_x.append((d + (1 if c == 0 else -1), c, mb))
                if op.kind in ("B", "I") and s > 0:
                    sent_g.append((d - (1 if c == 0 else -1), c, mb))
        # messages land after every op of the tick has run, in the slots the tables name
        for d in range(pp):
            for c in range(tb.chunks):
                got = [mb for dd, cc, mb in sent_x if (dd, cc) == (d, c)]
                slot = tb.recv_x[t, d, c]
                assert len(got) <= 1 and (slot < tb.n_x[c]) == bool(got)
                if got:
                    xs[d][c][slot] = got[0]
                got = [mb for dd, cc, mb in sent_g if (dd, cc) == (d, c)]
                slot = tb.recv_g[t, d, c]
                assert len(got) <= 1 and (slot < tb.n_g[c]) == bool(got)
                if got:
                    gs[d][c][slot] = got[0]
    assert in_flight(tb) == timeline.activations
    # a stash holds no more than the in-flight micro-batches plus those that arrived ahead of their forward
    assert max(tb.n_x) <= max(timeline.activations) + 1
