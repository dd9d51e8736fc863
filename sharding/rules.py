"""Logical axis → mesh axis rules: a parallelism layout is a rules change, not a model change.

Default layout (issue M3): experts over ``expert``; other large weight dims over ``fsdp`` — and, in
weights that have no expert dim, over ``expert`` too: outside the routed experts the expert axis is
data-parallel (the batch is split over it), so sharding attention, dense-FFN, embedding and head
weights across it is ZeRO-3 instead of 64 replicas; heads and FFN widths over ``tensor``; the batch
over (``data``, ``fsdp``, ``expert``). A mesh axis is used at most once per array (in an expert
weight the expert dim takes ``expert`` first), and only where it divides the dimension (otherwise
that dim is replicated).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Mapping[str, Optional[str | tuple]]

DEFAULT_RULES: dict[str, Optional[str | tuple]] = {
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
}


def spec_for(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh | Mapping[str, int],
             rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec of an array with logical ``axes`` and ``shape`` (``mesh`` may be a Mesh or just
    its axis sizes, e.g. for a pod-sized layout computed on a laptop)."""
    sizes = mesh.shape if hasattr(mesh, "shape") else mesh
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        size = 1
        for t in targets:
            n = sizes.get(t, 1)
            if t in used or n == 1 or dim % (size * n):
                continue
            chosen.append(t)
            size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for every variable of a (possibly abstract) state, from its ``out_sharding`` axes."""
    def one(var):
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, spec_for(axes, var.shape, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    target = rules["batch"]
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def check_batch(batch_size: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    spec = batch_sharding(mesh, 1, rules).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the {n} batch shards of mesh axes {axes} "
                         f"(fix: use a batch size that is a multiple of {n}).")


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Place a concrete state on ``mesh`` according to the rules."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(lambda v, s: jax.device_put(v, s), state, shardings)


def rules_fn(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """The rules as a callable ``(path, shape, logical_axes) -> PartitionSpec`` (checkpoint restore)."""
    def fn(path, shape, logical_axes):
        return spec_for(logical_axes or (None,) * len(shape), shape, mesh, rules)
    return fn


def _local_elements(var, sizes: Mapping[str, int], rules: Rules) -> int:
    """Elements of one variable on one device (a dim split ``n`` ways holds ``ceil(dim/n)``)."""
    axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    spec = spec_for(axes, var.shape, sizes, rules)
    n = 1
    for dim, part in zip(var.shape, tuple(spec) + (None,) * (len(var.shape) - len(spec))):
        parts = (part,) if isinstance(part, str) else tuple(part or ())
        n *= -(-dim // int(np.prod([sizes[a] for a in parts]))) if parts else dim
    return n


def _variables(state: nnx.State):
    return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_device_elements(state: nnx.State, mesh: Mesh | Mapping[str, int], rules: Rules = DEFAULT_RULES,
                        kind: type = nnx.Variable) -> int:
    """Elements of the ``kind`` variables of ``state`` on one device under the rules, from abstract
    shapes only (e.g. ``kind=nnx.Param``: what the optimizer keeps moments for)."""
    sizes = mesh.shape if hasattr(mesh, "shape") else mesh
    return sum(_local_elements(v, sizes, rules) for v in _variables(state) if isinstance(v, kind))


def per_device_bytes(state: nnx.State, mesh: Mesh | Mapping[str, int], rules: Rules = DEFAULT_RULES) -> int:
    """Bytes of ``state`` on one device under the rules, each variable at its own dtype (fp32 master
    weights, or e4m3 + fp32 scales with ``fp8_weights``)."""
    sizes = mesh.shape if hasattr(mesh, "shape") else mesh
    return sum(_local_elements(v, sizes, rules) * np.dtype(v.dtype).itemsize for v in _variables(state))
