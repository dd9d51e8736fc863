"""Rule-based rewards for GRPO (docs/architecture.md §11, docs/design.md §Post-training).

A reward is any Python callable ``reward(prompt: str, completion: str, answer: str) -> float``, named in
the run config as ``module:callable`` (``train.reward``). ``prompt`` is the rendered chat prompt,
``completion`` the sampled answer text (without the closing EOS), ``answer`` the record's reference.
Several, summed: ``train.reward=dsv3_jax.train.rewards:exact_answer,dsv3_jax.train.rewards:format_check``.

``score`` runs a reward under a time limit per call: a call that raises or overruns scores 0, so a
reward that loops forever costs ``train.reward_timeout`` seconds, never the step. A reward that runs
code (``unit_test``) does it in a subprocess that is killed at its own time limit.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Sequence

from ..errors import ConfigError

Reward = Callable[[str, str, str], float]
INTEGER = re.compile(r"^\s*-?\d+\s*$")


def exact_answer(prompt: str, completion: str, answer: str) -> float:
    """1 when the completion is the reference answer (surrounding whitespace ignored), else 0."""
    return float(completion.strip() == str(answer).strip())


def format_check(prompt: str, completion: str, answer: str) -> float:
    """0.1 when the completion is a bare integer (the arithmetic task's format), else 0: a small shaping
    term that rewards well-formed answers even when they are wrong."""
    return 0.1 * bool(INTEGER.match(completion))


UNIT_TEST_SECONDS = 5.0


def unit_test(prompt: str, completion: str, answer: str) -> float:
    """1 when the completion (Python source) passes the test code in ``answer`` (asserts), run with this
    interpreter in a subprocess with a ``UNIT_TEST_SECONDS`` limit (killed past it), else 0."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=True) as f:
        f.write(completion + "\n\n" + str(answer) + "\n")
        f.flush()
        try:
            res = subprocess.run([sys.executable, "-I", f.name], capture_output=True, timeout=UNIT_TEST_SECONDS,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return 0.0
    return float(res.returncode == 0)


def load_reward(spec: str) -> Reward:
    """``"module:callable[,module:callable...]"`` → one reward (the sum); ``ConfigError`` naming a bad part."""
    fns = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        mod, _, name = part.partition(":")
        if not mod or not name:
            raise ConfigError(f"train.reward={spec!r}: {part!r} is not 'module:callable' (fix: e.g. "
                              "dsv3_jax.train.rewards:exact_answer).")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"train.reward={spec!r}: cannot load {part!r} ({type(e).__name__}: {e}) (fix: a module "
                              "on the Python path and a callable in it, e.g. dsv3_jax.train.rewards:exact_answer).") from None
        if not callable(fn):
            raise ConfigError(f"train.reward={spec!r}: {part!r} is not callable (fix: name a function).")
        fns.append(fn)
    if not fns:
        raise ConfigError("train.reward is empty (fix: e.g. dsv3_jax.train.rewards:exact_answer).")
    if len(fns) == 1:
        return fns[0]
    return lambda p, c, a: sum(float(f(p, c, a)) for f in fns)


def _call(fn: Reward, args: tuple, out: list) -> None:
    try:
        out.append(float(fn(*args)))
    except Exception:  # noqa: BLE001 - a reward that fails scores 0 (and is counted)
        out.append(None)


def score(fn: Reward, items: Sequence[tuple[str, str, str]], timeout: float) -> tuple[list[float], int]:
    """``[fn(prompt, completion, answer)]`` with each call limited to ``timeout`` seconds (a daemon thread
    per call: one that overruns is abandoned and scores 0). Returns (rewards, number of failed calls:
    raised, overran or not a finite number)."""
    rewards, failed = [], 0
    for args in items:
        out: list = []
        th = threading.Thread(target=_call, args=(fn, args, out), daemon=True)
        th.start()
        th.join(timeout)
        r = out[0] if out else None
        if r is None or r != r or r in (float("inf"), float("-inf")):
            failed += 1
            r = 0.0
        rewards.append(r)
    return rewards, failed


__all__ = ["exact_answer", "format_check", "unit_test", "load_reward", "score", "Reward"]
