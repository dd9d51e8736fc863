"""Which MoE layers each pipeline stage runs: a per-token cost model and the split that balances it
(docs/pipeline.md §Stage split, docs/design.md §Pipeline).

Stage 0 also embeds the tokens and runs the dense layers; the last stage runs the final norm, the head
and the MTP depths (with the shared head). So an equal number of MoE layers per stage leaves the two end
stages the slowest, and 58 MoE layers do not split evenly over 16 stages at all. ``balance`` gives each
stage a contiguous run of MoE layers (at least one) so that the most expensive stage is as cheap as
possible; ``StageMap`` says where each layer sits when the split is uneven and the stack is stored
padded to ``PP x lmax`` rows (docs/design.md §Pipeline).
"""
from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import numpy as np
from flax import nnx

from ..config import ModelConfig
from ..errors import PipelineConfigError
from ..info import abstract_state
from ..model import DeepSeekV3


def _matmul_params(flat, stacked: bool, top_k_of: int = 0, top_k: int = 0) -> int:
    """Multiply-adds per token of the weight matrices in ``flat`` (one layer of a stack when ``stacked``):
    leaves of at least 2 dims per layer; routed experts (``[E, ...]``) count ``top_k`` of ``top_k_of``."""
    total = 0
    for key, v in flat:
        shape = v.shape[1:] if stacked else v.shape
        if len(shape) < 2:
            continue                                   # norms, router bias: elementwise, not matmuls
        n = math.prod(shape)
        if "experts" in key and top_k_of:
            n = n // top_k_of * top_k                  # a token passes through K of the E routed experts
        total += n
    return total


def layer_costs(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, int]:
    """Forward FLOPs per token (2 per multiply-add of every weight matrix the token passes through, plus
    causal attention ``2 x H x (Dqk + Dv) x seq_len / 2`` per attention layer, as ``info.model_info``):
    ``moe`` (one MoE layer), ``dense`` (one dense layer), ``embedding`` (a row lookup: no multiply-adds),
    ``head`` (final norm + output head), ``mtp`` (one MTP depth: its projection, its MoE block and the
    shared head). Read from the model's abstract parameter tree, so any config's shapes are counted."""
    flat = [(k, v) for k, v in nnx.to_flat_state(abstract_state(cfg))]
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    attn = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    dense_key, moe_key = DeepSeekV3.STACKS
    pick = lambda first: [(k, v) for k, v in flat if k[0] == first]  # noqa: E731
    head = 2 * _matmul_params([(k, v) for k, v in flat if k[0] == "lm_head"], stacked=False)
    out = {"moe": 2 * _matmul_params(pick(moe_key), True, E, K) + attn if cfg.num_moe_layers else 0,
           "dense": 2 * _matmul_params(pick(dense_key), True) + attn if cfg.first_k_dense else 0,
           "embedding": 0, "head": head, "mtp": 0}
    if cfg.num_mtp_layers:
        depth0 = [(k[2:], v) for k, v in flat if k[0] == DeepSeekV3.MTP and k[1] == 0]
        block = [(k, v) for k, v in depth0 if k[0] == "block"]
        rest = [(k, v) for k, v in depth0 if k[0] != "block"]
        out["mtp"] = 2 * (_matmul_params(block, True, E, K) + _matmul_params(rest, False)) + attn + head
    return out


def stage_extras(cfg: ModelConfig, n_mtp: int, seq_len: int = 4096) -> tuple[int, int, int]:
    """(cost of one MoE layer, what stage 0 adds: embedding + dense layers, what the last stage adds:
    head + ``n_mtp`` MTP depths), forward FLOPs per token."""
    c = layer_costs(cfg, seq_len)
    return c["moe"], c["embedding"] + cfg.first_k_dense * c["dense"], c["head"] + n_mtp * c["mtp"]


def stage_costs(counts, moe: int, first: int, last: int) -> list[int]:
    """Per stage: its MoE layers' cost plus stage 0's and the last stage's extras."""
    pp = len(counts)
    return [n * moe + (first if s == 0 else 0) + (last if s == pp - 1 else 0) for s, n in enumerate(counts)]


