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


_LOWERED = re.compile(r'"stablehlo\.(all_gather|reduce_scatter|all_to_all|all_reduce|ragged_all_to_all)".*?'
                      r'\) -> (?:\()?tensor<((?:\d+x)*)([a-z]\w*)>', re.S)
_LOWERED_BYTES = {"f64": 8, "i64": 8, "ui64": 8, "f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i16": 2,
                  "ui16": 2, "i1": 1, "i8": 1, "ui8": 1, "f8E4M3FN": 1, "f8E5M2": 1}


def lowered_collective_bytes(stablehlo_text: str) -> int:
    """Result bytes of every collective in a *lowered* program (``jit(f).lower(...).as_text()``):
    the dtypes the program asks to move, which a TPU/GPU moves; XLA:CPU's compiled program widens
    bf16 collectives to f32, so ``collective_bytes`` of a CPU compile overstates bf16 exchanges."""
    total = 0
    for _, dims, dtype in _LOWERED.findall(stablehlo_text):
        total += math.prod(int(d) for d in dims.split("x") if d) * _LOWERED_BYTES.get(dtype, 4)
    return total


def shards_per_token(experts, n_experts: int, n_shards: int) -> np.ndarray:
    """How many distinct expert shards hold each token's experts: ``experts [T, K]`` → ``[T]``
    (experts are split over the shards in equal contiguous ranges, as ``enable`` does)."""
    shard = np.asarray(experts).reshape(-1, np.shape(experts)[-1]) // (n_experts // n_shards)
    s = np.sort(shard, axis=-1)
    return 1 + (np.diff(s, axis=-1) != 0).sum(-1)


def exchange_bytes_per_token(experts, *, n_experts: int, n_shards: int, hidden: int, dtype_bytes: int = 4,
                             capacity_factor: float = 1.25, source_shard=None,
                             tokens_per_shard: Optional[int] = None, fp8_dispatch: bool = False,
                             combine_bytes: Optional[int] = None) -> dict[str, float]:
    """Mean bytes per token and MoE layer that cross between expert shards (each byte counted once:
    the token's row out and its result back; a device's own chunk excluded), for the routing
    ``experts [T, K]`` (global expert ids), per strategy as ``sharding.expert_parallel`` implements it.
    A row goes out as ``out = D·b`` bytes (``dtype_bytes`` b: the compute dtype), or with
    ``fp8_dispatch`` (``quant=fp8``) as e4m3 plus a float32 scale per 1×128 tile: ``D + 4·⌈D/128⌉``;
    the partial sum comes back in the compute dtype: ``back = D·combine_bytes`` (default b). With
    ``row = out + 8K + back`` (K int32 ids and K fp32 gates travel with the row):

    * ``allgather``: every peer's tokens come in, partial outputs go out in the reduce-scatter:
      ``(n-1)·row``, whatever the routing.
    * ``a2a_capacity``: a dense ``all_to_all`` of ``cap = min(T_s, ceil(cf·T_s·K/n))`` rows to each of
      the ``n-1`` other shards and back: ``(n-1)·cap/T_s·row``, whatever the routing.
    * ``ragged_a2a``: one copy of a token to each *other* shard holding one of its experts, the
      partial sum back: ``others·row`` (GPU/TPU ``ragged_all_to_all``; the CPU emulation pads every
      chunk to ``T_s`` rows and moves what ``allgather`` moves).
    * ``minimum``: the hidden vector to each other shard and the result back at the same dtypes,
      nothing else: ``others·(out + back)``.

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
    out = D + 4 * -(-D // 128) if fp8_dispatch else D * b
    back = D * (b if combine_bytes is None else combine_bytes)
    row = out + 8 * K + back
    return {"allgather": float((n - 1) * row), "a2a_capacity": (n - 1) * cap / t_s * row,
            "ragged_a2a": others * row, "minimum": others * (out + back)}
