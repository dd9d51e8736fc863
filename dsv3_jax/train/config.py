"""Run configs: one YAML with ``model``, ``runtime``, ``train`` and ``data`` sections, plus ``key=value`` overrides.

    model: tiny            # a config name/path, or a mapping of ModelConfig fields
    runtime: {remat: none} # RuntimeConfig: how the model runs (not stored in checkpoints)
    train: {steps: 300, lr: 3e-3, ...}     # TrainConfig below
    data:  {seq_len: 128, batch_size: 16}  # dsv3_jax.data.DataConfig

Overrides use dotted keys (``train.lr=1e-3``, ``data.path=corpus/``, ``model.n_routed_experts=32``); a
bare key is looked up in ``train``, then ``model``, ``runtime``, ``data`` (``steps=100``). A YAML without
``train``/``data`` sections is a plain model config (``--config tiny``). Values are cast and validated
as ``dsv3_jax.config`` does, with errors that name the field, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import (ConfigError, ModelConfig, RuntimeConfig, _build, _parse_override, _resolve_path, _to_dict,
                      load_config, load_runtime, read_config_text)
from ..data.pipeline import DataConfig
from ..pipeline.config import PipelineConfig

BALANCE = ("aux_free", "aux_loss", "none")
OBJECTIVES = ("pretrain", "sft", "grpo", "distill")
MOMENT_DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("v3", "constant", "finetune")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Pre-training recipe (docs/architecture.md §4, §5, §8), scaled to the run length."""
    steps: int = 1000
    grad_accum: int = 1                  # micro-batches per step (data.batch_size must divide)
    seed: int = 0                        # parameter init (data order: data.seed)
    # optimizer (docs/architecture.md §8)
    lr: float = 2.2e-4                   # peak learning rate
    warmup_steps: int = -1               # -1: 2% of steps (the report's 2K of ~100K-step scale, rounded up)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0               # global-norm clip; 0 disables
    moment_dtype: str = "bfloat16"       # AdamW moments in bf16, the report's (docs/architecture.md §6); or float32
    lr_schedule: str = "v3"              # v3 (warm-up/constant/cosine/tails, optim.py) | constant (extension stages)
                                         # | finetune (post-training: warm-up, one cosine to 0.1·lr)
    batch_ramp_start: float = 0.2        # rows trained at step 0 / data.batch_size (3072/15360); 1 = no ramp
    # losses and balancing (docs/architecture.md §4, §5)
    mtp_weight: float = 0.3              # λ for the first 10T/14.8T of the run
    mtp_weight_final: float = -1.0       # λ after that; -1: mtp_weight/3 (the report's 0.3 → 0.1; 0 stays 0)
    balance: str = "aux_free"            # aux_free (bias update + α loss) | aux_loss (α loss only) | none
    balance_alpha: float = 1e-4          # α of the sequence-wise balance loss
    bias_rate: float = 1e-3              # γ of the aux-loss-free bias update
    bias_freeze: bool = True             # γ = 0 for the last 500B/14.8T tokens of the run
    # parameter EMA on the host (dsv3_jax/train/ema.py)
    ema_every: int = 0                   # snapshot the parameters every N steps (0: no EMA)
    ema_decay: float = 0.999             # per step; a snapshot N steps after the last uses decay**N
    # continue another run's checkpoint (long-context stages, docs/design.md §Long-context stages)
    init_from: str = ""                  # a checkpoint dir whose weights start a fresh run (new optimizer)
    init_rope: bool = False              # allow init_from's model to differ in its RoPE/YaRN fields only
    # bookkeeping
    output_dir: str = "runs/train"       # checkpoints/, metrics.jsonl, tensorboard/, tokenizer.json
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10                  # TensorBoard histograms / per-layer scalars; JSONL is every step
    max_bad_steps: int = 5               # consecutive non-finite steps before the run stops
    progress: bool = True
    tensorboard: bool = True
    mesh: str = ""                       # e.g. "data=2,expert=4" (also --mesh)
    tokenizer_documents: int = 0         # when data.tokenizer is unset: train one on N docs (0: all)
    inject_nan_steps: str = ""           # test hook: comma list of steps whose loss is made NaN
    # post-training (docs/design.md §Post-training)
    objective: str = "pretrain"          # pretrain | sft | grpo | distill
    reward: str = "dsv3_jax.train.rewards:exact_answer"  # grpo: module:callable(prompt, completion, answer)
    reward_timeout: float = 10.0         # grpo: seconds a reward call may take (then it scores 0)
    group_size: int = 4                  # grpo: G completions per prompt (data.batch_size prompts a step)
    max_new_tokens: int = 16             # grpo: completion length limit (stops at EOS)
    temperature: float = 1.0             # grpo: sampling temperature of the rollouts
    clip_eps: float = 0.2                # grpo: ε of the clipped policy ratio
    kl_coef: float = 0.04                # grpo: β of the k3 KL penalty to the frozen reference
    policy_updates: int = 2              # grpo: optimizer steps per batch of samples
    teacher: str = ""                    # distill: teacher checkpoint (same tokenizer)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    runtime: RuntimeConfig = RuntimeConfig()
    pipeline: PipelineConfig = PipelineConfig()   # used when the mesh has stage > 1 (docs/design.md §Pipeline)

    def to_dict(self) -> dict:
        return {"model": _to_dict(self.model), "runtime": _to_dict(self.runtime), "train": _to_dict(self.train),
                "data": _to_dict(self.data), "pipeline": _to_dict(self.pipeline)}


