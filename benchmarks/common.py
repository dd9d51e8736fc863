"""Shared helpers for the benchmark scripts: repo-root import path, thread counts, timing, JSON lines.

Benchmarks are scripts, never timed tests (docs/design.md §Benchmarks): each prints one JSON line per measurement
with our figure, the baseline's figure measured in the same run, and the ratio. A comparison is timed with
``side_by_side`` (warm-up, then alternating runs; other processes' CPU use measured before and during, so a
run on a busy machine says ``"quiet": false``), both sides on the same threads (``set_threads``), and
MFU is quoted against this CPU's FMA peak (``fma_peak``) with the jnp-matmul figure beside it.
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


# ---- the trust harness: same threads, alternating runs after a warm-up, load checked, FMA peak ----
QUIET_OTHERS_CORES = 0.25  # other processes may keep at most this many cores busy for a run to count as quiet


def _own_cpu_seconds() -> float:
    """CPU seconds of this process, its finished children and its live ones (all threads)."""
    import psutil
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for c in me.children(recursive=True):
        try:
            total += sum(c.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (everything but idle and iowait)."""
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class LoadMonitor:
    """How many cores *other* processes keep busy, before and while a benchmark runs: the machine's
    busy CPU time minus this process tree's, over wall time (``psutil``). A load average cannot tell
    the benchmark's own threads from others'; this can. Use as a context manager around the timed
    region after calling ``before()``; ``record()`` gives the JSON fields (``quiet`` and the figures)."""

    def __init__(self, interval: float = 0.5):
        import threading
        self.interval = interval
        self.before_cores: Optional[float] = None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _window(self, seconds: float) -> float:
        b0, o0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        time.sleep(seconds)
        b1, o1, t1 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))

    def before(self, seconds: float = 2.0) -> float:
        """Others' busy cores over ``seconds`` with the benchmark idle."""
        self.before_cores = self._window(seconds)
        return self.before_cores

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._window(self.interval))

    def __enter__(self) -> "LoadMonitor":
        import threading
        if self.before_cores is None:
            self.before()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def record(self) -> dict[str, Any]:
        during = statistics.mean(self.samples) if self.samples else None
        worst = max([self.before_cores or 0.0] + [during or 0.0])
        return {"quiet": bool(worst <= QUIET_OTHERS_CORES), "others_cores_before": self.before_cores,
                "others_cores_during": during, "others_cores_during_max": max(self.samples, default=None),
                "load_avg_1m": load_average(), "cores": num_cores()}


def _cpu_flags_and_mhz() -> tuple[set[str], Optional[float]]:
    flags: set[str] = set()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(val.split())
            elif key == "cpu MHz" and mhz is None:
                mhz = float(val)
    except OSError:
        pass
    try:  # lscpu's maximum clock where the kernel reports one (bare metal); a VM shows only cpu MHz
        import subprocess
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("CPU max MHz:"):
                mhz = float(line.split(":")[1])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return flags, mhz


def fma_peak(cores: Optional[int] = None, fma_units: int = 2) -> dict[str, Any]:
    """This CPU's fp32 peak: cores × FMA width (fp32 lanes of the widest vector ISA: AVX-512 16, AVX2+FMA
    8, else SSE 4) × ``fma_units`` FMA pipes per core (2 on current x86 server cores) × 2 FLOPs per FMA
    × clock (``lscpu``'s max MHz, else ``/proc/cpuinfo``'s). Returns the figure and its factors."""
    flags, mhz = _cpu_flags_and_mhz()
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags and "fma" in flags) else 4
    cores = cores or num_cores()
    flops = cores * lanes * fma_units * 2 * (mhz or 0.0) * 1e6
    return {"fma_peak_flops": flops or None, "fma_lanes": lanes, "fma_units": fma_units,
            "clock_mhz": mhz, "peak_cores": cores}


def side_by_side(fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5,
                 sync: Optional[dict[str, Callable[[Any], Any]]] = None,
                 monitor: Optional[LoadMonitor] = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The one way benchmarks time a comparison: ``warmup`` untimed rounds, then ``repeats`` rounds of
    every candidate in turn (A B A B ...), with other processes' load measured before and during.
    Returns (per-candidate median/min/max seconds, the load record with ``quiet``)."""
    mon = monitor or LoadMonitor()
    if mon.before_cores is None:
        mon.before()
    with mon:
        times = time_interleaved(fns, warmup=warmup, repeats=repeats, sync=sync)
    return times, mon.record()


def set_threads(n: Optional[int] = None) -> int:
    """Give PyTorch the cores XLA:CPU uses (all this process may run on): both sides of a comparison
    then run with the same thread count. Returns it."""
    n = n or num_cores()
    try:
        import torch
        torch.set_num_threads(n)
        torch.set_num_interop_threads(1)
    except (ImportError, RuntimeError):  # no torch, or interop threads already set
        pass
    return n


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
