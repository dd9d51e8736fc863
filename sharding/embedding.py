"""Embedding lookup on a mesh without replicating the activations (docs/design.md §Memory at 671B).

The table ``[V, D]`` is laid out by the rules (``embed`` over ``fsdp × expert``, ``vocab`` over
``tensor``) and the token ids by the batch rule (``data × fsdp × expert``). Left to XLA, ``table[ids]``
partitions the lookup in the table's layout and must then move the ``[B, S, D]`` activation from
"D over fsdp×expert" to "B over data×fsdp×expert" (and its gradient back for the scatter-add): the
SPMD partitioner has no collective for that change of device group, replicates the tensor and slices
it ("Involuntary full rematerialization"), which on a pod is the global batch's activations on
every chip.

``lookup`` does the exchange explicitly, per shard: the ids of the devices sharing a data shard are
all-gathered (ints: cheap), each device looks up its ``D/n`` columns for all of them (its vocabulary
rows only, summed over the vocabulary axes), and one ``all_to_all`` over the same devices turns
"all rows × my columns" into "my rows × all columns". The backward is the transposed exchange and a
scatter-add into the local table shard — the gradient never exists unsharded.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from .kernels import context_mesh
from .rules import Rules


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def lookup(table: jax.Array, ids: jax.Array, mesh: Optional[Mesh], rules: Rules,
           table_axes: tuple[str, str] = ("vocab", "embed")) -> jax.Array:
    """``table[ids]`` for ``table [V, D]`` and in-range ``ids [B, ...]`` (batch-sharded), as an
    activation ``[B, ..., D]`` in the batch layout. Plain indexing when there is no mesh, or when the
    layouts do not allow the exchange (the table's ``D`` axes must be batch axes that the ids' other
    dimensions and the table's vocabulary do not use)."""
    if mesh is None or mesh.size == 1:
        return table[ids]
    tspec = rules.spec(table_axes, table.shape, mesh)
    ispec = rules.spec(("batch",) + (None,) * (ids.ndim - 1), ids.shape, mesh)
    v_axes, d_axes, b_axes = _names(tspec[0]), _names(tspec[1]), _names(ispec[0])
    if not d_axes or not set(d_axes) <= set(b_axes) or set(v_axes) & set(b_axes):
        return table[ids]

    def local(tab, idx):
        g = jax.lax.all_gather(idx, d_axes, axis=0, tiled=True)          # ids of my data group's rows
        if v_axes:                                                        # my vocabulary rows only
            rows = tab.shape[0]
            lo = jax.lax.axis_index(v_axes) * rows
            mine = (g >= lo) & (g < lo + rows)
            out = jnp.where(mine[..., None], tab[jnp.clip(g - lo, 0, rows - 1)], 0)
            out = jax.lax.psum(out, v_axes)
        else:
            out = tab[g]                                                  # [rows of group, ..., D/n]
        # row block j (device j's rows) goes to device j; received column blocks concatenate along D
        return jax.lax.all_to_all(out, d_axes, 0, out.ndim - 1, tiled=True)

    out_spec = P(*ispec, None)
    return jax.shard_map(local, mesh=context_mesh(mesh), in_specs=(tspec, ispec), out_specs=out_spec)(table, ids)


__all__ = ["lookup"]
