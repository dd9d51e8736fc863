"""Checkpoints: one on-disk layout and one Orbax API for the converter, the trainer and ``load_checkpoint``.

A checkpoint directory (``dsv3 convert hf-to-orbax DST`` or a training run's ``checkpoints/<step>/``)::

    dsv3_checkpoint.json   format marker + the ModelConfig (+ where it came from); written last
    params/                Orbax checkpoint of every model variable (Params and the router bias), one
                           key per layer of a stacked collection: ``moe_layers/<i>/attn/...``,
                           ``dense_layers/<i>/...``, ``mtp/<k>/block/<0>/...``; the rest (``embed``,
                           ``mtp/<k>/eh_proj``, ...) under their paths in the model's NNX state
    tokenizer.json ...     the tokenizer files (the source's, or the run's)
    hf_config.json         the source's Hugging Face config (converted checkpoints)
    opt_state/             training only: Orbax checkpoint of the optax state, leaves in tree order
    ema/                   training with an EMA only: the parameters' EMA (and the router bias), laid out
                           as params/ (``load_checkpoint(..., ema=True)``, ``--ema``)
    train_state.json       training only: step, applied updates, skipped steps, seed, data-iterator
                           state, run config

Why per layer: the converter streams a group of layers at a time with Orbax's partial save, which adds
whole arrays and cannot write a slice of one, so a stacked ``[L, ...]`` array would have to be held
whole (435 GB for the 671B experts of one projection). The trainer writes the same keys (its stacked
arrays are sliced as host views, no copy), so a training checkpoint and a converted one are the same
thing to every reader. ``load_checkpoint`` restores each layer straight into its shards and stacks
on device, a bounded group at a time. The optimizer state is private to the trainer and is kept as
the optimizer holds it (stacked): slicing it would cost a copy of twice the parameters per save and a
re-stack per resume for no reader.

One Orbax API: v1 (``orbax.checkpoint.v1``; ``orbax.checkpoint.experimental.v1`` in releases where it
is still experimental): ``save_async`` (trainer), ``partial.save_async`` + ``partial.finalize``
(converter), ``load`` / ``metadata`` (every reader), one write ``Context`` (no compression, 64 MB
chunks so a sharded restore reads only its chunks).

One commit protocol: a writer fills a hidden temporary directory next to the destination
(``.<name>.tmp-<hex>``), writes ``dsv3_checkpoint.json`` last and renames the directory into place.
An interrupted write (exception, Ctrl-C, ``kill -9``) never leaves a directory that looks like a
checkpoint; its temporary directory is removed by the writer or, after a kill, by the next
``Checkpointer`` on the same directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from pallas_kernels.fp8 import QuantArray
from sharding.rules import DEFAULT_RULES, Rules

from .. import distributed
from ..config import ModelConfig, RuntimeConfig, load_runtime, model_config_from_stored, to_dict
from ..errors import CheckpointError
from ..model import DeepSeekV3

MARKER = "dsv3_checkpoint.json"
PARAMS_DIR = "params"
OPT_DIR = "opt_state"
EMA_DIR = "ema"      # training with train.ema_every: the host EMA of the parameters (+ the router bias), as params/
TRAIN_STATE = "train_state.json"
FORMAT = "dsv3-jax-checkpoint"
VERSION = 2          # 1: trainer "stacked" layout under model/params (no longer read)
LAYOUT = "per_layer"
CHUNK_BYTES = 64 << 20
STACK_GROUP_BYTES = 1 << 30  # load: per-layer arrays stacked on device this many bytes at a time
_TMP = ".tmp-"


def ocp():
    """Orbax's v1 API (the only Orbax API this project uses)."""
    try:
        import orbax.checkpoint.v1 as v1
    except ImportError:
        import orbax.checkpoint.experimental.v1 as v1
    return v1


def write_context():
    """The one Orbax write configuration: weights barely compress (zstd would cost more than the I/O);
    64 MB chunks, so a restore onto a mesh reads only the chunks of its shards."""
    ctx = ocp().Context()
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    return ctx


