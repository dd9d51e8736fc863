"""Logical axis → mesh axis rules: a parallelism layout is a rules change, not a model change.

``Rules`` is the one place that maps the logical axis names every parameter carries (``embed``,
``heads``, ``expert``, …) and the activation axes (``batch``) to mesh axes. Trainer, checkpoint
loader, generator and expert parallelism all ask the same object: ``rules.shardings(state, mesh)``,
``rules.batch_sharding(mesh)``, ``rules.batch_axes(mesh)``.

Default layout (issue M3): experts over ``expert``; other large weight dims over ``fsdp`` — and, in
weights that have no expert dim, over ``expert`` too: outside the routed experts the expert axis is
data-parallel (the batch is split over it), so sharding attention, dense-FFN, embedding and head
weights across it is ZeRO-3 instead of 64 replicas; heads and FFN widths over ``tensor``; the batch
over (``data``, ``fsdp``, ``expert``). A mesh axis is used at most once per array (in an expert
weight the expert dim takes ``expert`` first), and only where it divides the dimension (otherwise
that dim is replicated).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.fp8 import QuantArray

from .errors import MeshError

MeshLike = Mesh | Mapping[str, int]


def _sizes(mesh: MeshLike) -> Mapping[str, int]:
    return mesh.shape if hasattr(mesh, "shape") else mesh


def _targets(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class Rules:
    """An immutable, hashable table ``logical axis → mesh axes`` (tried in order; each mesh axis is
    used once per array and only where it divides the dimension). Build with ``Rules.of(mapping)``
    or ``DEFAULT_RULES.with_(embed="fsdp")``."""

    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, Optional[str | Sequence[str]]]) -> "Rules":
        if isinstance(mapping, Rules):
            return mapping
        table = []
        for name, value in mapping.items():
            targets = _targets(value)
            if len(set(targets)) != len(targets):
                raise MeshError(f"sharding rule {name!r} -> {value!r} names a mesh axis twice "
                                "(fix: list each mesh axis once).")
            table.append((str(name), targets))
        return cls(tuple(table))

    def with_(self, **changes: Optional[str | Sequence[str]]) -> "Rules":
        """These rules with some logical axes mapped differently."""
        return Rules.of({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self.as_dict()[name]

    def get(self, name: Optional[str]) -> tuple[str, ...]:
        return self.as_dict().get(name, ()) if name is not None else ()

    # ---- parameters -------------------------------------------------------------------------
    def spec(self, axes: Sequence[Optional[str]], shape: Sequence[int], mesh: MeshLike) -> P:
        """PartitionSpec of an array with logical ``axes`` and ``shape`` (``mesh`` may be a Mesh or just
        its axis sizes, e.g. for a pod-sized layout computed on a laptop)."""
        sizes = _sizes(mesh)
        used: set[str] = set()
        out = []
        for name, dim in zip(axes, shape):
            chosen, size = [], 1
            for t in self.get(name):
                n = sizes.get(t, 1)
                if t in used or n == 1 or dim % (size * n):
                    continue
                chosen.append(t)
                size *= n
            used.update(chosen)
            out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
        return P(*out)

    def variable_specs(self, var: nnx.Variable, mesh: MeshLike):
        """PartitionSpec of a variable's value: one spec, or for FP8 storage a ``QuantArray`` of
        specs (values by their logical axes; block scales along the leading expert axes only)."""
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        value = var.get_value()
        if isinstance(value, QuantArray):
            # the scales' leading axes (stacked layers, experts) shard like the values'; count them
            # from the scale's rank: a stacked (vmapped) QuantArray has one more than its n_lead
            s_axes = QuantArray.scale_axes(axes, value.scale.ndim - 2)
            return dataclasses.replace(value, values=self.spec(axes, value.shape, mesh),
                                       scale=self.spec(s_axes, value.scale.shape, mesh))
        return self.spec(axes, var.shape, mesh)

    def shardings(self, state: nnx.State, mesh: Mesh) -> nnx.State:
        """NamedShardings for every variable of a (possibly abstract) state, from its logical axes.
        Leaves that are not ``nnx.Variable`` (e.g. optimizer step counters) are replicated."""
        def one(x):
            if isinstance(x, nnx.Variable):
                specs = self.variable_specs(x, mesh)
                return x.replace(jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                                              is_leaf=lambda p: isinstance(p, P)))
            return NamedSharding(mesh, P())
        return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def place(self, state: nnx.State, mesh: Mesh) -> nnx.State:
        """Put a concrete state on ``mesh`` in this layout."""
        return jax.device_put(state, self.shardings(state, mesh))

    def restore_fn(self, mesh: Mesh):
        """``(path, shape, logical_axes) -> PartitionSpec`` for restoring arrays that are not Variables."""
        def fn(path, shape, logical_axes):
            return self.spec(logical_axes or (None,) * len(shape), shape, mesh)
        return fn

    # ---- activations ------------------------------------------------------------------------
    def batch_axes(self, mesh: MeshLike) -> tuple[str, ...]:
        """Mesh axes (of size > 1) the batch dimension is split over."""
        sizes = _sizes(mesh)
        return tuple(a for a in self.get("batch") if sizes.get(a, 1) > 1)

    def batch_shards(self, mesh: MeshLike) -> int:
        sizes = _sizes(mesh)
        return math.prod(sizes[a] for a in self.batch_axes(mesh))

    def batch_sharding(self, mesh: Mesh, ndim: int = 2) -> NamedSharding:
        axes = self.batch_axes(mesh)
        return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))

    def check_batch(self, batch_size: int, mesh: MeshLike, what: str = "batch size") -> None:
        n = self.batch_shards(mesh)
        if batch_size % n:
            raise MeshError(f"{what} {batch_size} is not divisible by the {n} batch shards of mesh axes "
                            f"{self.batch_axes(mesh)} (fix: use a multiple of {n}, or a mesh with fewer "
                            "data/fsdp/expert shards).")

    # ---- memory from shapes alone (dsv3 info --mesh) ------------------------------------------
    def _local_arrays(self, var, sizes: Mapping[str, int]) -> list[tuple[int, int]]:
        """``(elements on one device, itemsize)`` of each array a variable holds."""
        specs = jax.tree.leaves(self.variable_specs(var, sizes), is_leaf=lambda p: isinstance(p, P))
        out = []
        for arr, spec in zip(jax.tree.leaves(var.get_value()), specs):
            n = 1
            for dim, part in zip(arr.shape, tuple(spec) + (None,) * (len(arr.shape) - len(spec))):
                parts = _targets(part)
                n *= -(-dim // int(np.prod([sizes[a] for a in parts]))) if parts else dim
            out.append((n, np.dtype(arr.dtype).itemsize))
        return out

    def per_device_elements(self, state: nnx.State, mesh: MeshLike, kind: type = nnx.Variable) -> int:
        """Parameter elements of the ``kind`` variables of ``state`` on one device, from abstract shapes
        only (e.g. ``kind=nnx.Param``: what the optimizer keeps moments for; FP8 block scales are
        storage and not counted)."""
        sizes = _sizes(mesh)
        return sum(self._local_arrays(v, sizes)[0][0] for v in _variables(state) if isinstance(v, kind))

    def per_device_bytes(self, state: nnx.State, mesh: MeshLike) -> int:
        """Bytes of ``state`` on one device, each array at its own dtype (fp32 master weights, or
        e4m3 values + fp32 block scales with ``fp8_weights``)."""
        sizes = _sizes(mesh)
        return sum(n * b for v in _variables(state) for n, b in self._local_arrays(v, sizes))


def _variables(state: nnx.State) -> Iterable[nnx.Variable]:
    return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


DEFAULT_RULES = Rules.of({
    "layers": None,
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "heads": "tensor",
    "qk_dim": None, "v_dim": None, "qkv_dim": None,
    "q_lora": ("fsdp", "expert"), "kv_lora": ("fsdp", "expert"),
    "mlp": "tensor",
    "expert": "expert",
    "moe_mlp": "tensor",
    "expert_gate": None,
    "mtp_concat": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
})
