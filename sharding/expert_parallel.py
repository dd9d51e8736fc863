"""Expert parallelism: the MoE expert compute under ``shard_map`` (issue M3, SPEC §4 and §9).

This module sits below the model: it knows collectives and meshes, not DeepSeek-V3. The model's MoE
layer hands it two functions — ``route_fn`` (router logits → gates, expert ids, scores; run on each
device's own tokens) and ``expert_fn`` (the local grouped-GEMM expert sum, the same function the
single-device MoE uses) — and the strategy decides which tokens meet which expert weights. Router
statistics are reduced over the global batch by the model afterwards, so the aux-loss-free bias
update sees every token. Strategies:

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
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from .errors import MeshError
from .kernels import platform_of
from .rules import DEFAULT_RULES, Rules

STRATEGIES = ("allgather", "ragged_a2a", "a2a_capacity")

# (x [N, D], experts [N, K] local ids — anything outside [0, E_local) belongs to another shard —,
#  gates [N, K], w_gate, w_up, w_down) -> fp32 [N, D]: Σ_k gate_k · FFN_{e_k}(x) over the local slots
ExpertFn = Callable[..., jax.Array]
# (x [T, D], router kernel [D, E], bias [E] | None) -> (gates [T, K], experts [T, K], scores [T, E])
RouteFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """One expert-parallel layout: the mesh, the strategy and the batch's mesh axes. Build it with
    ``ExpertParallel.create``, which checks that the mesh fits the experts."""
    mesh: Mesh
    strategy: str
    batch_axes: tuple
    capacity_factor: float = 1.25
    emulate_ragged: Optional[bool] = None  # None: emulate on CPU only

    @classmethod
    def create(cls, mesh: Mesh, strategy: str, n_experts: int, rules: Rules = DEFAULT_RULES, *,
               capacity_factor: float = 1.25, emulate_ragged: Optional[bool] = None) -> "ExpertParallel":
        if strategy not in STRATEGIES:
            raise MeshError(f"unknown expert-parallel strategy {strategy!r} (fix: use one of {list(STRATEGIES)}).")
        n_ep = mesh.shape.get("expert", 1)
        if n_experts % n_ep:
            raise MeshError(f"{n_experts} routed experts cannot be split over the mesh's expert axis of size {n_ep} "
                            f"(fix: choose an expert axis size that divides {n_experts}).")
        batch_axes = rules.batch_axes(mesh)
        if n_ep > 1 and "expert" not in batch_axes:
            raise MeshError("expert parallelism needs the batch sharded over the 'expert' axis "
                            "(fix: keep 'expert' in the 'batch' rule).")
        if not capacity_factor > 0:
            raise MeshError(f"capacity_factor={capacity_factor} must be > 0 (fix: use e.g. 1.25).")
        return cls(mesh, strategy, batch_axes, capacity_factor, emulate_ragged)

    @property
    def n_expert_shards(self) -> int:
        return self.mesh.shape.get("expert", 1)

    @property
    def n_tensor(self) -> int:
        return self.mesh.shape.get("tensor", 1)


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


def _exchange(ep: ExpertParallel, expert_fn: ExpertFn, x, experts, weights, w_gate, w_up, w_down):
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
    # XLA:CPU has no ragged_all_to_all; decide by the devices compiled for, not this host's backend
    emulate = ep.emulate_ragged if ep.emulate_ragged is not None else platform_of(ep.mesh) == "cpu"
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
    y = expert_fn(recv_x, recv_e, recv_w, w_gate, w_up, w_down)
    back = a2a(y, jnp.zeros((n * T, D), y.dtype), recv_offsets, recv_sizes, back_offsets, send_sizes)
    real = jnp.arange(n * T) < send_sizes.sum()
    out = jnp.zeros((T, D), jnp.float32).at[src_token].add(jnp.where(real[:, None], back, 0))
    return out, dropped, jnp.asarray(T * K, jnp.int32)


def moe_forward(ep: ExpertParallel, x: jax.Array, router_kernel: jax.Array, bias: Optional[jax.Array],
                w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, route_fn: RouteFn, expert_fn: ExpertFn):
    """Routing and routed experts under ``shard_map``. ``x: [B, S, D]``; router kernel ``[D, E]``;
    expert weights ``[E, D, I]``/``[E, I, D]``. Routing runs on each device's own tokens (a global
    top-k would make XLA gather every token's scores). Returns (routed output ``[B, S, D]``,
    ``(gates, experts, scores)`` with ``[B·S, ·]`` rows, dropped token-slots over the global batch)."""
    tensor = "tensor" if ep.n_tensor > 1 and w_gate.shape[-1] % ep.n_tensor == 0 else None
    tok = P(ep.batch_axes or None, None, None)
    w_in = P("expert", None, tensor)
    w_out = P("expert", tensor, None)
    has_bias = bias is not None

    def local(x, kernel, bias, w_gate, w_up, w_down):
        B, S, D = x.shape
        xt = x.reshape(-1, D)
        gates, experts, scores = route_fn(xt, kernel, bias if has_bias else None)
        wt, et = gates, experts
        if ep.strategy == "allgather" or ep.n_expert_shards == 1:
            if ep.n_expert_shards > 1:
                xt, wt, et = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (xt, wt, et))
            lo = jax.lax.axis_index("expert") * w_gate.shape[0]
            out = expert_fn(xt, et - lo, wt, w_gate, w_up, w_down)
            dropped = jnp.zeros((), jnp.int32)
            if tensor:
                out = jax.lax.psum(out, "tensor")
            if ep.n_expert_shards > 1:
                out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        else:
            out, dropped, _ = _exchange(ep, expert_fn, xt, et, wt, w_gate, w_up, w_down)
            if tensor:
                out = jax.lax.psum(out, "tensor")
        dropped = jax.lax.psum(dropped, tuple(ep.mesh.axis_names)) // ep.n_tensor  # tokens replicated over tensor
        shaped = lambda a: a.reshape(B, S, -1)  # noqa: E731
        return out.reshape(B, S, D).astype(x.dtype), shaped(gates), shaped(experts), shaped(scores), dropped

    fn = jax.shard_map(local, mesh=ep.mesh, in_specs=(tok, P(), P(), w_in, w_in, w_out),
                       out_specs=(tok, tok, tok, tok, P()), check_vma=False)
    dummy_bias = bias if has_bias else jnp.zeros((), jnp.float32)
    out, gates, experts, scores, dropped = fn(x, router_kernel, dummy_bias, w_gate, w_up, w_down)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    return out, (flat(gates), flat(experts), flat(scores)), dropped