# ---- layout ------------------------------------------------------------------------------------
def stack_len(path: tuple) -> int:
    """Length of the path prefix naming a stacked collection (0: not stacked): ``moe_layers``,
    ``dense_layers`` and an MTP depth's ``block`` (``mtp/<k>/block``)."""
    if path and path[0] in DeepSeekV3.STACKS:
        return 1
    if len(path) > 2 and path[0] == DeepSeekV3.MTP and path[2] == "block":
        return 3
    return 0


def disk_path(path: tuple, index: tuple = ()) -> tuple[tuple[str, ...], tuple]:
    """Our parameter ``path`` (+ leading ``index`` of a piece) → (on-disk key path, rest of index)."""
    n = stack_len(path)
    if n and index:
        return tuple(map(str, path[:n])) + (str(index[0]),) + tuple(map(str, path[n:])), tuple(index[1:])
    return tuple(map(str, path)), tuple(index)


def disk_keys(path: tuple, shape: tuple) -> list[tuple[str, ...]]:
    """Every on-disk key of parameter ``path`` (one per layer when stacked)."""
    if stack_len(path):
        return [disk_path(path, (i,))[0] for i in range(shape[0])]
    return [disk_path(path)[0]]


def fp8_scale_path(path: tuple) -> tuple:
    """Where the block scales of an FP8-stored weight (a ``QuantArray``) are stored: ``.../kernel_scale``
    beside a Linear's ``kernel``, ``experts/<proj>_scale`` beside a routed expert weight (the e4m3
    values are stored under the weight's own path; the release's layout, bit for bit)."""
    return path[:-1] + ((f"{path[-1]}_scale",) if len(path) > 1 and path[-2] == "experts" else ("kernel_scale",))


def stored_arrays(path: tuple, value) -> dict[tuple, Any]:
    """One variable's value as stored: ``{path: value}``, or for a ``QuantArray`` its values at ``path``
    and its block scales at ``fp8_scale_path(path)`` (also for a QuantArray of shapes or specs)."""
    if isinstance(value, QuantArray):
        return {path: value.values, fp8_scale_path(path): value.scale}
    return {path: value}


def flat_arrays(state: nnx.State) -> dict[tuple, Any]:
    """A model state as stored: ``{path: array}`` (``stored_arrays`` of every variable). Works on
    abstract states too."""
    out: dict[tuple, Any] = {}
    for k, v in nnx.to_flat_state(state):
        out.update(stored_arrays(tuple(k), v.get_value() if isinstance(v, nnx.Variable) else v))
    return out


def assign_flat(state: nnx.State, values: Mapping[tuple, Any]) -> None:
    """Set every variable of ``state`` in place from stored arrays (the inverse of ``flat_arrays``)."""
    for k, v in nnx.to_flat_state(state):
        k, val = tuple(k), v.get_value()
        if isinstance(val, QuantArray):
            v.set_value(dataclasses.replace(val, values=values[k], scale=values[fp8_scale_path(k)]))
        else:
            v.set_value(values[k])


