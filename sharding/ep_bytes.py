"""How many bytes expert parallelism moves (benchmarks/expert_parallel.py, notebooks/expert_parallel.ipynb):
collectives counted in compiled HLO, and a per-strategy bytes-per-token model of the exchanges
``sharding.expert_parallel`` runs. Analysis only: nothing here runs in a model.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np

from .errors import MeshError

_COLLECTIVE = re.compile(r"= (.*?) (all-gather|reduce-scatter|all-to-all|all-reduce|ragged-all-to-all)(?:-start)?\(")
_HLO_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HLO_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
              "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1}


def collective_bytes(hlo_text: str) -> int:
    """Result bytes of every collective (all-gather, reduce-scatter, all-to-all, all-reduce,
    ragged-all-to-all) in a compiled per-device HLO module (``jit(f).lower(...).compile().as_text()``).
    Result sizes include the device's own chunk and any router-statistics reductions."""
    total = 0
    for types, _ in _COLLECTIVE.findall(hlo_text):
        for dtype, dims in _HLO_SHAPE.findall(types):
            total += math.prod(int(d) for d in dims.split(",") if d) * _HLO_BYTES.get(dtype, 4)
    return total


def shards_per_token(experts, n_experts: int, n_shards: int) -> np.ndarray:
    """How many distinct expert shards hold each token's experts: ``experts [T, K]`` → ``[T]``
    (experts are split over the shards in equal contiguous ranges, as ``enable`` does)."""
    shard = np.asarray(experts).reshape(-1, np.shape(experts)[-1]) // (n_experts // n_shards)
    s = np.sort(shard, axis=-1)
    return 1 + (np.diff(s, axis=-1) != 0).sum(-1)


def exchange_bytes_per_token(experts, *, n_experts: int, n_shards: int, hidden: int, dtype_bytes: int = 4,
                             capacity_factor: float = 1.25, source_shard=None,
                             tokens_per_shard: Optional[int] = None) -> dict[str, float]:
    """Mean bytes per token and MoE layer that cross between expert shards (each byte counted once:
    the token's row out and its result back; a device's own chunk excluded), for the routing
    ``experts [T, K]`` (global expert ids), per strategy as this module implements it:

    * ``allgather``: every peer's tokens (hidden ``dtype_bytes`` + K int32 ids + K fp32 gates) come in,
      fp32 partial outputs go out in the reduce-scatter: ``(n-1)(D·b + 8K + 4D)``, whatever the routing.
    * ``a2a_capacity``: a dense ``all_to_all`` of ``cap = min(T_s, ceil(cf·T_s·K/n))`` rows to each of
      the ``n-1`` other shards and back: ``(n-1)·cap/T_s·(D·b + 8K + 4D)``, whatever the routing.
    * ``ragged_a2a``: one copy of a token to each *other* shard holding one of its experts, the fp32
      partial sum back: ``others·(D·b + 8K + 4D)`` (GPU/TPU ``ragged_all_to_all``; the CPU emulation pads
      every chunk to ``T_s`` rows and moves what ``allgather`` moves).
    * ``minimum``: the hidden vector to each other shard and the result back, nothing else:
      ``others·2·D·b``.

    ``others`` counts the shards other than the token's own; ``source_shard [T]`` says where each
    token lives (default: contiguous equal blocks, the batch layout over the ``expert`` axis).
    ``tokens_per_shard`` ``T_s`` defaults to ``T // n_shards``.
    """
    experts = np.asarray(experts).reshape(-1, np.shape(experts)[-1])
    T, K = experts.shape
    n, D, b = n_shards, hidden, dtype_bytes
    if n_experts % n:
        raise MeshError(f"{n_experts} experts cannot be split over {n} shards (fix: use a divisor of {n_experts}).")
    if source_shard is None:
        source_shard = np.arange(T) * n // T
    per_shard = n_experts // n
    dest = experts // per_shard                                                 # [T, K]
    reached = (dest[:, :, None] == np.arange(n)).any(1)                        # [T, n]
    others = float((reached & (np.arange(n)[None, :] != np.asarray(source_shard)[:, None])).sum(1).mean())
    t_s = tokens_per_shard or max(1, T // n)
    cap = min(t_s, -(-int(capacity_factor * t_s * K) // n))
    row = D * b + 8 * K + 4 * D                                                 # out (hidden + ids + gates) and back (fp32)
    return {"allgather": float((n - 1) * row), "a2a_capacity": (n - 1) * cap / t_s * row,
            "ragged_a2a": others * row, "minimum": others * 2 * D * b}
