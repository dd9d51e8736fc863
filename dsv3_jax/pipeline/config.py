"""The ``pipeline:`` section of a run config and its checks (docs/design.md §Pipeline).

The number of stages is the mesh's ``stage`` axis (``--mesh stage=4,data=2``); this section says how
the step runs over them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import ModelConfig
from ..errors import PipelineConfigError
from .partition import StageMap, balance, check_split, parse_layers_per_stage
from .schedules import SCHEDULES, check


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    schedule: str = "1f1b"           # gpipe | 1f1b | zb1p | dualpipe
    microbatches: int = 0            # 0: as many as stages (dualpipe: twice as many)
    layers_per_stage: tuple = ()     # MoE layers per stage; empty: balanced by cost (pipeline/partition.py)

    def __post_init__(self):
        # YAML lists and `--set pipeline.layers_per_stage=1,4,4,1` strings both become a tuple of ints
        object.__setattr__(self, "layers_per_stage", parse_layers_per_stage(self.layers_per_stage))

    def stage_map(self) -> StageMap:
        """Where the MoE layers sit over the stages (a resolved config: ``layers_per_stage`` set)."""
        return StageMap(self.layers_per_stage)

    def resolved(self, pp: int) -> "PipelineConfig":
        """With ``microbatches=0`` replaced by the smallest count the schedule accepts on ``pp`` stages."""
        if self.microbatches:
            return self
        return dataclasses.replace(self, microbatches=2 * pp if self.schedule == "dualpipe" else pp)


def validate_pipeline(p: PipelineConfig, cfg: ModelConfig, pp: int, batch_size: Optional[int] = None,
                      batch_shards: int = 1, grad_accum: int = 1, n_mtp: Optional[int] = None,
                      seq_len: int = 4096) -> PipelineConfig:
    """Check that ``p`` can run ``cfg`` on ``pp`` stages with a global batch of ``batch_size`` rows (if
    known) split over ``batch_shards`` devices per stage; returns the resolved config: micro-batches
    filled in, and ``layers_per_stage`` the cost-balanced split (``partition.balance`` with ``n_mtp``
    MTP depths on the last stage, default all of the model's, and ``seq_len`` tokens) when not given.
    Each error names the fix."""
    if p.schedule not in SCHEDULES:
        raise PipelineConfigError(f"pipeline.schedule={p.schedule!r} is unknown (fix: use one of {list(SCHEDULES)}).")
    if isinstance(p.microbatches, bool) or not isinstance(p.microbatches, int) or p.microbatches < 0:
        raise PipelineConfigError(f"pipeline.microbatches={p.microbatches!r} is not a whole number >= 0 "
                                  "(fix: e.g. pipeline.microbatches=8, or 0 for the schedule's minimum).")
    p = p.resolved(pp)
    L = cfg.num_moe_layers
    if p.layers_per_stage:
        check_split(p.layers_per_stage, L, pp)
    else:
        n_mtp = cfg.num_mtp_layers if n_mtp is None else n_mtp
        p = dataclasses.replace(p, layers_per_stage=balance(cfg, pp, n_mtp, seq_len))
    check(p.schedule, pp, p.microbatches)
    if grad_accum != 1:
        raise PipelineConfigError(f"train.grad_accum={grad_accum} with pipeline stages: the pipeline's micro-batches "
                                  "already accumulate the gradient (fix: set train.grad_accum=1 and raise "
                                  "pipeline.microbatches instead).")
    per = p.microbatches * batch_shards
    if batch_size is not None and batch_size % per:
        raise PipelineConfigError(f"data.batch_size={batch_size} is not divisible by pipeline.microbatches "
                                  f"({p.microbatches}) x the {batch_shards} batch shards of a stage = {per} (fix: use "
                                  f"a batch size that is a multiple of {per}, or fewer micro-batches).")
    return p


__all__ = ["PipelineConfig", "validate_pipeline"]
