"""Expert parallelism: the MoE expert compute under ``shard_map`` (issue M3, docs/architecture.md §4 and §9).

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
  (``ragged_all_to_all``), the shard runs its local experts for the slots it owns (only those: the
  grouped GEMM never sees foreign slots), and a reverse ``ragged_all_to_all`` brings the partial sums
  home. Dropless with bounded buffers: the exchange runs in *rounds* of at most
  ``c = ceil(round_factor · T · K / n_shards)`` slots per source→destination pair (``round_factor``
  1.25 × the balanced load); a pair with more goes on in further rounds (``_rounds_layout``), so the
  receive buffers are ``n_shards · c`` rows however skewed the routing, not ``n_shards · T`` (the
  worst case: 64 × a shard's tokens at 671B). XLA:CPU has no ragged_all_to_all, so on CPU the same
  bookkeeping runs over a padded ``all_to_all`` emulation (``emulated_ragged_all_to_all``); GPU/TPU
  use the real collective.
* ``a2a_capacity`` — one round of the same exchange over a dense ``all_to_all`` with capacity
  ``c = ceil(capacity_factor · T · K / n_shards)`` slots per destination; what would need a second
  round is dropped and the dropped token-slots are reported. Opt-in only: DeepSeek-V3 never drops
  tokens.

Exchange dtypes (docs/architecture.md §6): token rows go out in the compute dtype, or with
``dispatch_fp8`` (``quant=fp8``) as e4m3 with one float32 scale per 1×128 tile — the tiles the FP8
grouped GEMM quantises them into anyway, so the expert GEMM sees the same e4m3 values as on one device;
the backward sends the rows' gradient back in the compute dtype (``_fp8_wire``). Partial expert sums
come home in the compute dtype (bf16 when computing in bf16) and are accumulated in fp32.

With group-limited routing and ``n_group`` a multiple of the expert-shard count, each group lives on
one shard, so a token reaches at most ``topk_group`` shards (docs/architecture.md §4 node-limited routing): ragged
exchanges move ``≤ topk_group`` copies of a token instead of ``K`` or ``n_shards``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.fp8 import dequantize_activation, quantize_activation

from .errors import MeshError
from .kernels import context_mesh, free_axes, platform_of
from .rules import DEFAULT_RULES, Rules

STRATEGIES = ("allgather", "ragged_a2a", "a2a_capacity")
ROUND_FACTOR = 1.25
# ``auto``: the expert-axis size from which the ragged exchange is used on TPU/GPU. ``allgather`` gathers
# every peer's tokens onto each shard, ``n_expert`` × the local batch (64× at 671B on expert=64); the
# ragged exchange moves each token to the ≤ topk_group shards holding its experts (docs/architecture.md §9).
# On small axes the gather is a few × the batch and one collective; on CPU ragged_all_to_all is emulated.
RAGGED_MIN_EXPERT_AXIS = 16


def resolve_strategy(strategy: str, mesh: Optional[Mesh]) -> str:
    """The concrete strategy for ``mesh``: ``auto`` is ``ragged_a2a`` on a TPU/GPU mesh whose ``expert``
    axis has ``RAGGED_MIN_EXPERT_AXIS`` or more devices, else ``allgather``; any other name is kept."""
    if strategy != "auto":
        return strategy
    n_ep = mesh.shape.get("expert", 1) if mesh is not None else 1
    return "ragged_a2a" if platform_of(mesh) in ("tpu", "gpu") and n_ep >= RAGGED_MIN_EXPERT_AXIS else "allgather"

# (x [N, D], experts [N, K] local ids — anything outside [0, E_local) belongs to another shard —,
#  gates [N, K], w_gate, w_up, w_down, *, max_slots=None, out_dtype=float32) -> [N, D]:
#  Σ_k gate_k · FFN_{e_k}(x) over the local slots, of which there are at most max_slots
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
    # ragged_a2a: slots per source→destination pair and round, as a multiple of the balanced load
    # T·K/n (more rounds when a pair has more; never dropped)
    round_factor: float = ROUND_FACTOR
    # quant=fp8: token rows are dispatched as e4m3 + 1×128 float32 scales (docs/architecture.md §6)
    dispatch_fp8: bool = False

    @classmethod
    def create(cls, mesh: Mesh, strategy: str, n_experts: int, rules: Rules = DEFAULT_RULES, *,
               capacity_factor: float = 1.25, emulate_ragged: Optional[bool] = None,
               dispatch_fp8: bool = False) -> "ExpertParallel":
        strategy = resolve_strategy(strategy, mesh)
        if strategy not in STRATEGIES:
            raise MeshError(f"unknown expert-parallel strategy {strategy!r} (fix: use 'auto' or one of "
                            f"{list(STRATEGIES)}).")
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
        return cls(mesh, strategy, batch_axes, capacity_factor, emulate_ragged, dispatch_fp8=dispatch_fp8)

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_wire(send: Callable[..., jax.Array], x: jax.Array, *aux: jax.Array) -> jax.Array:
    """``send(x, *aux)`` — a linear exchange of the rows of ``x [N, D]`` (a gather and collectives, any
    dtype; ``aux``: its integer offsets and sizes) — with the rows on the wire as e4m3 bits plus one
    float32 scale per 1×128 tile, dequantised to ``x.dtype`` on arrival: ``D + 4·D/128`` bytes a row
    instead of ``D·itemsize``. The receiver's FP8 GEMM re-quantises the same tiles to the same e4m3
    values (a tile's amax maps to ±448 again), so only rounding in the last bit of the scale differs
    from one device. Backward: the transpose of ``send`` applied to the gradient in ``x.dtype``
    (quantisation is straight-through; a gradient is never sent in FP8, which would flush it to zero)."""
    q, scale = quantize_activation(x)
    bits = send(jax.lax.bitcast_convert_type(q, jnp.uint8), *aux)
    return dequantize_activation(jax.lax.bitcast_convert_type(bits, q.dtype), send(scale, *aux), x.dtype)


def _fp8_wire_fwd(send, x, *aux):
    # residuals: the offsets, and x's shape and dtype in a zero-byte array (not x: send is linear)
    return _fp8_wire(send, x, *aux), (jnp.zeros(x.shape + (0,), x.dtype), aux)


def _fp8_wire_bwd(send, res, g):
    like, aux = res
    zeros = jnp.zeros(like.shape[:-1], like.dtype)
    dx = jax.vjp(lambda x: send(x, *aux), zeros)[1](g.astype(like.dtype))[0]
    return (dx,) + (None,) * len(aux)


_fp8_wire.defvjp(_fp8_wire_fwd, _fp8_wire_bwd)


def _send_rows(ep: ExpertParallel, send: Callable[..., jax.Array], x: jax.Array, *aux: jax.Array) -> jax.Array:
    """Dispatch the rows of ``x`` with ``send``: in FP8 under ``dispatch_fp8``, else as they are."""
    return _fp8_wire(send, x, *aux) if ep.dispatch_fp8 else send(x, *aux)


def _rounds_layout(ep: ExpertParallel, T: int, K: int, e_loc: int) -> tuple[int, int, int, int]:
    """Static sizes of the ragged exchange: (slot capacity ``c`` per source→destination pair and round,
    token rows per pair and round ``c_tok``, local slot rows per round ``s_cap``, rounds ``r_max``).

    A token holds at most ``kk = min(K, E_loc)`` slots on one shard. Pairs (token, destination) are sent
    in rounds: a pair goes in round ``⌊slots queued before it for that destination / c⌋``, so one round
    carries ``≤ c`` tokens and ``< c + kk`` slots from each source to each destination, and every pair
    has a round (a source has ``≤ T·kk`` slots for one destination). Nothing is dropped; the buffers are
    ``n · c_tok`` token rows and ``s_cap`` slot rows whatever the routing."""
    n = ep.n_expert_shards
    kk = min(K, e_loc)
    factor = ep.capacity_factor if ep.strategy == "a2a_capacity" else ep.round_factor
    c = max(1, min(T * kk, -(-int(factor * T * K) // n)))
    c_tok = min(T, c)
    s_cap = n * min(c + kk - 1, c_tok * kk)
    r_max = 1 if ep.strategy == "a2a_capacity" else -(-(T * kk) // c)
    return c, c_tok, s_cap, r_max


def _gather_rows(rows: jax.Array) -> jax.Array:
    """Every expert shard's rows, in shard order (the ``allgather`` dispatch)."""
    return jax.lax.all_gather(rows, "expert", axis=0, tiled=True)


def _send_pairs(a2a, buf: int, rows, p_tok, offs, sizes, mine_off, rsizes):
    """One round of the ragged dispatch: the row of each pair's token to the pair's shard (any dtype)."""
    return a2a(rows[p_tok], jnp.zeros((buf,) + rows.shape[1:], rows.dtype), offs, sizes, mine_off, rsizes)


def _exchange(ep: ExpertParallel, expert_fn: ExpertFn, x, experts, weights, w_gate, w_up, w_down,
              mesh_axes: tuple):
    """The a2a strategies inside shard_map: x ``[T, D]``, experts/weights ``[T, K]`` (global ids).
    Returns (fp32 output ``[T, D]``, dropped token-slots, total token-slots).

    Each token goes once to each shard holding one of its experts (a *pair*), with its local expert
    ids and gates; pairs are packed per destination into rounds of bounded size (``_rounds_layout``).
    ``ragged_a2a`` runs as many rounds as the busiest pair of the expert group needs (a ``scan`` over
    the static maximum, rounds past it skipped by ``cond``; usually one), so it is dropless with buffers
    of ``~round_factor × the balanced load``. ``a2a_capacity`` runs one round and drops the rest."""
    n = ep.n_expert_shards
    T, D = x.shape
    K = experts.shape[-1]
    e_loc = w_gate.shape[0]
    me = jax.lax.axis_index("expert")
    c, c_tok, s_cap, r_max = _rounds_layout(ep, T, K, e_loc)
    dest = experts // e_loc                                                # [T, K] shard of each slot
    same = dest[:, :, None] == dest[:, None, :]                            # [T, K, K]
    earlier = jnp.arange(K)[None, :] < jnp.arange(K)[:, None]              # [k, k']: k' < k
    first = ~(same & earlier[None]).any(-1)                                # slot k opens the pair (t, dest)
    n_pairs = T * min(n, K)                                                # a token reaches ≤ min(n, K) shards
    key = jnp.where(first, dest, n).reshape(-1)
    order = jnp.argsort(key, stable=True)[:n_pairs]                        # pairs, destination-major
    p_dest = key[order]                                                    # n: padding
    p_tok = order // K
    real = p_dest < n
    p_slots = jnp.where(real, same.sum(-1).reshape(-1)[order], 0)          # slots of the pair
    # slots queued before each pair for its destination → its round
    slots_to = jax.ops.segment_sum(p_slots, p_dest, n + 1)[:n]
    before = jnp.cumsum(p_slots) - p_slots - (jnp.cumsum(slots_to) - slots_to)[jnp.minimum(p_dest, n - 1)]
    p_round = jnp.where(real, before // c, r_max)                          # r_max: not sent
    dropped = (p_round >= r_max) & real
    dropped_slots = jnp.where(dropped, p_slots, 0).sum()
    cnt = jnp.zeros((n + 1, r_max + 1), jnp.int32).at[p_dest, jnp.minimum(p_round, r_max)].add(1)[:n, :r_max]
    pairs_to = jnp.bincount(p_dest, length=n + 1)[:n].astype(jnp.int32)
    start = ((jnp.cumsum(pairs_to) - pairs_to)[:, None] + jnp.cumsum(cnt, 1) - cnt).astype(jnp.int32)  # [n, r_max]
    recv_cnt = jax.lax.all_to_all(cnt, "expert", 0, 0, tiled=True)        # [n sources, r_max]
    send_e = jnp.where(dest[p_tok] == p_dest[:, None], experts[p_tok] % e_loc, -1).astype(jnp.int32)
    send_w = weights[p_tok]
    block_off = (jnp.arange(n) * c_tok).astype(jnp.int32)                  # source s's rows at s·c_tok
    mine_off = jnp.full((n,), me * c_tok, jnp.int32)                       # where my rows land at each peer
    # XLA:CPU has no ragged_all_to_all; decide by the devices compiled for, not this host's backend
    emulate = ep.emulate_ragged if ep.emulate_ragged is not None else platform_of(ep.mesh) == "cpu"
    if emulate or ep.strategy == "a2a_capacity":   # a2a_capacity: a dense all_to_all of c_tok rows per peer
        def a2a(op, out, io, ss, oo, rs):
            return emulated_ragged_all_to_all(op, out, io, ss, oo, rs, axis_name="expert", max_chunk=c_tok)
    else:
        def a2a(op, out, io, ss, oo, rs):
            return jax.lax.ragged_all_to_all(op, out, io, ss, oo, rs, axis_name="expert")

    def one_round(out, r):
        sizes, offs, rsizes = cnt[:, r], start[:, r], recv_cnt[:, r]
        buf = n * c_tok

        recv_x = _send_rows(ep, functools.partial(_send_pairs, a2a, buf), x, p_tok, offs, sizes, mine_off, rsizes)
        recv_e = a2a(send_e, jnp.full((buf, K), -1, jnp.int32), offs, sizes, mine_off, rsizes)
        recv_w = a2a(send_w, jnp.zeros((buf, K), send_w.dtype), offs, sizes, mine_off, rsizes)
        # each token's partial sum over its local slots, summed and sent home in the compute dtype
        y = expert_fn(recv_x, recv_e, recv_w, w_gate, w_up, w_down, max_slots=s_cap, out_dtype=x.dtype)
        back = a2a(y, jnp.zeros((buf, D), y.dtype), block_off, rsizes, mine_off, sizes)
        j = jnp.arange(c_tok)
        tok = jnp.where(j[None, :] < sizes[:, None],
                        p_tok[jnp.minimum(offs[:, None] + j[None, :], n_pairs - 1)], T).reshape(-1)
        return out.at[tok].add(back.astype(jnp.float32), mode="drop")

    out = jnp.zeros((T, D), jnp.float32)
    if r_max == 1:
        out = one_round(out, 0)
    else:
        # every device takes the same branches (collectives inside), whatever its expert group
        needed = jax.lax.pmax(jnp.max(jnp.where(real, p_round, -1)) + 1, mesh_axes)
        step = jax.checkpoint(lambda out, r: jax.lax.cond(r < needed, one_round, lambda o, _: o, out, r),
                              policy=jax.checkpoint_policies.nothing_saveable)
        out, _ = jax.lax.scan(lambda o, r: (step(o, r), None), out, jnp.arange(r_max))
    return out, dropped_slots, jnp.asarray(T * K, jnp.int32)


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
    # the axes "the whole mesh" spans for this layer, read here: inside ``local`` every axis is manual
    mesh_axes = free_axes(ep.mesh)

    def local(x, kernel, bias, w_gate, w_up, w_down):
        B, S, D = x.shape
        xt = x.reshape(-1, D)
        gates, experts, scores = route_fn(xt, kernel, bias if has_bias else None)
        wt, et = gates, experts
        if ep.strategy == "allgather" or ep.n_expert_shards == 1:
            if ep.n_expert_shards > 1:
                xt = _send_rows(ep, _gather_rows, xt)
                wt, et = _gather_rows(wt), _gather_rows(et)
            lo = jax.lax.axis_index("expert") * w_gate.shape[0]
            # partial sums over the local experts in the compute dtype: what the reduce-scatter moves
            out = expert_fn(xt, et - lo, wt, w_gate, w_up, w_down,
                            out_dtype=xt.dtype if ep.n_expert_shards > 1 or tensor else jnp.float32)
            dropped = jnp.zeros((), jnp.int32)
            if tensor:
                out = jax.lax.psum(out, "tensor")
            if ep.n_expert_shards > 1:
                out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        else:
            out, dropped, _ = _exchange(ep, expert_fn, xt, et, wt, w_gate, w_up, w_down, mesh_axes)
            if tensor:
                out = jax.lax.psum(out, "tensor")
        dropped = jax.lax.psum(dropped, mesh_axes) // ep.n_tensor  # tokens replicated over tensor
        shaped = lambda a: a.reshape(B, S, -1)  # noqa: E731
        return out.reshape(B, S, D).astype(x.dtype), shaped(gates), shaped(experts), shaped(scores), dropped

    fn = jax.shard_map(local, mesh=context_mesh(ep.mesh), in_specs=(tok, P(), P(), w_in, w_in, w_out),
                       out_specs=(tok, tok, tok, tok, P()), check_vma=False)
    dummy_bias = bias if has_bias else jnp.zeros((), jnp.float32)
    out, gates, experts, scores, dropped = fn(x, router_kernel, dummy_bias, w_gate, w_up, w_down)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    return out, (flat(gates), flat(experts), flat(scores)), dropped
