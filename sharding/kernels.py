"""Kernels on a mesh: run a per-device op (a Pallas kernel or its jnp reference) inside ``shard_map``.

XLA cannot partition a Mosaic or Triton custom call ("Mosaic kernels cannot be automatically
partitioned"), so on a mesh of more than one device every kernel call runs per shard: the caller
names each array argument's logical axes (``("batch", "seq", "heads", None)``), the rules turn them
into ``PartitionSpec``s for this mesh (an axis that does not divide stays whole), and the kernel sees
one device's block. Arguments given as ``None`` axes are replicated into every shard (e.g. a weight
an FP8 GEMM needs whole: XLA gathers it before the call, as FSDP would). Gradients flow through
``shard_map``'s transpose: a replicated input's cotangent is summed over the mesh.

Kernels whose math mixes positions across a sharded axis must not be sharded on it: attention is
sharded over batch and heads only, never over the sequence.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

from .rules import Rules

Axes = Optional[Sequence[Optional[str]]]


def platform_of(mesh: Optional[Mesh]) -> str:
    """The platform a program for ``mesh`` is compiled for (``tpu``/``gpu``/``cpu``): the mesh's devices,
    not the host's default backend — they differ when compiling ahead of time for a TPU slice."""
    if mesh is None:
        return jax.default_backend()
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def context_mesh(mesh: Mesh):
    """The mesh to give a ``shard_map`` for ``mesh``: ``mesh`` itself, or, inside an enclosing
    ``shard_map`` that is already manual over some of its axes (the pipelined step is manual over
    ``stage``, docs/design.md §Pipeline), the context's abstract mesh, which jax requires there."""
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and ctx.manual_axes and tuple(ctx.axis_names) == tuple(mesh.axis_names):
        return ctx
    return mesh


def free_axes(mesh: Mesh) -> tuple[str, ...]:
    """``mesh``'s axes not already manual in an enclosing ``shard_map``: the axes a reduction over
    "the whole mesh" may span. Inside the pipelined step each ``stage`` group runs its own program,
    so a collective over ``stage`` there would pair devices doing different work."""
    ctx = jax.sharding.get_abstract_mesh()
    manual = set(ctx.manual_axes) if not ctx.empty else set()
    return tuple(a for a in mesh.axis_names if a not in manual)


def per_shard(fn: Callable, mesh: Optional[Mesh], rules: Rules, in_axes: Sequence[Axes],
              out_axes: Axes | Sequence[Axes]) -> Callable:
    """``fn(*arrays)`` run per shard of ``mesh`` (unchanged when there is no mesh or one device).
    ``in_axes``: logical axes of each positional argument (``None``: replicated; an argument passed
    as ``None`` stays ``None``); ``out_axes``: of the output, or a tuple of them for a tuple output."""
    if mesh is None or mesh.size == 1:
        return fn
    multi_out = bool(out_axes) and isinstance(out_axes, (tuple, list)) and out_axes and \
        (out_axes[0] is None or isinstance(out_axes[0], (tuple, list)))

    def spec(axes: Axes, shape) -> P:
        return P() if axes is None else rules.spec(tuple(axes), shape, mesh)

    def wrapped(*args):
        present = [i for i, a in enumerate(args) if a is not None]

        def local(*arrays):
            full = list(args)
            for i, a in zip(present, arrays):
                full[i] = a
            return fn(*full)

        arrays = [args[i] for i in present]
        in_specs = tuple(spec(in_axes[i], args[i].shape) for i in present)
        out_shape = jax.eval_shape(fn, *args)
        if multi_out:
            out_specs = tuple(spec(ax, o.shape) for ax, o in zip(out_axes, out_shape))
        else:
            out_specs = spec(out_axes, out_shape.shape)
        return jax.shard_map(local, mesh=context_mesh(mesh), in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)

    return wrapped


__all__ = ["per_shard", "platform_of", "context_mesh", "free_axes"]
