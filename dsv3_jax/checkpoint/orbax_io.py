"""Self-describing Orbax checkpoints of a DeepSeek-V3 model, and ``load_checkpoint``.

A checkpoint directory holds::

    dsv3_checkpoint.json   format marker + the ModelConfig (written last: no marker, no checkpoint)
    params/                Orbax PyTree checkpoint of the model's variables
    tokenizer.json ...     the source's tokenizer files, when it had them

The Orbax tree mirrors the model's NNX state (string keys). In the ``per_layer`` layout the
stacked collections (``dense_layers``, ``moe_layers``, ``mtp/<k>/block``) are stored one layer per
key (``moe_layers/<i>/attn/...``): the streaming converter writes a layer at a time with
``orbax ... partial.save`` and never holds more than one layer. ``stacked`` stores them as the
model does. ``load_checkpoint`` restores either straight onto a mesh (each array read only as its
shards) and stacks layers on device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from sharding.rules import DEFAULT_RULES, Rules

from ..config import ModelConfig, RuntimeConfig, load_runtime, model_config_from_stored, to_dict
from .hf_source import CheckpointError

MARKER = "dsv3_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "dsv3-jax-checkpoint"
VERSION = 1

# rules(path, shape, logical_axes) -> PartitionSpec; sharding/rules.py will provide the real one.


# ---- layout ------------------------------------------------------------------------------------
def stack_len(path: tuple) -> int:
    """Length of the path prefix naming a stacked collection (0: not stacked)."""
    if path and path[0] in ("dense_layers", "moe_layers"):
        return 1
    if len(path) > 2 and path[0] == "mtp" and path[2] == "block":
        return 3
    return 0


def disk_path(path: tuple, index: tuple = ()) -> tuple[tuple[str, ...], tuple]:
    """Our parameter ``path`` (+ leading ``index`` of a piece) → (on-disk key path, rest of index)."""
    n = stack_len(path)
    if n and index:
        return tuple(map(str, path[:n])) + (str(index[0]),) + tuple(map(str, path[n:])), tuple(index[1:])
    return tuple(map(str, path)), tuple(index)


def abstract_state(cfg: ModelConfig, runtime: Optional[RuntimeConfig] = None, mesh=None,
                   rules: Optional[Rules] = None):
    """``(graphdef, abstract state, [(path, Variable)])`` of the model (nothing allocated)."""
    from flax import nnx
    from ..model import DeepSeekV3
    abstract = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime, mesh=mesh,
                                                 rules=rules or DEFAULT_RULES))
    graphdef, state = nnx.split(abstract)
    flat = [(tuple(k), v) for k, v in nnx.to_flat_state(state)]
    return graphdef, state, flat


def var_dtype(var) -> np.dtype:
    return np.dtype(var.get_value().dtype)


def logical_axes(var) -> tuple:
    axes = getattr(var, "out_sharding", None)
    if axes is None:
        axes = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return tuple(axes) if axes is not None else (None,) * len(var.get_value().shape)


def nest(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for keys, v in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# ---- metadata ----------------------------------------------------------------------------------
def write_marker(directory: Path, cfg: ModelConfig, **extra) -> None:
    meta = {"format": FORMAT, "version": VERSION, "layout": "per_layer", "params": PARAMS_DIR,
            "config": to_dict(cfg), **extra}
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, directory / MARKER)


def read_marker(path: str | os.PathLike) -> dict:
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        why = "does not exist" if not path.exists() else f"has no {MARKER}"
        raise CheckpointError(f"{path}: {why}, so it is not a dsv3 checkpoint (fix: create one with "
                              "`dsv3 convert hf-to-orbax SRC DST`, or point at its directory).")
    try:
        meta = json.loads(marker.read_text())
    except ValueError as e:
        raise CheckpointError(f"{marker}: not valid JSON ({e}); the checkpoint is damaged.") from None
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{marker}: format {meta.get('format')!r} v{meta.get('version')} is not one this "
                              f"version reads ({FORMAT} v{VERSION}).")
    if not (path / meta.get("params", PARAMS_DIR)).is_dir():
        raise CheckpointError(f"{path}: {meta.get('params', PARAMS_DIR)}/ is missing; the checkpoint is incomplete.")
    return meta


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    return model_config_from_stored(read_marker(path)["config"])


# ---- loading -----------------------------------------------------------------------------------
def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp
    return ocp


def read_params(path: str | os.PathLike, keys: Optional[Iterable[tuple]] = None,
                shapes: Optional[Mapping[tuple, tuple]] = None) -> dict[tuple, np.ndarray]:
    """Read on-disk leaves (``{disk key path: numpy array}``) on the host; ``keys`` selects a subset."""
    ocp = _ocp()
    params = Path(path) / read_marker(path).get("params", PARAMS_DIR)
    meta = flatten(_tree_metadata(params))
    want = list(meta) if keys is None else [tuple(k) for k in keys]
    abstract = {}
    for k in want:
        if k not in meta:
            raise CheckpointError(f"{params}: has no array {'/'.join(k)} (fix: the checkpoint is incomplete "
                                  "or was written for another config).")
        m = meta[k]
        abstract[k] = np.empty(tuple(m.shape), m.dtype) if not shapes else np.empty(shapes[k], m.dtype)
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        out = ocp.load(params, nest(abstract))
    return {k: np.asarray(v) for k, v in flatten(out).items()}


def _tree_metadata(params: Path) -> dict:
    md = _ocp().metadata(params).metadata
    return md if isinstance(md, Mapping) else dict(md)


def load_checkpoint(path: str | os.PathLike, mesh=None, rules: Optional[Rules] = None,
                    runtime: Optional[RuntimeConfig | Sequence[str] | Mapping] = None):
    """Load a checkpoint written by ``dsv3 convert hf-to-orbax`` (or ``save_checkpoint``).

    Returns ``(config, model)``. With a ``mesh``, the model is built for it (MoE layers expert-parallel)
    and every parameter is restored straight into the layout of ``rules`` (default
    ``sharding.DEFAULT_RULES``; Orbax reads only each device's shard). ``runtime``: how the model
    runs — a ``RuntimeConfig`` or ``key=value`` overrides (``compute_dtype=bfloat16``); by default
    it computes in the stored parameters' dtype.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

    path = Path(path).resolve()  # Orbax needs absolute paths
    meta = read_marker(path)
    cfg = model_config_from_stored(meta["config"])
    if not isinstance(runtime, RuntimeConfig):
        runtime = load_runtime(runtime or ())
    rules = rules or DEFAULT_RULES
    params_dir = path / meta.get("params", PARAMS_DIR)
    graphdef, state, flat = abstract_state(cfg, runtime, mesh, rules)
    stacked_layout = meta.get("layout", "per_layer") == "stacked"
    if mesh is not None:
        shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    else:
        dev = SingleDeviceSharding(jax.devices()[0])
        shard = lambda spec: dev  # noqa: E731

    on_disk = flatten(_tree_metadata(params_dir))
    abstract: dict[tuple, Any] = {}
    plan = []  # (path, var, target sharding, [disk keys] or disk key)
    for p, var in flat:
        shape, dtype = tuple(var.get_value().shape), var_dtype(var)
        spec = rules.spec(logical_axes(var), shape, mesh) if mesh is not None else P()
        target = shard(spec)
        if stack_len(p) and not stacked_layout:
            sub_spec = P(*tuple(spec)[1:]) if len(tuple(spec)) and tuple(spec)[0] is None else P()
            keys = [disk_path(p, (i,))[0] for i in range(shape[0])]
            for k in keys:
                abstract[k] = jax.ShapeDtypeStruct(shape[1:], dtype, sharding=shard(sub_spec))
            plan.append((p, var, target, keys))
        else:
            k = disk_path(p)[0]
            abstract[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=target)
            plan.append((p, var, target, k))
    missing = [k for k in abstract if k not in on_disk]
    if missing:
        raise CheckpointError(f"{params_dir}: {len(missing)} parameter(s) the config needs are not stored, e.g. "
                              f"{['/'.join(k) for k in missing[:3]]} (fix: the checkpoint is incomplete or "
                              "its config was changed).")
    for k, a in abstract.items():
        if tuple(on_disk[k].shape) != tuple(a.shape):
            raise CheckpointError(f"{params_dir}: {'/'.join(k)} is stored with shape {tuple(on_disk[k].shape)}, "
                                  f"but the config implies {tuple(a.shape)} (fix: don't override shape fields).")
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        restored = flatten(ocp.load(params_dir, nest(abstract)))
    # Stack the per-layer arrays on device, all in one jit (one compile), straight into the targets.
    stacked_in = {i: [restored.pop(k) for k in keys] for i, (_, _, _, keys) in enumerate(plan)
                  if isinstance(keys, list)}
    stacked_out = jax.jit(lambda d: {i: jnp.stack(xs) for i, xs in d.items()},
                          out_shardings={i: plan[i][2] for i in stacked_in})(stacked_in) if stacked_in else {}
    del stacked_in
    for i, (p, var, target, keys) in enumerate(plan):
        var.set_value(stacked_out.pop(i) if isinstance(keys, list) else restored.pop(keys))
    model = nnx.merge(graphdef, state)
    return cfg, model


__all__ = ["load_checkpoint", "read_params", "read_marker", "write_marker",
           "disk_path", "stack_len", "checkpoint_config", "MARKER", "PARAMS_DIR"]
