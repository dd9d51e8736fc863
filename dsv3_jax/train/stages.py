"""Runs that continue another run's weights, and run configs made of several stages
(docs/design.md §Long-context stages; the report's extension: docs/architecture.md §3).

``train.init_from: CKPT`` starts a fresh run (new optimizer, step 0, this config's schedules) from the
model variables of ``CKPT`` (parameters and router bias). Its model config must equal the stored one;
with ``train.init_rope: true`` it may differ in the RoPE fields alone (``rope_scaling``,
``max_position_embeddings``): the extension stage's YaRN config, the only change that keeps every
stored array's shape and meaning. A resumed run (its ``output_dir`` holds checkpoints) resumes from
its own checkpoint and ignores ``init_from``.

A run config may carry ``stages:``, a list of section mappings deep-merged in turn into its
sections; ``dsv3 train`` runs them in order, each stage's ``init_from`` defaulting to the final
checkpoint of the stage before (``configs/demo_long.yaml``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import yaml
from flax import nnx

from ..checkpoint.orbax_io import PARAMS_DIR, checkpoint_config, complete_steps, restore_params
from ..config import ConfigError, ModelConfig, _resolve_path, read_config_text
from .config import RunConfig, load_run_config

ROPE_FIELDS = ("rope_scaling", "max_position_embeddings")
IGNORED = ("name",)


def init_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else the latest ``<path>/<step>/`` or
    ``<path>/checkpoints/<step>/`` (a run's output directory)."""
    p = Path(path).expanduser()
    for d in (p / "checkpoints", p):
        steps = complete_steps(d)
        if steps and not (p / "dsv3_checkpoint.json").is_file():
            return (d / str(steps[-1])).resolve()
    return p.resolve()


def check_init_from(run: RunConfig) -> Optional[Path]:
    """The checkpoint ``train.init_from`` names, after checking its model against this run's (see module
    doc); ``ConfigError`` naming the differing fields and the fix. None without ``init_from``."""
    t = run.train
    if not t.init_from:
        return None
    ckpt = init_checkpoint(t.init_from)
    stored = checkpoint_config(ckpt)
    diff = {f.name: (getattr(stored, f.name), getattr(run.model, f.name)) for f in dataclasses.fields(ModelConfig)
            if f.name not in IGNORED and getattr(stored, f.name) != getattr(run.model, f.name)}
    other = {k: v for k, v in diff.items() if k not in ROPE_FIELDS}
    if other:
        listed = ", ".join(f"model.{k} {a!r} → {b!r}" for k, (a, b) in other.items())
        raise ConfigError(f"train.init_from={t.init_from}: its model differs from this run's in {listed} (fix: "
                          "only the RoPE fields (rope_scaling, max_position_embeddings) may change when "
                          "continuing a checkpoint; use its model settings).")
    if diff and not t.init_rope:
        listed = ", ".join(f"model.{k} {a!r} → {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"train.init_from={t.init_from}: this run changes its RoPE config ({listed}) (fix: set "
                          "train.init_rope=true to extend the context with the new config, or use the stored one).")
    return ckpt


def restore_model_states(ckpt: Path, model_states: tuple) -> tuple:
    """``(params, bias, rest)`` of ``ckpt`` in the structure, dtypes and shardings of ``model_states``."""
    flat = {}
    for st in model_states:
        for k, v in nnx.to_flat_state(st):
            x = v.get_value() if isinstance(v, nnx.Variable) else v
            flat[tuple(k)] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    values = restore_params(Path(ckpt) / PARAMS_DIR, flat)
    return tuple(nnx.from_flat_state([(k, v.replace(values[tuple(k)]) if isinstance(v, nnx.Variable)
                                       else values[tuple(k)]) for k, v in nnx.to_flat_state(st)])
                 for st in model_states)


# ---- staged run configs ------------------------------------------------------------------------
def _merge(base: Any, over: Any) -> Any:
    """``over`` deep-merged into ``base`` (mappings key by key; anything else replaced)."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def load_stages(name_or_path: str, overrides: Sequence[str] = ()) -> list[RunConfig]:
    """The run configs of a staged YAML (one per ``stages:`` entry; see module doc), ``overrides`` applied
    to every stage after its own (``init_from`` to the first only). A YAML without ``stages:`` gives one
    run config."""
    path = _resolve_path(name_or_path)
    raw = yaml.safe_load(read_config_text(path)) or {}
    stages = raw.pop("stages", None) if isinstance(raw, dict) else None
    if stages is None:
        return [load_run_config(name_or_path, overrides)]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, Mapping) for s in stages):
        raise ConfigError(f"{path}: stages must be a non-empty list of mappings of overrides (fix: e.g. "
                          "stages: [{train: {steps: 50}, data: {seq_len: 1024}}]).")
    model = raw.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (path.parent / model).is_file():
        raw["model"] = str(path.parent / model)
    # an init_from override names the checkpoint the first stage continues; the later ones continue theirs
    first_only = [o for o in overrides if o.split("=", 1)[0].strip() in ("init_from", "train.init_from")]
    every = [o for o in overrides if o not in first_only]
    runs: list[RunConfig] = []
    for i, st in enumerate(stages):
        merged = _merge(raw, st)
        if runs and not (merged.get("train") or {}).get("init_from"):   # continue the previous stage
            prev = runs[-1].train
            merged = _merge(merged, {"train": {"init_from": str(Path(prev.output_dir) / "checkpoints" / str(prev.steps))}})
        runs.append(load_run_config(merged, every + (first_only if i == 0 else [])))
    outs = [r.train.output_dir for r in runs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"{path}: stages share an output_dir ({outs}) (fix: give each stage its own "
                          "train.output_dir).")
    return runs


__all__ = ["check_init_from", "init_checkpoint", "restore_model_states", "load_stages", "ROPE_FIELDS"]