def _fail(field: str, value: Any, why: str, fix: str) -> None:
    raise ConfigError(f"{field}={value!r}: {why} (fix: {fix}).")


def validate_train(t: TrainConfig, data: DataConfig) -> None:
    for f in ("steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every",
              "max_bad_steps"):
        if getattr(t, f) < 1:
            _fail(f"train.{f}", getattr(t, f), "must be >= 1", f"set train.{f} to a positive integer")
    if t.eval_batches < 0:
        _fail("train.eval_batches", t.eval_batches, "cannot be negative", "use 0 to disable evaluation")
    if not 0 < t.lr < math.inf:
        _fail("train.lr", t.lr, "must be a positive finite number", "use e.g. 2.2e-4")
    for f in ("b1", "b2"):
        if not 0 <= getattr(t, f) < 1:
            _fail(f"train.{f}", getattr(t, f), "must be in [0, 1)", "use 0.9 / 0.95")
    if t.mtp_weight_final != -1 and not 0 <= t.mtp_weight_final < math.inf:
        _fail("train.mtp_weight_final", t.mtp_weight_final, "must be a finite number >= 0, or -1 for mtp_weight/3",
              "e.g. 0.1")
    for f in ("weight_decay", "clip_norm", "mtp_weight", "balance_alpha", "bias_rate"):
        if not 0 <= getattr(t, f) < math.inf:
            _fail(f"train.{f}", getattr(t, f), "must be a finite number >= 0", f"use 0 to disable")
    if not 0 < t.batch_ramp_start <= 1:
        _fail("train.batch_ramp_start", t.batch_ramp_start, "must be in (0, 1]", "use 0.2 (the report's) or 1 for no ramp")
    if t.ema_every < 0 or not 0 < t.ema_decay < 1:
        _fail("train.ema_every/ema_decay", (t.ema_every, t.ema_decay), "need ema_every >= 0 and 0 < ema_decay < 1",
              "e.g. ema_every=10 ema_decay=0.999")
    if t.init_rope and not t.init_from:
        _fail("train.init_rope", t.init_rope, "only applies with train.init_from", "set train.init_from=CHECKPOINT")
    for f in ("group_size", "max_new_tokens", "policy_updates"):
        if getattr(t, f) < 1:
            _fail(f"train.{f}", getattr(t, f), "must be >= 1", f"set train.{f} to a positive integer")
    for f in ("reward_timeout", "temperature", "clip_eps", "kl_coef"):
        if not 0 <= getattr(t, f) < math.inf:
            _fail(f"train.{f}", getattr(t, f), "must be a finite number >= 0", "see configs/grpo_demo.yaml")
    if t.objective == "grpo" and (t.group_size < 2 or t.temperature <= 0):
        bad = "group_size" if t.group_size < 2 else "temperature"
        _fail(f"train.{bad}", getattr(t, bad), "GRPO's baseline is the mean reward of a group of sampled "
              "completions, so it needs at least 2 samples drawn at a temperature > 0",
              "e.g. train.group_size=8 train.temperature=1.0")
    if t.objective == "sft" and not (t.init_from or data.tokenizer):
        _fail("train.init_from", "", "train.objective=sft fine-tunes a model whose tokenizer knows the chat tokens, "
              "and no tokenizer is trained on conversations", "set train.init_from=CKPT_DIR (or data.tokenizer)")
    if t.objective in ("grpo", "distill") and not (t.init_from if t.objective == "grpo" else t.teacher):
        f = "init_from" if t.objective == "grpo" else "teacher"
        _fail(f"train.{f}", "", f"train.objective={t.objective} needs a checkpoint", f"set train.{f}=CKPT_DIR")
    for f, choices in (("balance", BALANCE), ("moment_dtype", MOMENT_DTYPES), ("lr_schedule", LR_SCHEDULES),
                       ("objective", OBJECTIVES)):
        v = getattr(t, f)
        if v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            _fail(f"train.{f}", v, f"must be one of {list(choices)}", f"use {close[0]!r}" if close else
                  f"pick one of {list(choices)}")
    if data.batch_size % t.grad_accum:
        _fail("train.grad_accum", t.grad_accum, f"must divide data.batch_size={data.batch_size}",
              "pick a divisor of the batch size")
    if t.warmup_steps > t.steps:
        _fail("train.warmup_steps", t.warmup_steps, f"exceeds train.steps={t.steps}", "use fewer warm-up steps")
    try:
        [int(s) for s in t.inject_nan_steps.split(",") if s.strip()]
    except ValueError:
        _fail("train.inject_nan_steps", t.inject_nan_steps, "must be a comma list of step numbers", "e.g. 3,4")


