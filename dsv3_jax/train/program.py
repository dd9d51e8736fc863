"""The train step as one program over a mesh: abstract model state, its shardings, the optimizer and
the jitted step — built from shapes alone, so the same code serves the trainer (which then creates the
state in its shards) and ``dsv3 plan`` (which only compiles it, possibly for a TPU slice it does not
have).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.rules import Rules

from ..config import ModelConfig, RuntimeConfig
from ..model import DeepSeekV3
from ..model.layers import RouterBias
from .config import TrainConfig
from .optim import lr_schedule, make_optimizer
from .step import make_train_step
from ..pipeline.config import PipelineConfig, validate_pipeline
from .pipeline_step import make_pipeline_grad_fn, stage_layout

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass
class TrainProgram:
    """Everything a train step needs except the values: ``build()`` makes the model, ``abstract`` is
    the state ``{params, bias, rest, opt, applied}`` as ShapeDtypeStructs with ``shardings``."""
    graphdef: Any
    build: Callable[[], DeepSeekV3]
    abstract: dict
    shardings: dict
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation
    schedule: Callable
    step: Callable  # jitted: (state, batch, poison) -> (state, metrics)

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
                for k in BATCH_KEYS}

    def lower(self, batch_size: int, seq_len: int):
        """The step lowered for abstract inputs (``.compile()`` it for the mesh's devices)."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract, self.shardings)
        poison = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(self.batch_sharding.mesh, P()))
        return self.step.lower(state, self.abstract_batch(batch_size, seq_len), poison)


def train_program(cfg: ModelConfig, runtime: RuntimeConfig, t: TrainConfig, mesh: Mesh, rules: Rules, *,
                  seed: int = 0, donate: bool = False, pipeline: Optional[PipelineConfig] = None) -> TrainProgram:
    """The train step of ``cfg`` on ``mesh``: the model built for the mesh (MoE layers expert-parallel,
    kernels per shard), parameters / router bias / optimizer state laid out by ``rules``. A mesh with
    ``stage`` > 1 runs the pipelined step (``pipeline``'s schedule, docs/design.md §Pipeline), with the
    MoE stack's layers split over ``stage``."""
    build = lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(seed), runtime=runtime, mesh=mesh, rules=rules)  # noqa: E731
    graphdef, a_params, a_bias, a_rest = nnx.split(nnx.eval_shape(build), nnx.Param, RouterBias, ...)
    shardings = {k: rules.shardings(v, mesh) for k, v in (("params", a_params), ("bias", a_bias), ("rest", a_rest))}
    schedule = lr_schedule(t)
    tx = make_optimizer(t, a_params)
    a_opt = jax.eval_shape(tx.init, a_params)
    shardings["opt"] = rules.shardings(a_opt, mesh)
    shardings["applied"] = NamedSharding(mesh, P())
    abstract = {"params": a_params, "bias": a_bias, "rest": a_rest, "opt": a_opt,
                "applied": jax.ShapeDtypeStruct((), jnp.int32)}
    batch_sharding = rules.batch_sharding(mesh)
    bsh = {k: batch_sharding for k in BATCH_KEYS}
    grad_fn = None
    if mesh.shape.get("stage", 1) > 1:
        pipeline = validate_pipeline(pipeline or PipelineConfig(), cfg, mesh.shape["stage"], grad_accum=t.grad_accum)
        grad_fn = make_pipeline_grad_fn(graphdef, cfg, runtime, t, pipeline, mesh)
        shardings = {k: stage_layout(v, mesh) for k, v in shardings.items()}
    step = jax.jit(make_train_step(graphdef, cfg, t, tx, schedule, grad_fn),
                   in_shardings=(shardings, bsh, NamedSharding(mesh, P())), out_shardings=(shardings, None),
                   donate_argnums=(0,) if donate else ())
    return TrainProgram(graphdef, build, abstract, shardings, batch_sharding, tx, schedule, step)


__all__ = ["TrainProgram", "train_program", "BATCH_KEYS"]
