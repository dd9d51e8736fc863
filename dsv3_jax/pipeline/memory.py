"""Per-stage memory of a pipelined run, as ``dsv3 info --mesh stage=N,...`` prints it (docs/pipeline.md
§Memory per stage). Abstract shapes only: nothing is allocated, any mesh size works.

A device of stage ``d`` holds its MoE rows — ``lmax`` of them, the most layers any stage runs (an uneven
split is stored padded, ``partition.StageMap``), twice for DualPipe: stage d of one direction and stage
``PP-1-d`` of the other — plus the non-stage leaves (embedding, dense layers, final norm, head, MTP), which
every stage holds once (docs/design.md §Pipeline). Its activation memory is the schedule's peak number of
stashed micro-batch chunks (``simulate(...).activations[d]``) times one stash: the executor keeps a
micro-batch's stage input ``[rows, seq, hidden]`` and recomputes the stage forward in the backward, so one
stash is ``rows x seq x hidden x act_bytes`` with ``rows`` = sequences of one micro-batch on one device.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
from flax import nnx

from sharding import DEFAULT_RULES, MeshConfig, Rules

from ..config import ModelConfig
from ..errors import MeshError, PipelineConfigError
from ..model import DeepSeekV3
from .partition import balance, check_split, parse_layers_per_stage, stage_costs, stage_extras
from .schedules import check
from .simulate import simulate

NON_STAGE_AXES = ("data", "fsdp", "expert", "tensor")
PIPELINE_KEYS = ("schedule", "microbatches", "layers_per_stage")


def pipeline_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``pipeline.KEY=VALUE`` items off a list of config overrides: ``({key: value}, the rest)``."""
    found: dict[str, Any] = {}
    rest = []
    for item in overrides or []:
        key, _, value = item.partition("=")
        if not key.startswith("pipeline."):
            rest.append(item)
            continue
        name = key[len("pipeline."):]
        if name not in PIPELINE_KEYS:
            raise PipelineConfigError(f"{key} is not a pipeline setting (fix: use pipeline.schedule=NAME, "
                                      "pipeline.microbatches=N or pipeline.layers_per_stage=N,N,...)")
        if name == "microbatches":
            try:
                value = int(value)
            except ValueError:
                raise PipelineConfigError(f"{item}: the micro-batch count must be a whole number (fix: e.g. "
                                          "pipeline.microbatches=32)") from None
        if name == "layers_per_stage":
            value = parse_layers_per_stage(value)
        found[name] = value
    return found, rest


def _split_bytes(cfg: ModelConfig, sizes: Mapping[str, int], rules: Rules) -> dict[str, int]:
    """Per-device bytes and trainable elements of the stage-split MoE stack and of everything else."""
    state = nnx.state(nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0))))
    flat = list(nnx.to_flat_state(state))
    stack_key = DeepSeekV3.STACKS[1]
    out = {}
    for name, keep in (("stack", lambda k: k[0] == stack_key), ("shared", lambda k: k[0] != stack_key)):
        part = nnx.from_flat_state([(k, v) for k, v in flat if keep(k)])
        out[name + "_bytes"] = rules.per_device_bytes(part, sizes)
        out[name + "_params"] = 0 if cfg.fp8_weights else rules.per_device_elements(part, sizes, kind=nnx.Param)
    return out