def abstract_state(cfg: ModelConfig, runtime: Optional[RuntimeConfig] = None, mesh=None,
                   rules: Optional[Rules] = None):
    """``(graphdef, abstract state, [(path, Variable)])`` of the model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime, mesh=mesh,
                                                 rules=rules or DEFAULT_RULES))
    graphdef, state = nnx.split(abstract)
    flat = [(tuple(k), v) for k, v in nnx.to_flat_state(state)]
    return graphdef, state, flat


def var_dtype(var) -> np.dtype:
    return np.dtype(var.get_value().dtype)


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


def per_layer_tree(flat: Mapping[tuple, Any]) -> dict:
    """The ``params/`` tree of ``{our path: array}``: stacked arrays split into one entry per layer.
    Arrays whose data is all on this process are read to the host once and split as numpy views (no
    copy on the device); arrays spread over processes are sliced on device."""
    out = {}
    for p, x in flat.items():
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x = np.asarray(x)
        if stack_len(p):
            for i in range(x.shape[0]):
                out[disk_path(p, (i,))[0]] = x[i] if isinstance(x, np.ndarray) else _layer(x, i)
        else:
            out[disk_path(p)[0]] = x
    return nest(out)


def _layer(x: jax.Array, i: int) -> jax.Array:
    """Layer ``i`` of a stacked array spread over processes: cut from each device's own shard when the
    layer axis is not sharded (no communication, no program compiled for the whole mesh per slice)."""
    s = x.sharding
    if isinstance(s, NamedSharding) and (not s.spec or s.spec[0] is None):
        pieces = [jax.lax.dynamic_index_in_dim(d.data, i, keepdims=False) for d in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape[1:], _layer_sharding(s), pieces)
    return x[i]


# ---- marker ------------------------------------------------------------------------------------
def write_marker(directory: Path, cfg: ModelConfig, **extra) -> None:
    """Write ``dsv3_checkpoint.json`` (the last file of a checkpoint)."""
    meta = {"format": FORMAT, "version": VERSION, "layout": LAYOUT, "params": PARAMS_DIR,
            "config": to_dict(cfg), **extra}
    tmp = Path(directory) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, Path(directory) / MARKER)


def read_marker(path: str | os.PathLike) -> dict:
    """The marker of checkpoint ``path``; ``CheckpointError`` naming the problem and the fix."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        why = "does not exist" if not path.exists() else f"has no {MARKER}"
        raise CheckpointError(f"{path}: {why}, so it is not a dsv3 checkpoint (fix: create one with "
                              "`dsv3 convert hf-to-orbax SRC DST` or `dsv3 train`, or point at its directory).")
    try:
        meta = json.loads(marker.read_text())
    except ValueError as e:
        raise CheckpointError(f"{marker}: not valid JSON ({e}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{marker}: expected a JSON object with a 'config' object; the checkpoint is damaged "
                              "(fix: convert or train it again).")
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{marker}: format {meta.get('format')!r} v{meta.get('version')} is not one this "
                              f"version reads ({FORMAT} v{VERSION}) (fix: upgrade dsv3-jax).")
    if meta.get("layout", LAYOUT) != LAYOUT:
        raise CheckpointError(f"{marker}: layout {meta.get('layout')!r} (written by an earlier dsv3 train) is no "
                              "longer read (fix: train into a fresh train.output_dir, or load it with the version "
                              "that wrote it and export it with `dsv3 convert orbax-to-hf`).")
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: {PARAMS_DIR}/ is missing; the checkpoint is incomplete.")
    return meta


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    return model_config_from_stored(read_marker(path)["config"])