_SECTIONS = ("model", "runtime", "train", "data", "pipeline")


def load_run_config(name_or_path: str | os.PathLike | Mapping = "tiny",
                    overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config (see module doc). ``name_or_path``: a run or model YAML, a name in
    ``configs/``, or a mapping with the three sections."""
    if isinstance(name_or_path, Mapping):
        raw = dict(name_or_path)
        base = Path(".")
    else:
        path = _resolve_path(name_or_path)
        try:
            raw = yaml.safe_load(read_config_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path} must hold a mapping, got {type(raw).__name__}.")
        base = path.parent
        if not ({"train", "data"} & set(raw)):          # a plain model config
            raw = {"model": str(path)}
        else:
            unknown = [k for k in raw if k not in _SECTIONS + ("stages",)]  # stages: train/stages.py
            if unknown:
                raise ConfigError(f"{path}: unknown section(s) {unknown} (fix: a run config holds only "
                                  f"{list(_SECTIONS)}).")
    model_src = raw.get("model", "tiny")
    if isinstance(model_src, str) and not Path(model_src).is_absolute() and (base / model_src).is_file():
        model_src = base / model_src
    train_d = dict(raw.get("train") or {})
    data_d = dict(raw.get("data") or {})
    pipe_d = dict(raw.get("pipeline") or {})
    runtime_src = raw.get("runtime") or {}
    model_over: list[str] = []
    runtime_over: list[str] = []
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    runtime_fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    for item in overrides:
        keys, value = _parse_override(item)
        section = keys[0] if len(keys) > 1 and keys[0] in _SECTIONS else None
        if section is None:
            head = keys[0]
            section = ("train" if head in train_fields else "model" if head in model_fields
                       else "runtime" if head in runtime_fields else "data" if head in data_fields else None)
            if section is None:
                allk = sorted(train_fields | model_fields | runtime_fields | data_fields)
                close = difflib.get_close_matches(head, allk, n=1)
                raise ConfigError(f"unknown config key {'.'.join(keys)!r} "
                                  f"(fix: {'did you mean ' + repr(close[0]) + '?' if close else 'use model./runtime./train./data. keys'}).")
        else:
            keys = keys[1:]
        if section in ("model", "runtime"):
            (model_over if section == "model" else runtime_over).append(f"{'.'.join(keys)}={item.split('=', 1)[1]}")
        else:
            if len(keys) != 1:
                raise ConfigError(f"override {item!r}: {section} fields are not nested (fix: {section}.FIELD=VALUE).")
            {"train": train_d, "data": data_d, "pipeline": pipe_d}[section][keys[0]] = value
    if isinstance(model_src, Mapping):
        model = load_config(dict(model_src), model_over)
    else:
        model = load_config(model_src, model_over)
    train = _build(TrainConfig, train_d, prefix="train.")
    try:
        data = _build(DataConfig, data_d, prefix="data.")
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {e}") from None
    validate_train(train, data)
    pipeline = _build(PipelineConfig, pipe_d, prefix="pipeline.")
    return RunConfig(model, train, data, load_runtime(runtime_over, base=runtime_src), pipeline)


__all__ = ["TrainConfig", "RunConfig", "load_run_config", "validate_train", "BALANCE"]
