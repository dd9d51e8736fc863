"""Training checkpoints: Orbax ``CheckpointManager`` (async, keep-N), loadable by ``load_checkpoint``.

Layout of ``<output_dir>/checkpoints/<step>/``::

    params/              every model variable (Params and RouterBias), keys = the model's state paths,
                         stacked layers as the model holds them (layout "stacked")
    opt_state/           the optax state, leaves in tree order
    meta/                JSON: step, applied updates, data-iterator state, seed, skipped steps, run config
    model/params ->../params   (symlink; Orbax's reader refuses a checkpoint item inside a step dir)
    dsv3_checkpoint.json the self-describing marker of M2 (config, layout "stacked",
                         params "model/params"), written after Orbax finalised the step
    tokenizer.json       the run's tokenizer (``dsv3 score --text``)

so ``dsv3 score --checkpoint <output_dir>/checkpoints/<step>`` and ``dsv3.load_checkpoint`` read a
training checkpoint like a converted one. A step without its marker (killed between Orbax's commit and
the marker) is still resumable; the marker is written when it is restored.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from ..checkpoint import orbax_io
from ..config import ModelConfig
from ..errors import CheckpointError


class CheckpointDirError(CheckpointError, OSError):
    """The checkpoint directory cannot be written (permissions, full disk)."""


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def model_tree(*states: nnx.State) -> dict:
    """Nested dict with string keys of the model's variables (the on-disk ``params`` item)."""
    flat = {}
    for st in states:
        for k, v in nnx.to_flat_state(st):
            flat[tuple(map(str, k))] = v.get_value() if isinstance(v, nnx.Variable) else v
    return orbax_io.nest(flat)


def tree_into_state(tree: dict, state: nnx.State) -> nnx.State:
    """Values of ``tree`` (as written by ``model_tree``) into a copy of ``state``'s structure."""
    flat = orbax_io.flatten(tree)
    items = []
    for k, v in nnx.to_flat_state(state):
        items.append((k, v.replace(flat[tuple(map(str, k))])))
    return nnx.from_flat_state(items)


def opt_tree(opt_state) -> dict:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}


def check_writable(directory: Path, need_bytes: int) -> None:
    """Fail before training when checkpoints could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_probe"
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


class Checkpointer:
    def __init__(self, directory: Path, cfg: ModelConfig, keep: int, async_save: bool,
                 tokenizer_file: Optional[Path] = None):
        ocp = _ocp()
        self.directory, self.cfg, self.tokenizer_file = Path(directory).resolve(), cfg, tokenizer_file
        self._pending: Optional[int] = None
        self.async_save = async_save
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalized) if async_save else None)
        # (the callback writes the marker as soon as Orbax commits; wait() covers backends that do not call it)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    # -- marker ---------------------------------------------------------------------------------
    def write_marker(self, step: int) -> bool:
        d = self.directory / str(step)
        if not (d / "params").is_dir() or not (d / "meta").is_dir():  # Orbax has not committed the step yet
            return False
        link = d / "model" / "params"
        if not link.is_symlink():
            link.parent.mkdir(exist_ok=True)
            os.symlink("../params", link)
        if self.tokenizer_file is not None and self.tokenizer_file.is_file() and not (d / "tokenizer.json").exists():
            shutil.copyfile(self.tokenizer_file, d / "tokenizer.json")
        orbax_io.write_marker(d, self.cfg, layout="stacked", params="model/params", step=step, source="dsv3 train")
        return True

    def _finalized(self) -> None:
        """After Orbax committed the pending step (callback, or after waiting for it)."""
        if self._pending is not None and self.write_marker(self._pending):
            self._pending = None

    def poll(self) -> None:
        """Called every step: writes the pending marker once Orbax has committed the step directory."""
        if self._pending is not None and (self.directory / str(self._pending)).is_dir():
            self._finalized()

    # -- save / restore ---------------------------------------------------------------------------
    def save(self, step: int, model_states: tuple, opt_state, meta: dict) -> None:
        ocp = _ocp()
        self.wait()
        self._pending = step
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(model_tree(*model_states)),
            opt_state=ocp.args.StandardSave(opt_tree(opt_state)),
            meta=ocp.args.JsonSave(meta)), force=True)
        if not self.async_save:
            self.wait()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, step: int, model_states: tuple, opt_state) -> tuple[tuple, Any, dict]:
        """Restore ``step`` into the structure (and shardings) of the given live states."""
        ocp = _ocp()

        def abstract(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        a_model = jax.tree.map(abstract, model_tree(*model_states))
        a_opt = jax.tree.map(abstract, opt_tree(opt_state))
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(a_model), opt_state=ocp.args.StandardRestore(a_opt),
            meta=ocp.args.JsonRestore()))
        states = tuple(tree_into_state(out["params"], s) for s in model_states)
        leaves = [out["opt_state"][k] for k in sorted(out["opt_state"])]
        opt = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
        if not (self.directory / str(step) / orbax_io.MARKER).exists():
            self.write_marker(step)
        return states, opt, dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._finalized()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def state_bytes(*trees) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for t in trees for x in jax.tree.leaves(t)))


__all__ = ["Checkpointer", "CheckpointDirError", "check_writable", "model_tree", "tree_into_state", "state_bytes"]