# ---- the commit protocol -----------------------------------------------------------------------
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")
#: errno values that mean "this destination cannot be written" (a user's problem, reported in one line)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def staging_dir(dst: Path) -> Path:
    """A fresh hidden temporary directory next to ``dst``: ``.<name>.tmp-<pid>-<hex>`` (the writer's
    process id, so a later run can tell a killed write's leftovers from a running one's)."""
    tmp = dst.parent / f".{dst.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    return tmp


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def commit_dir(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` (marker written) to ``dst``, replacing an existing ``dst`` (moved
    aside to ``.<name>.old-<pid>-<hex>`` first, removed last)."""
    if dst.exists() or dst.is_symlink():
        trash = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(dst, trash)
        os.rename(tmp, dst)
        _remove(trash)
    else:
        os.rename(tmp, dst)


def _alive(pid: Optional[int]) -> bool:
    if pid is None:  # written before writers recorded their pid
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_leftovers(directory: Path, name: Optional[str] = None, note=_note) -> list[Path]:
    """Clean up after interrupted writes in ``directory`` (of destination ``name`` only, or all):
    ``.<name>.tmp-<pid>-<hex>`` (an unfinished write) is removed; ``.<name>.old-<pid>-<hex>`` (the
    previous version, moved aside during a replace) is removed, or put back when the writer was killed
    between the two renames and ``<name>`` is missing. Leftovers of a process that is still running
    are reported and left alone. Each action is reported through ``note``. Returns what was removed."""
    gone: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return gone
    for p in sorted(directory.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if _alive(pid):
            note(f"{p} belongs to a running process (pid {pid}); left alone")
            continue
        target = directory / m["name"]
        if m["kind"] == "old" and not (target.exists() or target.is_symlink()):
            os.rename(p, target)
            note(f"restored {target} from {p.name} (a replace was interrupted)")
            continue
        _remove(p)
        gone.append(p)
        note(f"removed {p}, left by an interrupted write")
    return gone


def _errno_of(e: BaseException) -> Optional[int]:
    """The errno behind ``e`` (an ``OSError``, or a tensorstore error naming ``os_error_code``), also
    through its cause/context chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _free_mib(path: Path) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def write_error(e: BaseException, dst: Path, what: str = "DST") -> Optional["CheckpointDirError"]:
    """``e`` as a one-line ``CheckpointDirError`` when it means ``dst`` cannot be written (full disk,
    quota, permissions, read-only filesystem); None for anything else."""
    if isinstance(e, CheckpointError):
        return None
    code = _errno_of(e)
    if code not in _WRITE_ERRNOS:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free disk space ({_free_mib(dst.parent)} on its filesystem) or choose a {what} on a larger disk"
    else:
        fix = f"choose a {what} in a directory you can write, or fix its permissions"
    return CheckpointDirError(f"cannot write {dst}: {os.strerror(code)} [errno {code}] (fix: {fix}).")


def check_free_space(dst: Path, need_bytes: int, what: str = "DST") -> None:
    """Refuse before any work when the filesystem of ``dst`` has less than ``need_bytes`` free."""
    p = Path(dst).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return
    if free < need_bytes:
        raise CheckpointDirError(f"cannot write {dst}: its filesystem has {free / 2**20:.1f} MiB free, but the output "
                                 f"needs about {need_bytes / 2**20:.1f} MiB (fix: free disk space or choose a {what} "
                                 "on a larger disk).")


class _DropThreadErrors(logging.Filter):
    """Orbax logs a failed background write with its traceback before the caller's ``result()`` raises
    it again; the caller reports it (one line for a full disk), so the log record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "raised an exception" not in str(record.msg)


_THREAD_FILTER = _DropThreadErrors()


_previous_unraisablehook = None


def _drop_closed_loop(unraisable) -> None:
    """After a failed write Orbax closes its event loop while tensorstore still completes the other
    writes; each completion's callback then fails with "Event loop is closed" (dozens of tracebacks
    after the one-line error). Those are dropped; anything else goes to the previous hook."""
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def quiet_write_errors() -> None:
    """Install (once) the filters that drop the noise of a failed background write, which the caller
    reports itself: Orbax's log of the exception and tensorstore's closed-loop callbacks."""
    global _previous_unraisablehook
    log = logging.getLogger("absl")
    if _THREAD_FILTER not in log.filters:
        log.addFilter(_THREAD_FILTER)
    if sys.unraisablehook is not _drop_closed_loop:
        _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _drop_closed_loop


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False, note=_note) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``dst`` (absolute); on success it replaces ``dst``,
    on any failure (exceptions, Ctrl-C) it is removed and ``dst`` is untouched. Leftovers of an
    earlier interrupted write to ``dst`` are cleaned up first (``remove_leftovers``); a destination
    that cannot be written (full disk, permissions) is a one-line ``CheckpointDirError``."""
    dst = Path(os.path.abspath(os.path.expanduser(os.fspath(dst))))
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(dst.parent, dst.name, note)
    except OSError as e:
        raise (write_error(e, dst) or e) from None
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists (fix: choose another DST or pass --overwrite).")
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory (fix: choose another DST, or remove it).")
    quiet_write_errors()
    try:
        tmp = staging_dir(dst)
    except OSError as e:
        raise (write_error(e, dst) or e) from None
    try:
        yield tmp
        commit_dir(tmp, dst)
    except BaseException as e:
        _remove(tmp)
        err = write_error(e, dst)
        if err is not None:
            raise err from None
        raise


# ---- reading -----------------------------------------------------------------------------------
def _tree_metadata(params: Path) -> dict:
    md = ocp().metadata(params).metadata
    return md if isinstance(md, Mapping) else dict(md)


def _load(directory: Path, abstract: dict) -> dict:
    ctx = ocp().Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        return ocp().load(directory, abstract)


def read_params(path: str | os.PathLike, keys: Optional[Iterable[tuple]] = None) -> dict[tuple, np.ndarray]:
    """Read on-disk leaves (``{disk key path: numpy array}``) on the host; ``keys`` selects a subset."""
    params = Path(path).resolve() / PARAMS_DIR
    read_marker(path)
    meta = flatten(_tree_metadata(params))
    want = list(meta) if keys is None else [tuple(k) for k in keys]
    abstract = {}
    for k in want:
        if k not in meta:
            raise CheckpointError(f"{params}: has no array {'/'.join(k)} (fix: the checkpoint is incomplete "
                                  "or was written for another config).")
        abstract[k] = np.empty(tuple(meta[k].shape), meta[k].dtype)
    return {k: np.asarray(v) for k, v in flatten(_load(params, nest(abstract))).items()}


def _layer_sharding(s):
    """The sharding of one layer of a stacked array with sharding ``s`` (the layer axis dropped)."""
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))
    return s


def restore_params(params_dir: Path, targets: Mapping[tuple, jax.ShapeDtypeStruct]) -> dict[tuple, jax.Array]:
    """Restore model variables ``{our path: ShapeDtypeStruct with sharding}`` from ``params_dir``
    straight into their shardings (Orbax reads only each device's chunks). Stacked collections are
    read a layer per key and stacked on device, ``STACK_GROUP_BYTES`` at a time, so the transient
    memory is one group, not a second copy of the model."""
    on_disk = flatten(_tree_metadata(params_dir))
    abstract: dict[tuple, Any] = {}
    plan: dict[tuple, list] = {}
    for p, t in targets.items():
        keys = disk_keys(p, tuple(t.shape))
        sub = (tuple(t.shape[1:]), _layer_sharding(t.sharding)) if stack_len(p) else (tuple(t.shape), t.sharding)
        for k in keys:
            abstract[k] = jax.ShapeDtypeStruct(sub[0], t.dtype, sharding=sub[1])
        plan[p] = keys
    missing = [k for k in abstract if k not in on_disk]
    if missing:
        raise CheckpointError(f"{params_dir}: {len(missing)} parameter(s) the config needs are not stored, e.g. "
                              f"{['/'.join(k) for k in missing[:3]]} (fix: the checkpoint is incomplete or "
                              "its config was changed).")
    for k, a in abstract.items():
        if tuple(on_disk[k].shape) != tuple(a.shape):
            raise CheckpointError(f"{params_dir}: {'/'.join(k)} is stored with shape {tuple(on_disk[k].shape)}, "
                                  f"but the config implies {tuple(a.shape)} (fix: don't override shape fields).")
    restored = flatten(_load(params_dir, nest(abstract)))
    out: dict[tuple, jax.Array] = {}
    group: list[tuple] = []
    size = 0

    def stack(group):
        inputs = [[restored.pop(k) for k in plan[p]] for p in group]
        outs = jax.jit(lambda xs: [jnp.stack(x) for x in xs],
                       out_shardings=[targets[p].sharding for p in group])(inputs)
        del inputs
        out.update(zip(group, outs))

    for p, keys in plan.items():
        if not stack_len(p):
            out[p] = restored.pop(keys[0])
            continue
        n = int(np.prod(targets[p].shape)) * np.dtype(targets[p].dtype).itemsize
        if group and size + n > STACK_GROUP_BYTES:
            stack(group)
            group, size = [], 0
        group.append(p)
        size += n
    if group:
        stack(group)
    return out


def load_checkpoint(path: str | os.PathLike, mesh=None, rules: Optional[Rules] = None,
                    runtime: Optional[RuntimeConfig | Sequence[str] | Mapping] = None, ema: bool = False):
    """Load a checkpoint written by ``dsv3 convert hf-to-orbax`` or ``dsv3 train``.

    Returns ``(config, model)``. With a ``mesh``, the model is built for it (MoE layers expert-parallel)
    and every parameter is restored straight into the layout of ``rules`` (default
    ``sharding.DEFAULT_RULES``; Orbax reads only each device's shard). ``runtime``: how the model
    runs — a ``RuntimeConfig`` or ``key=value`` overrides (``compute_dtype=bfloat16``); by default
    it computes in the stored parameters' dtype. ``ema``: the parameters' EMA (``ema/``) instead.
    """
    path = Path(path).resolve()  # Orbax needs absolute paths
    meta = read_marker(path)
    item = EMA_DIR if ema else PARAMS_DIR
    if ema and not (path / EMA_DIR).is_dir():
        raise CheckpointError(f"{path} holds no parameter EMA ({EMA_DIR}/) (fix: drop --ema, or train with "
                              "train.ema_every=N so that checkpoints carry one).")
    cfg = model_config_from_stored(meta["config"])
    if not isinstance(runtime, RuntimeConfig):
        runtime = load_runtime(runtime or ())
    rules = rules or DEFAULT_RULES
    graphdef, state, flat = abstract_state(cfg, runtime, mesh, rules)
    one = SingleDeviceSharding(jax.local_devices()[0])  # (each process of a multi-process run: its own)
    targets = {}
    for p, var in flat:
        specs = stored_arrays(p, rules.variable_specs(var, mesh)) if mesh is not None else {}
        for k, a in stored_arrays(p, var.get_value()).items():
            targets[k] = jax.ShapeDtypeStruct(a.shape, a.dtype,
                                              sharding=NamedSharding(mesh, specs[k]) if mesh is not None else one)
    assign_flat(state, restore_params(path / item, targets))
    return cfg, nnx.merge(graphdef, state)


# ---- training checkpoints ----------------------------------------------------------------------
class CheckpointDirError(CheckpointError, OSError):
    """The checkpoint directory cannot be written (permissions, full disk)."""


def check_writable(directory: Path, need_bytes: int) -> None:
    """Fail before training when checkpoints could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe-{os.getpid()}-{secrets.token_hex(4)}"  # processes may share it
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointDirError(f"checkpoint directory {directory} is not writable: {e.strerror or e} "
                                 "(fix: choose another train.output_dir or fix its permissions).") from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise CheckpointDirError(f"checkpoint directory {directory} has {free / 2**20:.1f} MiB free, but one "
                                 f"checkpoint needs about {need_bytes / 2**20:.1f} MiB (fix: free disk space or "
                                 "choose another train.output_dir).")


def state_bytes(*trees) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for t in trees for x in jax.tree.leaves(t)))


def _flat_values(*states: nnx.State) -> dict[tuple, Any]:
    flat = {}
    for st in states:
        for k, v in nnx.to_flat_state(st):
            flat[tuple(k)] = v.get_value() if isinstance(v, nnx.Variable) else v
    return flat


def opt_tree(opt_state) -> dict:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}


def read_train_state(path: str | os.PathLike) -> dict:
    """``train_state.json`` of a training checkpoint (step, applied, skipped, seed, data state, config)."""
    f = Path(path) / TRAIN_STATE
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing; the checkpoint cannot be resumed (fix: train into a new "
                              "train.output_dir, or load its weights with load_checkpoint).") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); the checkpoint is damaged (fix: remove that step "
                              "directory to resume from the one before).") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a JSON object; the checkpoint is damaged (fix: remove that step "
                              "directory to resume from the one before).")
    return state


def _check_opt_state(opt_dir: Path, abstract: Mapping[str, Any]) -> None:
    """Refuse (one line) an optimizer state on disk whose leaves do not match the current optimizer's."""
    if not opt_dir.is_dir():
        raise CheckpointError(f"{opt_dir} is missing; the checkpoint has no optimizer state to resume from (fix: "
                              "train into a new train.output_dir, or load its weights with load_checkpoint).")
    stored = flatten(_tree_metadata(opt_dir))
    stored = {k[0] if len(k) == 1 else "/".join(k): v for k, v in stored.items()}
    if sorted(stored) != sorted(abstract):
        raise CheckpointError(f"{opt_dir}: holds {len(stored)} optimizer arrays, but the current optimizer has "
                              f"{len(abstract)} (fix: resume with the optimizer settings that wrote it, or train into "
                              "a new train.output_dir).")
    for k, a in abstract.items():
        if tuple(stored[k].shape) != tuple(a.shape):
            raise CheckpointError(f"{opt_dir}: optimizer array {k} is stored with shape {tuple(stored[k].shape)}, "
                                  f"the current optimizer needs {tuple(a.shape)} (fix: resume with the settings "
                                  "that wrote it, or train into a new train.output_dir).")


class _Pending:
    def __init__(self, step: int, tmp: Path, responses: list, train_state: dict):
        self.step, self.tmp, self.responses, self.train_state = step, tmp, responses, train_state

    def done(self) -> bool:
        for r in self.responses:
            try:
                r.result(timeout=0)  # a timeout leaves the write running (retried on the next poll)
            except TimeoutError:
                return False
            except BaseException:  # noqa: BLE001 - failed: _finalize raises it again and cleans up
                return True
        return True


def complete_steps(directory: Path) -> list[int]:
    """The complete training checkpoints ``<directory>/<step>/`` (marker written), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / MARKER).is_file())


class Checkpointer:
    """Training checkpoints ``<directory>/<step>/`` in the layout above, written asynchronously (the
    device-to-host copy blocks, the files are written in the background), ``keep`` newest kept.

    A step directory appears only once it is complete (temporary directory → marker → rename), so the
    latest ``<step>/`` is always resumable and loadable; leftovers of a killed write are removed when a
    ``Checkpointer`` opens the directory."""

    def __init__(self, directory: Path, cfg: ModelConfig, keep: int, async_save: bool,
                 tokenizer_file: Optional[Path] = None):
        self.directory, self.cfg, self.keep = Path(directory).resolve(), cfg, keep
        self.async_save, self.tokenizer_file = async_save, tokenizer_file
        self.directory.mkdir(parents=True, exist_ok=True)
        # several processes (a multi-process run) write one checkpoint together: each its shards, through
        # Orbax, into one staging directory; process 0 alone cleans up, commits and prunes
        self.primary = jax.process_index() == 0
        if self.primary:
            remove_leftovers(self.directory)
        quiet_write_errors()
        self._pending: Optional[_Pending] = None

    def steps(self) -> list[int]:
        """Complete steps, ascending."""
        return complete_steps(self.directory)

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, model_states: tuple, opt_state, train_state: dict,
             ema: Optional[Mapping[tuple, Any]] = None) -> None:
        """Start writing ``step`` (waits for the previous save first). ``ema``: ``{path: host array}`` of
        the parameters' EMA, written as ``ema/`` with the other model variables (the router bias) as they are."""
        self.wait()
        if jax.process_count() == 1:
            tmp = staging_dir(self.directory / str(step))
        else:  # process 0 creates the staging directory and tells the others its name
            name = distributed.broadcast(staging_dir(self.directory / str(step)).name if self.primary else None,
                                         f"checkpoint-{step}")
            tmp = self.directory / name
        try:
            with write_context():
                responses = [ocp().save_async(tmp / PARAMS_DIR, per_layer_tree(_flat_values(*model_states)))]
                if ema is not None:
                    responses.append(ocp().save_async(tmp / EMA_DIR, per_layer_tree(
                        {**_flat_values(*model_states[1:]), **ema})))
                if jax.tree.leaves(opt_state):  # (a stateless optimizer has nothing to save)
                    responses.append(ocp().save_async(tmp / OPT_DIR, opt_tree(opt_state)))
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = write_error(e, self.directory / str(step), "train.output_dir")
            if err is not None:
                raise err from None
            raise
        self._pending = _Pending(step, tmp, responses, dict(train_state))
        if not self.async_save:
            self.wait()

    def _finalize(self) -> None:
        pend, self._pending = self._pending, None
        if not self.primary:  # the others only wait for their shards (process 0's commit waits for all)
            for r in pend.responses:
                r.result()
            return
        try:
            for r in pend.responses:
                r.result()
            (pend.tmp / TRAIN_STATE).write_text(json.dumps(pend.train_state, indent=1, default=str))
            tok = self.tokenizer_file
            if tok is not None and Path(tok).is_file():
                shutil.copyfile(tok, pend.tmp / "tokenizer.json")
            write_marker(pend.tmp, self.cfg, step=pend.step, source="dsv3 train")
            commit_dir(pend.tmp, self.directory / str(pend.step))
        except BaseException as e:
            shutil.rmtree(pend.tmp, ignore_errors=True)
            err = write_error(e, self.directory / str(pend.step), "train.output_dir")
            if err is not None:
                raise err from None
            raise
        for old in self.steps()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.directory / str(old), ignore_errors=True)

    def poll(self) -> None:
        """Called every step: commits the pending step once Orbax has written it."""
        if self._pending is not None and self._pending.done():
            self._finalize()

    def wait(self) -> None:
        if self._pending is not None:
            self._finalize()

    def close(self) -> None:
        self.wait()

    def restore(self, step: int, model_states: tuple, opt_state) -> tuple[tuple, Any, dict]:
        """Restore ``step`` into the structure and shardings of ``model_states`` / ``opt_state``
        (concrete or abstract: ``jax.ShapeDtypeStruct`` leaves with shardings)."""
        d = self.directory / str(step)
        read_marker(d)

        def abstract(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        flat = {p: abstract(v) for p, v in _flat_values(*model_states).items()}
        values = restore_params(d / PARAMS_DIR, flat)
        states = []
        for st in model_states:
            states.append(nnx.from_flat_state([(k, v.replace(values[tuple(k)]) if isinstance(v, nnx.Variable)
                                                else values[tuple(k)]) for k, v in nnx.to_flat_state(st)]))
        a_opt = jax.tree.map(abstract, opt_tree(opt_state))
        if a_opt:
            _check_opt_state(d / OPT_DIR, a_opt)
        restored = _load(d / OPT_DIR, a_opt) if a_opt else {}
        opt = jax.tree.unflatten(jax.tree.structure(opt_state), [restored[k] for k in sorted(restored)])
        return tuple(states), opt, read_train_state(d)

    def restore_ema(self, step: int, params) -> Optional[dict[tuple, np.ndarray]]:
        """The EMA stored with ``step`` as ``{path: host array}`` for the paths of ``params`` (None: none stored)."""
        d = self.directory / str(step) / EMA_DIR
        if not d.is_dir():
            return None
        flat = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                for p, v in _flat_values(params).items()}
        return {p: np.asarray(jax.device_get(v)) for p, v in restore_params(d, flat).items()}


__all__ = ["load_checkpoint", "read_params", "read_marker", "write_marker", "checkpoint_config",
           "restore_params", "per_layer_tree", "disk_path", "disk_keys", "stack_len", "abstract_state",
           "atomic_dir", "staging_dir", "commit_dir", "remove_leftovers", "write_context", "ocp",
           "Checkpointer", "CheckpointDirError", "check_writable", "check_free_space", "write_error",
           "quiet_write_errors", "complete_steps", "state_bytes", "read_train_state",
           "MARKER", "PARAMS_DIR", "OPT_DIR", "EMA_DIR", "TRAIN_STATE"]
