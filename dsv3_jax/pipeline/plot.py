"""Draw a simulated pipeline timeline as a PNG in the style of the report's DualPipe figure
(docs/pipeline.md §Timeline figure): one row per device, one cell per work item, coloured by kind (forward,
full backward, input-gradient half, weight-gradient half) and by direction (chunk), the micro-batch number in
the cell; an overlapped forward/backward pair is one cell split in two halves inside a shared black border.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from dsv3_jax.pipeline.simulate import Timeline

# (kind, chunk) -> colour; the reverse direction (chunk 1) is a darker shade of the same hue
COLOURS = {("F", 0): "#f6c89f", ("F", 1): "#e8904f", ("B", 0): "#a8d5a2", ("B", 1): "#4f9a48",
           ("I", 0): "#9ec5e8", ("I", 1): "#3f7fbf", ("W", 0): "#d9c2ea", ("W", 1): "#9a6fbf"}
NAMES = {"F": "forward", "B": "backward", "I": "backward for input", "W": "backward for weights"}


def _label(op, microbatches: int, schedule: str) -> str:
    # DualPipe numbers each direction's micro-batches from 0, as the report's figure does
    half = microbatches // 2 if schedule == "dualpipe" else 0
    return str(op.microbatch - half * op.chunk)


def plot_timeline(timeline: "Timeline", path: str, *, title: Optional[str] = None) -> None:
    """Write ``timeline`` to ``path`` (PNG). Times must be numbers (not sympy symbols)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    t = timeline
    span = float(t.makespan)
    fig, ax = plt.subplots(figsize=(min(24.0, max(10.0, 0.34 * span)), 0.45 * t.pp + 1.8))
    fontsize = 7 if span < 120 else 5
    for e in t.events:
        x0, x1 = float(e.start), float(e.end)
        y = t.pp - 1 - e.device  # device 0 on top
        n = len(e.ops)
        for i, op in enumerate(e.ops):  # a pair: forward in the top half, backward in the bottom half
            h = 1.0 / n
            yb = y + 1 - (i + 1) * h
            ax.add_patch(Rectangle((x0, yb), x1 - x0, h, facecolor=COLOURS[op.kind, op.chunk],
                                   edgecolor="white", linewidth=0.5))
            ax.text((x0 + x1) / 2, yb + h / 2, _label(op, t.microbatches, t.schedule), ha="center",
                    va="center", fontsize=fontsize)
        if n > 1:
            ax.add_patch(Rectangle((x0, y), x1 - x0, 1, fill=False, edgecolor="black", linewidth=1.2))
    ax.set_xlim(0, span)
    ax.set_ylim(0, t.pp)
    ax.set_yticks([t.pp - 1 - d + 0.5 for d in range(t.pp)])
    ax.set_yticklabels([f"device {d}" for d in range(t.pp)])
    ax.set_xlabel("time")
    kinds = sorted({(op.kind, op.chunk) for e in t.events for op in e.ops}, key=lambda kc: ("FBIW".index(kc[0]), kc[1]))
    two = any(c for _, c in kinds)
    ax.legend(handles=[Patch(facecolor=COLOURS[k, c], label=NAMES[k] + (f" (chunk {c})" if two else ""))
                       for k, c in kinds], loc="upper center", bbox_to_anchor=(0.5, -0.25 if t.pp <= 8 else -0.12),
              ncol=len(kinds), fontsize=8, frameon=False)
    ax.set_title(title or f"{t.schedule}: PP={t.pp}, {t.microbatches} micro-batches, bubble {float(t.bubble):g}, "
                 f"activations (worst device) {max(t.activations)}, parameters {t.param_copies}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
