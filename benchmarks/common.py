"""Shared helpers for the benchmark scripts: repo-root import path, thread counts, timing, JSON lines.

Benchmarks are scripts, never timed tests (docs/design.md §Benchmarks): each prints one JSON line per measurement
with our figure, the baseline's figure measured in the same run, and the ratio.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def num_cores() -> int:
    """CPU cores this process may run on (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            sync: Optional[Callable[[Any], Any]] = None) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; ``sync(result)`` is called inside the
    timed region (e.g. ``jax.block_until_ready``) so asynchronous dispatch is not mistaken for speed.
    Returns median/min/max seconds per call."""
    for _ in range(warmup):
        out = fn()
        if sync is not None:
            sync(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if sync is not None:
            sync(out)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5,
                     sync: Optional[dict[str, Callable[[Any], Any]]] = None) -> dict[str, dict[str, float]]:
    """Time several candidates round-robin (A B C A B C ...), so that load from other processes on a
    shared machine falls on all of them alike; per candidate, the median/min/max seconds per call."""
    sync = sync or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            if name in sync:
                sync[name](out)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for k, v in times.items()}


def load_average() -> Optional[float]:
    """1-minute load average (other processes on a shared machine skew timings; recorded with them)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)`` — one wall-clock measurement (e.g. a compile)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def loss_and_grad_step(model):
    """Our training-step core as a pure function at the boundary (docs/design.md §Functional at the
    boundary): ``(params, rest) = nnx.split(model, nnx.Param, ...)`` and the *un-jitted*
    ``step(params, rest, tokens) -> (loss, grads)`` — mean next-token cross-entropy of the main
    logits (MTP off), gradient w.r.t. every ``nnx.Param``."""
    import jax
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, tokens):
        m = nnx.merge(graphdef, params, rest)
        logits = m(tokens, mtp=False).logits  # [B, S, V] fp32
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    return params, rest, jax.value_and_grad(loss_fn)


def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (floats to 4 significant digits) and flush, so partial runs still report."""
    print(json.dumps(_round(record)), flush=True)


def log(msg: str) -> None:
    """Progress to stderr; stdout carries only the JSON lines."""
    print(msg, file=sys.stderr, flush=True)
