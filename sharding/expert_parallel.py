"""Expert parallelism: the MoE expert compute under ``shard_map`` (issue M3, SPEC §4 and §9).

Routing is computed outside, on the global token arrays, so router statistics (and with them the
aux-loss-free bias update) always see the whole global batch. Strategies:

* ``allgather`` — each expert shard gathers the tokens of its ``expert``-axis peers, runs its local
  experts (dropless grouped GEMM; token-slots routed elsewhere go to an all-zero "null" expert), and
  ``psum_scatter`` returns each token's summed expert output to its owner. Works on every backend.
* ``ragged_a2a`` — each token is sent once to every shard that holds at least one of its experts
  (``ragged_all_to_all`` with exchanged counts/offsets), the shard runs its local experts for the
  slots it owns, and a reverse ``ragged_all_to_all`` brings the partial sums home. Dropless. XLA:CPU
  has no ragged_all_to_all, so on CPU the same bookkeeping runs over a padded ``all_to_all``
  emulation (``emulated_ragged_all_to_all``); GPU/TPU use the real collective.
* ``a2a_capacity`` — the same exchange over a dense ``all_to_all`` with a fixed per-destination
  capacity ``ceil(capacity_factor · T · K / n_shards)`` rows; rows beyond it are dropped and the
  dropped fraction of token-slots is reported. Opt-in only: DeepSeek-V3 never drops tokens.

With group-limited routing and ``n_group`` a multiple of the expert-shard count, each group lives on
one shard, so a token reaches at most ``topk_group`` shards (SPEC §4 node-limited routing): ragged
exchanges move ``≤ topk_group`` copies of a token instead of ``K`` or ``n_shards``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax
import numpy as np
from flax import nnx
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.model.grouped_gemm import expert_ffn, sort_by_expert

from .mesh import MeshError
from .rules import DEFAULT_RULES, Rules

STRATEGIES = ("allgather", "ragged_a2a", "a2a_capacity")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    mesh: Mesh
    strategy: str
    batch_axes: tuple
    impl: str = "auto"
    block: int = 128
    capacity_factor: float = 1.25
    emulate_ragged: Optional[bool] = None  # None: emulate on CPU only
    quant: str = "none"  # "fp8": the local expert GEMMs in FP8 (SPEC §6), as on one device

    @property
    def n_expert_shards(self) -> int:
        return self.mesh.shape["expert"]

    @property
    def n_tensor(self) -> int:
        return self.mesh.shape.get("tensor", 1)


def enable(model, mesh: Mesh, strategy: str = "allgather", rules: Rules = DEFAULT_RULES, *,
           capacity_factor: float = 1.25, emulate_ragged: Optional[bool] = None):
    """Make every MoE layer of ``model`` run expert-parallel on ``mesh``. Returns the model."""
    from dsv3_jax.model.moe import MoE
    if strategy not in STRATEGIES:
        raise MeshError(f"unknown expert-parallel strategy {strategy!r} (fix: use one of {list(STRATEGIES)}).")
    cfg = model.cfg
    n_ep = mesh.shape.get("expert", 1)
    if cfg.n_routed_experts % n_ep:
        raise MeshError(f"{cfg.n_routed_experts} routed experts cannot be split over the mesh's expert axis of "
                        f"size {n_ep} (fix: choose an expert axis size that divides {cfg.n_routed_experts}).")
    target = rules["batch"]
    batch_axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape.get(a, 1) > 1)
    if n_ep > 1 and "expert" not in batch_axes:
        raise MeshError("expert parallelism needs the batch sharded over the 'expert' axis "
                        "(fix: keep 'expert' in the 'batch' rule).")
    if capacity_factor <= 0:
        raise MeshError(f"capacity_factor={capacity_factor} must be > 0 (fix: use e.g. 1.25).")
    ep = ExpertParallel(mesh, strategy, batch_axes, cfg.moe_impl, cfg.moe_block_size, capacity_factor, emulate_ragged,
                        cfg.quant)
    iter_modules = getattr(nnx, "iter_modules", None) or (lambda m: m.iter_modules())
    for _, module in iter_modules(model):
        if isinstance(module, MoE):
            module.ep = ep
    return model


def _local_expert_sum(x, experts, weights, w_gate, w_up, w_down, ep: ExpertParallel):
    """Σ_k w_k FFN_{e_k}(x) over the slots whose expert ``e_k`` is local (ids in ``[0, E_loc)``; any
    other id is a slot owned elsewhere). ``x: [N, D]``, ``experts/weights: [N, K]`` → fp32 ``[N, D]``."""
    N, D = x.shape
    K = experts.shape[-1]
    e_loc = w_gate.shape[0]
    mine = (experts >= 0) & (experts < e_loc)
    slot_expert = jnp.where(mine, experts, e_loc)  # e_loc = the null expert (zero weights)
    order, sizes = sort_by_expert(slot_expert, e_loc + 1)
    pad = lambda w: jnp.concatenate([w, jnp.zeros((1,) + w.shape[1:], w.dtype)])  # noqa: E731
    y_sorted = expert_ffn(x[order // K], sizes, pad(w_gate), pad(w_up), pad(w_down), impl=ep.impl, block=ep.block,
                          quant=ep.quant)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True).reshape(N, K, D)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), jnp.where(mine, weights, 0.0))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name: str, max_chunk: int):
    """``jax.lax.ragged_all_to_all`` semantics from collectives XLA:CPU has: every chunk is padded to
    ``max_chunk`` rows and exchanged with a dense ``all_to_all``, then scattered to its offset."""
    n = input_offsets.shape[0]
    rows = jnp.arange(max_chunk)
    idx = jnp.clip(input_offsets[:, None] + rows[None, :], 0, operand.shape[0] - 1)
    chunks = jnp.where((rows[None, :] < send_sizes[:, None]).reshape(n, max_chunk, *([1] * (operand.ndim - 1))),
                       operand[idx], 0)
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True).reshape(n, max_chunk, *operand.shape[1:])
    # where each sender asked its chunk to land in *my* output
    offs = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(rows[None, :] < recv_sizes[:, None], offs[:, None] + rows[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(recv.reshape(-1, *operand.shape[1:]), mode="drop")


def _exchange(ep: ExpertParallel, x, experts, weights, w_gate, w_up, w_down):
    """The a2a strategies inside shard_map: x ``[T, D]``, experts/weights ``[T, K]`` (global ids).
    Returns (fp32 output ``[T, D]``, dropped token-slots, total token-slots)."""
    n = ep.n_expert_shards
    T, D = x.shape
    K = experts.shape[-1]
    e_loc = w_gate.shape[0]
    me = jax.lax.axis_index("expert")
    dest_of_slot = experts // e_loc                                        # [T, K]
    need = (dest_of_slot[:, :, None] == jnp.arange(n)).any(1)              # [T, n]: token t goes to shard j
    send_sizes = need.sum(0).astype(jnp.int32)                             # [n]
    if ep.strategy == "a2a_capacity":
        cap = min(T, -(-int(ep.capacity_factor * T * K) // n))
        rank = jnp.cumsum(need, axis=0) - 1                                # position within destination
        kept = need & (rank < cap)
        slots_per_pair = (dest_of_slot[:, :, None] == jnp.arange(n)).sum(1)  # [T, n]
        dropped = jnp.where(need & ~kept, slots_per_pair, 0).sum()
        need, send_sizes = kept, jnp.minimum(send_sizes, cap)
        chunk = cap
    else:
        chunk, dropped = T, jnp.zeros((), jnp.int32)
    # Pairs (j, t) in destination-major order; the first sum(send_sizes) rows are real.
    pair_order = jnp.argsort(~need.T.reshape(-1), stable=True)
    src_token = pair_order % T
    pair_dest = pair_order // T
    local_ids = jnp.where(dest_of_slot[src_token] == pair_dest[:, None], experts[src_token] % e_loc, -1)
    send_x, send_w = x[src_token], weights[src_token]
    input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
    recv_sizes = jax.lax.all_to_all(send_sizes, "expert", 0, 0, tiled=True)
    recv_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
    output_offsets = jax.lax.all_to_all(recv_offsets, "expert", 0, 0, tiled=True)
    back_offsets = jax.lax.all_to_all(input_offsets, "expert", 0, 0, tiled=True)
    emulate = ep.emulate_ragged if ep.emulate_ragged is not None else jax.default_backend() == "cpu"
    if ep.strategy == "a2a_capacity" or emulate:
        def a2a(op, out, io, ss, oo, rs):
            return emulated_ragged_all_to_all(op, out, io, ss, oo, rs, axis_name="expert", max_chunk=chunk)
    else:
        def a2a(op, out, io, ss, oo, rs):
            return jax.lax.ragged_all_to_all(op, out, io, ss, oo, rs, axis_name="expert")
    buf = n * chunk
    recv_x = a2a(send_x, jnp.zeros((buf, D), x.dtype), input_offsets, send_sizes, output_offsets, recv_sizes)
    recv_e = a2a(local_ids, jnp.full((buf, K), -1, local_ids.dtype), input_offsets, send_sizes, output_offsets,
                 recv_sizes)
    recv_w = a2a(send_w, jnp.zeros((buf, K), send_w.dtype), input_offsets, send_sizes, output_offsets, recv_sizes)
    y = _local_expert_sum(recv_x, recv_e, recv_w, w_gate, w_up, w_down, ep)
    back = a2a(y, jnp.zeros((n * T, D), y.dtype), recv_offsets, recv_sizes, back_offsets, send_sizes)
    real = jnp.arange(n * T) < send_sizes.sum()
    out = jnp.zeros((T, D), jnp.float32).at[src_token].add(jnp.where(real[:, None], back, 0))
    return out, dropped, jnp.asarray(T * K, jnp.int32)


def moe_forward(ep: ExpertParallel, cfg, x: jax.Array, router_kernel: jax.Array, bias: Optional[jax.Array],
                w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array):
    """Routing and routed experts under ``shard_map``. ``x: [B, S, D]``; router kernel ``[D, E]``;
    expert weights ``[E, D, I]``/``[E, I, D]``. Routing runs on each device's own tokens (a global
    top-k would make XLA gather every token's scores). Returns (routed output ``[B, S, D]``,
    ``Routing`` with ``[B·S, ...]`` fields, dropped token-slots over the global batch)."""
    from dsv3_jax.model.moe import Routing, route
    tensor = "tensor" if ep.n_tensor > 1 and w_gate.shape[-1] % ep.n_tensor == 0 else None
    tok = P(ep.batch_axes or None, None, None)
    w_in = P("expert", None, tensor)
    w_out = P("expert", tensor, None)
    has_bias = bias is not None

    def local(x, kernel, bias, w_gate, w_up, w_down):
        B, S, D = x.shape
        xt = x.reshape(-1, D)
        routing = route(xt.astype(jnp.float32) @ kernel.astype(jnp.float32), bias if has_bias else None, cfg)
        wt, et = routing.weights, routing.experts
        if ep.strategy == "allgather" or ep.n_expert_shards == 1:
            if ep.n_expert_shards > 1:
                xt, wt, et = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (xt, wt, et))
            lo = jax.lax.axis_index("expert") * w_gate.shape[0]
            out = _local_expert_sum(xt, et - lo, wt, w_gate, w_up, w_down, ep)
            dropped = jnp.zeros((), jnp.int32)
            if tensor:
                out = jax.lax.psum(out, "tensor")
            if ep.n_expert_shards > 1:
                out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        else:
            out, dropped, _ = _exchange(ep, xt, et, wt, w_gate, w_up, w_down)
            if tensor:
                out = jax.lax.psum(out, "tensor")
        dropped = jax.lax.psum(dropped, tuple(ep.mesh.axis_names)) // ep.n_tensor  # tokens replicated over tensor
        shaped = lambda a: a.reshape(B, S, -1)  # noqa: E731
        return (out.reshape(B, S, D).astype(x.dtype), shaped(routing.weights), shaped(routing.experts),
                shaped(routing.scores), dropped)

    fn = jax.shard_map(local, mesh=ep.mesh, in_specs=(tok, P(), P(), w_in, w_in, w_out),
                       out_specs=(tok, tok, tok, tok, P()), check_vma=False)
    dummy_bias = bias if has_bias else jnp.zeros((), jnp.float32)
    out, weights, experts, scores, dropped = fn(x, router_kernel, dummy_bias, w_gate, w_up, w_down)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    return out, Routing(flat(weights), flat(experts), flat(scores)), dropped


# ---- communication volume (benchmarks/expert_parallel.py, notebooks/expert_parallel.ipynb) ----------

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
