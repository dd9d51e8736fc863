"""Dropless expert compute on one device: token-slots sorted by expert, then a grouped GEMM.

Two implementations of ``grouped_matmul(x_sorted, w, group_sizes)`` (rows of ``x_sorted`` are
grouped by expert, ``w: [E, K, N]``):

* ``ragged``  — ``jax.lax.ragged_dot``: the right primitive on GPU/TPU.
* ``looped`` — expert-major tiles of a fixed capacity, looped until every row is done
  (``looped_ffn``): the CPU default, batched matmuls against the weight stacks as they are.
* ``blocked`` — pad each expert's group to a multiple of ``block`` rows and run one batched einsum
  over blocks with each block's expert weights. XLA:CPU's ragged_dot is ~100× slower than a dense
  matmul of the same FLOPs; this runs near dense speed. Still dropless: the static block count
  ``ceil(T·K/block) + E`` covers every possible routing.

Memory is O(tokens · top_k · hidden) either way; no dense all-experts einsum.

Which one runs is chosen at trace time from the rows per expert (``grouping``): with at most one row
per expert on average (a one- or two-token decode step) the blocked layout would pad every expert's
group to a whole block and gather ``ceil(rows/block) + E`` weight blocks, so ``per_row_ffn`` instead
gathers each row's own expert weights (``rows`` gathers, no sort, no padding); larger batches
(prefill, training) get blocks sized to the expected rows per expert (docs/design.md §MoE grouping).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8 import grouped_linear, quantize_experts

from .looped_ffn import looped_ffn, round_capacity


def auto_block_size(rows: int, n_experts: int) -> int:
    """Rows per block of the blocked GEMM when none is configured: the expected rows per expert
    rounded down to a power of two, within [8, 128] — small blocks waste little padding on small
    batches, large ones keep the per-block weight gathers few on large batches."""
    per_expert = max(1, rows // max(1, n_experts))
    return int(min(128, max(8, 1 << (per_expert.bit_length() - 1))))


def grouping(impl: str, rows: int, n_experts: int, block: int = 0) -> tuple[str, int]:
    """``(impl, block)`` for ``rows`` token-slots over ``n_experts`` experts, decided at trace time:
    ``block`` > 0 is a fixed choice (``RuntimeConfig.moe_block_size``) and keeps ``impl``; otherwise the
    blocked GEMM becomes ``"per_row"`` when there is at most one row per expert, else gets
    ``auto_block_size``. ``ragged`` (GPU/TPU) needs no block and is kept. ``looped`` (the CPU default)
    gets its round capacity (``round_capacity``), or ``per_row`` for decode-sized steps."""
    if impl == "looped":   # "block" = a round's rows per expert (looped_ffn); moe_block_size is blocked's only
        return ("per_row", 1) if rows <= n_experts and not block else (impl, round_capacity(rows, n_experts))
    if block:
        return impl, block
    if impl == "blocked" and rows <= n_experts:
        return "per_row", 1
    return impl, auto_block_size(rows, n_experts)


def per_row_ffn(x: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array) -> jax.Array:
    """SwiGLU of each row with its own expert's weights: ``x: [N, D]``, ``experts: [N]`` int →
    ``[N, D]`` in ``x``'s dtype (fp32 accumulation). Reads ``N`` experts' weights, the least a step
    with at most one row per expert can read; what decode steps use (``grouping``)."""
    def mm(a, w):
        return jnp.einsum("nd,ndi->ni", a, w[experts].astype(a.dtype), preferred_element_type=jnp.float32
                          ).astype(a.dtype)
    return mm(jax.nn.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "looped" if jax.default_backend() == "cpu" else "ragged"


def sort_by_expert(expert_idx: jax.Array, num_experts: int):
    """``expert_idx: [T, K]`` → (order [T·K] slot permutation, group_sizes [E] int32)."""
    flat = expert_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


class BlockLayout:
    """Where each sorted row lands in the block-padded buffer, and which expert owns each block."""

    def __init__(self, group_sizes: jax.Array, num_rows: int, block: int):
        num_experts = group_sizes.shape[0]
        self.block = block
        self.num_blocks = -(-num_rows // block) + num_experts  # static, dropless bound
        padded = (group_sizes + block - 1) // block * block
        padded_end = jnp.cumsum(padded)
        padded_start = padded_end - padded
        start = jnp.cumsum(group_sizes) - group_sizes
        expert_of_row = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=num_rows)
        # destination of sorted row r: its group's padded start + its rank within the group
        self.dest = padded_start[expert_of_row] + jnp.arange(num_rows) - start[expert_of_row]
        block_first_row = jnp.arange(self.num_blocks) * block
        self.block_expert = jnp.minimum(
            jnp.searchsorted(padded_end, block_first_row, side="right"), num_experts - 1)

    def scatter(self, x: jax.Array) -> jax.Array:
        buf = jnp.zeros((self.num_blocks * self.block,) + x.shape[1:], x.dtype)
        return buf.at[self.dest].set(x, unique_indices=True).reshape(self.num_blocks, self.block, *x.shape[1:])

    def gather(self, y: jax.Array) -> jax.Array:
        return y.reshape(self.num_blocks * self.block, *y.shape[2:])[self.dest]

    def matmul(self, xb: jax.Array, w: jax.Array) -> jax.Array:
        """``xb: [NB, block, K]`` times each block's expert weight ``w[e]: [K, N]`` → ``[NB, block, N]``;
        a block of the padding group (expert id ``w.shape[0]``, see ``expert_ffn``) gives zeros."""
        wb = jnp.take(w, self.block_expert, axis=0, mode="fill", fill_value=0)
        return jnp.einsum("nbk,nkj->nbj", xb, wb, preferred_element_type=jnp.float32).astype(xb.dtype)


# Blocks per FP8 grouped GEMM call: pallas_kernels.fp8.grouped_linear gathers each block's expert weights
# and makes a per-block fp32 weight gradient ([blocks, D, I] each); over a whole layout that is
# 327 x 7168 x 2048 x 4 bytes = 18 GiB per chip at 671B, in chunks of 8 blocks 0.45 GiB.
FP8_CHUNK_BLOCKS = 8


def _in_chunks(fn, xb: jax.Array, block_expert: jax.Array, chunk: int) -> jax.Array:
    """``fn(xb, block_expert)`` over chunks of ``chunk`` blocks in sequence (``lax.map``; each chunk
    rematerialised in the backward pass, so nothing per chunk is stacked), the same result as one call:
    blocks are independent, padding blocks are zero rows."""
    nb = xb.shape[0]
    if nb <= chunk:
        return fn(xb, block_expert)
    pad = -nb % chunk
    xp = jnp.concatenate([xb, jnp.zeros((pad,) + xb.shape[1:], xb.dtype)]) if pad else xb
    bp = jnp.concatenate([block_expert, jnp.zeros((pad,), block_expert.dtype)]) if pad else block_expert
    body = jax.checkpoint(lambda a: fn(*a), policy=jax.checkpoint_policies.nothing_saveable)
    y = jax.lax.map(body, (xp.reshape(-1, chunk, *xb.shape[1:]), bp.reshape(-1, chunk)))
    return y.reshape(-1, *y.shape[2:])[:nb]


def expert_ffn(x_sorted: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
               w_down: jax.Array, *, impl: str, block: int = 128, quant: str = "none", fp8_backend: str = "auto",
               interpret: bool = False) -> jax.Array:
    """SwiGLU of each sorted row with its expert's weights. ``x_sorted: [N, D]``,
    ``w_gate/w_up: [E, D, I]``, ``w_down: [E, I, D]`` → ``[N, D]``. ``group_sizes``: ``[E]``, or
    ``[E + 1]`` where the last group is padding whose rows come out zero (blocked and FP8 layouts: its
    blocks multiply by zero weights, no zero expert is appended to the stack; ``ragged`` takes ``[E]``).

    ``quant='fp8'``: the three expert GEMMs (and their gradients) in FP8 on the blocked layout
    (``pallas_kernels.fp8.grouped_linear``, docs/architecture.md §6), whatever ``impl``; each weight stack
    is quantized once, in its own layout, for all chunks of blocks."""
    if quant == "fp8":
        layout = BlockLayout(group_sizes, x_sorted.shape[0], block)
        xb = layout.scatter(x_sorted)
        qs = [quantize_experts(w) for w in (w_gate, w_up, w_down)]

        def ffn(xb, block_expert):
            def mm(a, w, q):
                return grouped_linear(a, w, block_expert, backend=fp8_backend, interpret=interpret, quantized=q)
            return mm(jax.nn.silu(mm(xb, w_gate, qs[0])) * mm(xb, w_up, qs[1]), w_down, qs[2])
        return layout.gather(_in_chunks(ffn, xb, layout.block_expert, FP8_CHUNK_BLOCKS))
    impl = resolve_impl(impl)
    if impl == "ragged":
        def mm(a, w):
            # output (and so the backward's cotangents) in the operands' dtype; the MXU accumulates in fp32
            return jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes)
        h = jax.nn.silu(mm(x_sorted, w_gate)) * mm(x_sorted, w_up)
        return mm(h, w_down)
    if impl == "looped":
        return looped_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, block)
    if impl == "blocked":
        layout = BlockLayout(group_sizes, x_sorted.shape[0], block)
        xb = layout.scatter(x_sorted)
        h = jax.nn.silu(layout.matmul(xb, w_gate)) * layout.matmul(xb, w_up)
        return layout.gather(layout.matmul(h, w_down))
    raise ValueError(f"unknown grouped GEMM implementation {impl!r}; use 'ragged', 'looped', 'blocked' or 'auto'.")