def stage_memory(cfg: ModelConfig, mesh: str | Mapping[str, int], *, schedule: str = "1f1b",
                 microbatches: int = 0, seq_len: int = 4096, batch_size: Optional[int] = None,
                 moment_bytes: int = 4, act_bytes: Optional[int] = None, layers_per_stage=(),
                 n_mtp: Optional[int] = None, rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
    """Per pipeline stage (= per device row of the ``stage`` axis): parameter bytes (the MoE stack's share
    times the schedule's parameter copies, plus the shared leaves), AdamW moment bytes, and activation bytes
    (the schedule's peak stashed micro-batch chunks on that device times one stash, see the module
    docstring). ``microbatches=0``: the schedule's minimum (PP, or 2 PP for DualPipe); ``batch_size``: global
    sequences per step, default one sequence per micro-batch per batch shard; ``act_bytes``: bytes per
    activation element, default the parameters' dtype (the runtime's default compute dtype).
    ``layers_per_stage``: MoE layers per stage, default the cost-balanced split (``partition.balance``
    with ``n_mtp`` MTP depths on the last stage, default the model's); each stage's forward cost per token
    and its share of the mean (``imbalance`` = max / mean) are reported with it."""
    if isinstance(mesh, str):
        mc = MeshConfig.parse(mesh)
        sizes = {a: getattr(mc, a) for a in ("stage",) + NON_STAGE_AXES}
    else:
        sizes = {a: int(mesh.get(a, 1)) for a in ("stage",) + NON_STAGE_AXES}
    if any(n < 1 for n in sizes.values()):
        raise MeshError(f"mesh {mesh}: give every axis size as a positive integer (fix: e.g. stage=4,expert=8; "
                        "no -1 here, there is no device count to fill it).")
    pp = sizes["stage"]
    microbatches = microbatches or (2 * pp if schedule == "dualpipe" else pp)
    check(schedule, pp, microbatches)
    layers = cfg.num_moe_layers
    n_mtp = cfg.num_mtp_layers if n_mtp is None else n_mtp
    counts = parse_layers_per_stage(layers_per_stage)
    if counts:
        check_split(counts, layers, pp)
    else:
        counts = balance(cfg, pp, n_mtp, seq_len)
    lmax = max(counts)
    costs = stage_costs(counts, *stage_extras(cfg, n_mtp, seq_len))
    mean_cost = sum(costs) / pp
    shards = math.prod(sizes[a] for a in rules.get("batch") if a in sizes)
    batch_size = batch_size or microbatches * shards
    if batch_size % (microbatches * shards):
        raise PipelineConfigError(f"batch size {batch_size} does not split into {microbatches} micro-batches over "
                                  f"{shards} batch shards (fix: use a multiple of {microbatches * shards}).")
    rows = batch_size // (microbatches * shards)
    act_bytes = act_bytes or np.dtype(cfg.param_dtype).itemsize
    stash = rows * seq_len * cfg.hidden_size * act_bytes
    t = simulate(schedule, pp=pp, microbatches=microbatches)
    part = _split_bytes(cfg, {a: sizes[a] for a in NON_STAGE_AXES}, rules)
    # every stage stores lmax rows of the stack (its layers and its padding rows), per copy
    params = part["stack_bytes"] // layers * lmax * t.param_copies + part["shared_bytes"]
    optimizer = 2 * moment_bytes * (part["stack_params"] // layers * lmax * t.param_copies + part["shared_params"])
    stages = [{"stage": d, "moe_layers": counts[d], "padding_rows": lmax - counts[d], "cost": costs[d],
               "cost_share": costs[d] / mean_cost, "param_bytes": params, "optimizer_bytes": optimizer,
               "activations": n, "activation_bytes": n * stash} for d, n in enumerate(t.activations)]
    return {"axes": sizes, "devices": math.prod(sizes.values()), "schedule": schedule, "microbatches": microbatches,
            "param_copies": t.param_copies, "batch_size": batch_size, "rows_per_microbatch": rows,
            "seq_len": seq_len, "stash_bytes": stash, "layers_per_stage": list(counts), "lmax": lmax,
            "imbalance": max(costs) / mean_cost, "stages": stages}


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def format_stage_memory(m: dict[str, Any]) -> str:
    lines = [f"pipeline {m['schedule']}: {m['axes']['stage']} stages, {m['microbatches']} micro-batches of "
             f"{m['rows_per_microbatch']} x {m['seq_len']} tokens per device, parameters {m['param_copies']}x, "
             f"one stash {_bytes(m['stash_bytes'])}",
             f"  MoE layers per stage {m['layers_per_stage']} ({m['lmax']} rows stored per stage); forward cost "
             f"per stage / mean: max {m['imbalance']:.3f}"]
    for s in m["stages"]:
        total = s["param_bytes"] + s["optimizer_bytes"] + s["activation_bytes"]
        lines.append(f"  stage {s['stage']:>2}: {s['moe_layers']} MoE layers (cost x{s['cost_share']:.2f}), "
                     f"params {_bytes(s['param_bytes'])} + optimizer "
                     f"{_bytes(s['optimizer_bytes'])} + activations {s['activations']} x stash = "
                     f"{_bytes(s['activation_bytes'])}  (total {_bytes(total)} per device)")
    return "\n".join(lines)


__all__ = ["stage_memory", "format_stage_memory", "pipeline_overrides"]
