"""Pipeline schedules (issue M11): JSON lines per measurement.

* ``simulated_bubble`` (one line per schedule): the simulator's bubble for PP=8 and 20 micro-batches (the
  report's DualPipe figure) against the report's formula from the same chunk times, ratio 1.0 expected.
  Chunk times follow the assumptions under which the report's table is exact (docs/pipeline.md
  §Assumptions): F = 1, W = 1, B = 2 (so the input-gradient half B - W equals F and W <= F, as in the
  zero-bubble paper's equal-time baseline), and F&B = 2.5 (overlapping a forward with a backward hides half
  a forward; the formula is exact for any F&B between max(F, B) and F + B). Each line also gives the bubble
  as a fraction of the step, the step time (makespan), the worst device's stashed micro-batches and the
  parameter copies. GPipe's baseline is the 1F1B formula, which GPipe's bubble also equals.

    python benchmarks/pipeline.py            # every measurement
    python benchmarks/pipeline.py simulated  # some (by name prefix)
"""
from __future__ import annotations

import sys
from fractions import Fraction

from common import emit  # noqa: E402  (puts the repo root on sys.path)

from dsv3_jax.pipeline import SCHEDULES, simulate  # noqa: E402

PP, MICROBATCHES = 8, 20
F, B, W, FB = Fraction(1), Fraction(2), Fraction(1), Fraction(5, 2)


def report_bubble(schedule: str, pp: int, f=F, b=B, w=W, fb=FB):
    """The report's bubble formula (docs/architecture.md §9); GPipe's equals 1F1B's."""
    return {"gpipe": (pp - 1) * (f + b), "1f1b": (pp - 1) * (f + b), "zb1p": (pp - 1) * (f + b - 2 * w),
            "dualpipe": (Fraction(pp, 2) - 1) * (fb + b - 3 * w)}[schedule]


def simulated_bubble() -> None:
    for schedule in SCHEDULES:
        t = simulate(schedule, pp=PP, microbatches=MICROBATCHES, f=F, b=B, w=W, fb=FB)
        ours, baseline = t.bubble, report_bubble(schedule, PP)
        emit({"bench": "pipeline.simulated_bubble", "schedule": schedule, "pp": PP, "microbatches": MICROBATCHES,
              "times": {"F": float(F), "B": float(B), "W": float(W), "F&B": float(FB)},
              "ours": float(ours), "baseline": float(baseline), "baseline_is": "report formula",
              "ratio": float(ours / baseline), "bubble_fraction": float(ours / t.makespan),
              "makespan": float(t.makespan), "activations_worst_device": max(t.activations),
              "param_copies": t.param_copies})


MEASUREMENTS = {"simulated_bubble": simulated_bubble}


def main(names: list[str]) -> None:
    for name, fn in MEASUREMENTS.items():
        if not names or any(name.startswith(n) for n in names):
            fn()


if __name__ == "__main__":
    main(sys.argv[1:])
