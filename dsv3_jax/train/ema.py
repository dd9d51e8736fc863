"""Exponential moving average of the parameters, kept in host memory and updated off the step's
critical path (docs/architecture.md §8: "parameter EMA kept on host"; docs/design.md §Parameter EMA).

Every ``every`` steps the trainer hands ``submit`` the live parameters. ``submit`` only enqueues an
on-device copy (asynchronous dispatch: it returns before the copy runs, and the copy is a buffer the
next step cannot donate away); a background thread reads it to the host and folds it in. The step
never waits for the thread: when a snapshot is still pending as the next one arrives, the pending one
is replaced (``dropped`` counts them) and the decay of the next fold spans the gap, so the EMA stays
the closed form over the snapshots it took::

    ema ← p_{s_1};   ema ← d^(s_k − s_{k−1}) · ema + (1 − d^(s_k − s_{k−1})) · p_{s_k}

(``d`` = ``ema_decay`` per step). With ``every = 1`` and no dropped snapshot this is the usual per-step
EMA. The arithmetic is fp32 numpy on the host.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import ConfigError


def flat_host(state) -> dict[tuple, np.ndarray]:
    """``{path: fp32 numpy array}`` of an NNX state (its flat-state paths, as checkpoints key them) or of
    any other pytree (paths of its dict keys / sequence indices), already on the host."""
    if isinstance(state, nnx.State):
        items = nnx.to_flat_state(state)
    else:
        items = [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), v)
                 for path, v in jax.tree_util.tree_leaves_with_path(state)]
    out = {}
    for k, v in items:
        v = v.get_value() if isinstance(v, nnx.Variable) else v
        out[tuple(k)] = np.array(v, np.float32)  # a writable copy (device_get may return read-only views)
    return out


class HostEMA:
    """The EMA (see module doc). ``lock`` guards ``values``/``step``; the worker holds it while folding."""

    def __init__(self, decay: float, every: int):
        if not 0 < decay < 1 or every < 1:
            raise ConfigError(f"EMA decay={decay!r}, every={every!r}: need 0 < decay < 1 and every >= 1 "
                              "(fix: e.g. train.ema_decay=0.999 train.ema_every=10).")
        self.decay, self.every = float(decay), int(every)
        self.values: Optional[dict[tuple, np.ndarray]] = None
        self.step: Optional[int] = None          # step of the last snapshot folded in
        self.dropped = 0
        self.lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending: Optional[tuple[int, Any]] = None
        self._busy = False
        self._closed = False
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="dsv3-ema", daemon=True)
        self._thread.start()

    # -- producer (the training loop) --------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.every == 0

    def submit(self, step: int, params) -> None:
        """Queue the parameters after update ``step``; returns at once."""
        self._raise()
        copy = jax.tree.map(jnp.copy, params)   # dispatched, not awaited
        with self._cv:
            if self._pending is not None:
                self.dropped += 1
            self._pending = (int(step), copy)
            self._cv.notify_all()

    def wait(self) -> None:
        """Block until every submitted snapshot is folded in (checkpoint time, end of the run)."""
        with self._cv:
            self._cv.wait_for(lambda: (self._pending is None and not self._busy) or self._error is not None)
        self._raise()

    def load(self, step: int, values: dict[tuple, np.ndarray]) -> None:
        """Set the EMA (a resumed run)."""
        self.wait()
        with self.lock:
            self.values, self.step = {k: np.array(v, np.float32) for k, v in values.items()}, int(step)

    def snapshot(self) -> tuple[Optional[int], Optional[dict[tuple, np.ndarray]]]:
        """``(step, copy of values)`` once everything submitted is folded in (a copy: the worker folds in
        place while an asynchronous checkpoint may still be writing the snapshot)."""
        self.wait()
        with self.lock:
            return self.step, None if self.values is None else {k: v.copy() for k, v in self.values.items()}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the EMA worker failed: {self._error!r}") from self._error

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (step, tree), self._pending = self._pending, None
                self._busy = True
            try:
                host = flat_host(jax.device_get(tree))
                del tree
                with self.lock:
                    self._fold(step, host)
            except BaseException as e:  # noqa: BLE001 - surfaced on the next submit / wait
                self._error = e
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _fold(self, step: int, p: dict[tuple, np.ndarray]) -> None:
        if self.values is None or self.step is None:
            self.values, self.step = p, step
            return
        if step <= self.step:  # a resumed run re-submitting a step already in the EMA
            return
        w = np.float32(self.decay ** (step - self.step))
        for k, x in p.items():
            v = self.values[k]
            v *= w
            v += (1 - w) * x
        self.step = step


__all__ = ["HostEMA", "flat_host"]