def best_split(layers: int, pp: int, moe: int, first: int, last: int) -> tuple[int, ...]:
    """The contiguous split of ``layers`` MoE layers over ``pp`` stages (each at least one) whose most
    expensive stage is cheapest; among those, the one with the smallest sum of squared stage costs (the
    smoothest), first found in order of fewer layers on earlier stages. Exact (integer costs, two
    dynamic programmes over (stage, layers so far)), hence deterministic."""
    if pp < 1 or layers < pp:
        raise PipelineConfigError(f"{pp} pipeline stages need at least one MoE layer each, but the model has "
                                  f"{layers} (fix: use at most {layers} stages in --mesh stage=N).")

    def cost(s, n):
        return n * moe + (first if s == 0 else 0) + (last if s == pp - 1 else 0)
    inf = float("inf")
    # f[s][n]: the least possible max stage cost of stages 0..s holding the first n layers
    f = [[inf] * (layers + 1) for _ in range(pp)]
    for n in range(1, layers + 1):
        f[0][n] = cost(0, n)
    for s in range(1, pp):
        for n in range(s + 1, layers + 1):
            f[s][n] = min(max(f[s - 1][n - k], cost(s, k)) for k in range(1, n - s + 1))
    cap = f[pp - 1][layers]
    # g[s][n]: least sum of squared stage costs with every stage <= cap; choice[s][n]: layers on stage s
    g = [[inf] * (layers + 1) for _ in range(pp)]
    choice = [[0] * (layers + 1) for _ in range(pp)]
    for n in range(1, layers + 1):
        if cost(0, n) <= cap:
            g[0][n], choice[0][n] = cost(0, n) ** 2, n
    for s in range(1, pp):
        for n in range(s + 1, layers + 1):
            for k in range(1, n - s + 1):
                if cost(s, k) <= cap and g[s - 1][n - k] + cost(s, k) ** 2 < g[s][n]:
                    g[s][n], choice[s][n] = g[s - 1][n - k] + cost(s, k) ** 2, k
    out, n = [], layers
    for s in range(pp - 1, -1, -1):
        out.append(choice[s][n])
        n -= choice[s][n]
    return tuple(reversed(out))


def balance(cfg: ModelConfig, pp: int, n_mtp: int, seq_len: int = 4096) -> tuple[int, ...]:
    """MoE layers per stage for ``cfg`` on ``pp`` stages with ``n_mtp`` MTP depths trained on the last
    stage: ``best_split`` under ``layer_costs``."""
    return best_split(cfg.num_moe_layers, pp, *stage_extras(cfg, n_mtp, seq_len))


def parse_layers_per_stage(value) -> tuple[int, ...]:
    """``pipeline.layers_per_stage`` from YAML or ``--set``: a list, a tuple, ``"1,4,4,1"``, or empty."""
    if value is None or value == "" or value == ():
        return ()
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
    out = []
    for v in (items if isinstance(items, (list, tuple)) else [items]):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise PipelineConfigError(f"pipeline.layers_per_stage={value!r} is not a list of whole numbers (fix: "
                                      "e.g. pipeline.layers_per_stage=1,4,4,1, or leave it empty for the "
                                      "cost-balanced split).")
        out.append(v)
    return tuple(out)


def check_split(counts: tuple[int, ...], layers: int, pp: int) -> None:
    """An explicit split must give every one of the ``pp`` stages at least one of the ``layers`` MoE layers."""
    if len(counts) != pp:
        raise PipelineConfigError(f"pipeline.layers_per_stage={list(counts)} names {len(counts)} stages but the mesh "
                                  f"has stage={pp} (fix: give {pp} numbers, or leave it empty for the balanced split).")
    if min(counts) < 1:
        raise PipelineConfigError(f"pipeline.layers_per_stage={list(counts)} leaves a stage without MoE layers (fix: "
                                  "give every stage at least 1).")
    if sum(counts) != layers:
        raise PipelineConfigError(f"pipeline.layers_per_stage={list(counts)} sums to {sum(counts)}, but the model has "
                                  f"{layers} MoE layers (fix: make the numbers add up to {layers}).")


@dataclasses.dataclass(frozen=True)
class StageMap:
    """Where the MoE layers sit over the stages. ``counts[s]``: layers of stage s (contiguous, in order);
    ``lmax``: the most any stage holds. An uneven split is stored as ``PP x lmax`` rows, stage s in rows
    ``s*lmax .. s*lmax + lmax - 1``: its layers first, then ``lmax - counts[s]`` padding rows (identity
    layers, zero values), so ``P("stage")`` divides the rows (docs/design.md §Pipeline)."""
    counts: tuple[int, ...]

    @property
    def pp(self) -> int:
        return len(self.counts)

    @property
    def layers(self) -> int:
        return sum(self.counts)

    @property
    def lmax(self) -> int:
        return max(self.counts)

    @property
    def even(self) -> bool:
        """All stages equal: rows are layers, no padding, no reordering."""
        return len(set(self.counts)) == 1

    @cached_property
    def slots(self) -> np.ndarray:
        """``[PP, lmax]`` int32: the layer in each row of a stage, -1 for a padding row."""
        out = np.full((self.pp, self.lmax), -1, np.int32)
        start = np.cumsum((0,) + self.counts)
        for s, n in enumerate(self.counts):
            out[s, :n] = np.arange(start[s], start[s] + n)
        return out

    @cached_property
    def active(self) -> np.ndarray:
        """``[PP, lmax]`` bool: the rows that are real layers."""
        return self.slots >= 0

    @cached_property
    def rows(self) -> np.ndarray:
        """``[L]`` int32: the stored row of each layer (staged → model layout is ``x[rows]``)."""
        flat = self.slots.reshape(-1)
        return np.flatnonzero(flat >= 0).astype(np.int32)[np.argsort(flat[flat >= 0])]

    @cached_property
    def source(self) -> np.ndarray:
        """``[PP*lmax]`` int32: the layer each stored row takes (padding: layer 0, then zeroed)."""
        return np.maximum(self.slots.reshape(-1), 0)


__all__ = ["layer_costs", "stage_extras", "stage_costs", "best_split", "balance", "parse_layers_per_stage",
           "check_split", "StageMap"]
