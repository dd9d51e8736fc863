"""The train step as one program over a mesh: abstract model state, its shardings, the optimizer and
the jitted step — built from shapes alone, so the same code serves the trainer (which then creates the
state in its shards) and ``dsv3 plan`` (which only compiles it, possibly for a TPU slice it does not
have).
"""
from __future__ import annotations

import dataclasses
import math
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
from .optim import lr_schedule, make_optimizer, mtp_weights
from .step import make_train_step
from ..pipeline.config import PipelineConfig, validate_pipeline
from ..pipeline.partition import StageMap
from .pipeline_stage import STACK
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
    # the model layout ([L] stacks in layer order: checkpoints, evaluation, EMA, init_from) and the map of
    # an uneven pipeline split, whose step takes the MoE stack staged (docs/design.md §Pipeline); with
    # no stages or an even split both layouts are one and the conversions return their input
    model_abstract: Optional[dict] = None
    model_shardings: Optional[dict] = None
    stage_map: Optional[StageMap] = None
    _convert: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def staged(self) -> bool:
        """The step's layout differs from the model's (an uneven pipeline split)."""
        return self.stage_map is not None and not self.stage_map.even

    def to_model(self, state: dict) -> dict:
        """``state`` (any of ``params/bias/rest/opt/applied``) from the step's layout to the model's."""
        return self._run("model", state)

    def to_staged(self, state: dict) -> dict:
        """``state`` (any of ``params/bias/rest/opt/applied``) from the model's layout to the step's."""
        return self._run("staged", state)

    def _run(self, to: str, state: dict) -> dict:
        if not self.staged:
            return state
        key = (to, tuple(sorted(state)))
        if key not in self._convert:
            sm = self.stage_map
            index, mask = (sm.rows, None) if to == "model" else (sm.source, sm.active.reshape(-1))
            out = self.model_shardings if to == "model" else self.shardings
            self._convert[key] = jax.jit(lambda st: restack(st, index, mask), out_shardings={k: out[k] for k in state})
        return self._convert[key](state)

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
                for k in BATCH_KEYS}

    def lower(self, batch_size: int, seq_len: int):
        """The step lowered for abstract inputs (``.compile()`` it for the mesh's devices)."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract, self.shardings)
        poison = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(self.batch_sharding.mesh, P()))
        return self.step.lower(state, self.abstract_batch(batch_size, seq_len), poison)


def _in_stack(path) -> bool:
    return any(getattr(k, "key", None) == STACK for k in path)


def restack(tree, index, mask=None):
    """Every MoE-stack leaf of ``tree`` (params, bias, optimizer moments: a path through the stack key)
    gathered along its leading dim by ``index``, rows where ``mask`` is false set to zero; the other
    leaves unchanged. Model → staged: ``StageMap.source`` and ``.active``; staged → model: ``.rows``."""
    def one(path, x):
        if not _in_stack(path):
            return x
        y = jnp.take(x, jnp.asarray(index), axis=0)
        if mask is not None:
            y = jnp.where(jnp.asarray(mask).reshape((-1,) + (1,) * (y.ndim - 1)), y, jnp.zeros((), y.dtype))
        return y
    return jax.tree_util.tree_map_with_path(one, tree)


def spread_over_stage(shardings, abstract, mesh: Mesh):
    """The model layout's shardings of an uneven split with ``stage`` added to each MoE-stack leaf's first
    dim after the layer dim that it divides (with the axes already there), so that the ``[L]`` copy the
    conversions, checkpoints and evaluation see is split over the stage groups too instead of held whole
    by each (docs/design.md §Pipeline); a leaf with no such dim stays replicated over ``stage``."""
    pp = mesh.shape["stage"]

    def one(path, sh, a):
        if not _in_stack(path) or not isinstance(sh, NamedSharding):
            return sh
        spec = list(tuple(sh.spec) + (None,) * (len(a.shape) - len(tuple(sh.spec))))
        for i in range(1, len(a.shape)):
            axes = () if spec[i] is None else (spec[i],) if isinstance(spec[i], str) else tuple(spec[i])
            if a.shape[i] % (math.prod(mesh.shape[x] for x in axes) * pp) == 0:
                spec[i] = axes + ("stage",)
                return NamedSharding(mesh, P(*spec))
        return sh
    return jax.tree_util.tree_map_with_path(one, shardings, abstract,
                                            is_leaf=lambda x: isinstance(x, NamedSharding))


def _staged_shapes(abstract, rows: int):
    def one(path, a):
        return jax.ShapeDtypeStruct((rows,) + tuple(a.shape[1:]), a.dtype) if _in_stack(path) else a
    return jax.tree_util.tree_map_with_path(one, abstract)


def train_program(cfg: ModelConfig, runtime: RuntimeConfig, t: TrainConfig, mesh: Mesh, rules: Rules, *,
                  seed: int = 0, donate: bool = False, pipeline: Optional[PipelineConfig] = None) -> TrainProgram:
    """The train step of ``cfg`` on ``mesh``: the model built for the mesh (MoE layers expert-parallel,
    kernels per shard), parameters / router bias / optimizer state laid out by ``rules``. A mesh with
    ``stage`` > 1 runs the pipelined step (``pipeline``'s schedule, docs/design.md §Pipeline), with the
    MoE stack's layers split over ``stage``: as they are when the split is even, else in the staged
    layout (``abstract``/``shardings``; ``to_model``/``to_staged`` convert)."""
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
    grad_fn = smap = layer_rows = None
    model_abstract, model_shardings = abstract, shardings
    if mesh.shape.get("stage", 1) > 1:
        n_mtp = cfg.num_mtp_layers if max(mtp_weights(t)) > 0 else 0
        pipeline = validate_pipeline(pipeline or PipelineConfig(), cfg, mesh.shape["stage"], grad_accum=t.grad_accum,
                                     n_mtp=n_mtp)
        smap = pipeline.stage_map()
        staged = {k: stage_layout(v, mesh) for k, v in shardings.items()}
        grad_fn = make_pipeline_grad_fn(graphdef, cfg, runtime, t, pipeline, mesh, staged["params"])
        if smap.even:       # [L] splits over stage as it is: one layout, no copies
            shardings = model_shardings = staged
        else:               # [PP x lmax] rows in slot order; the model layout split over stage another way
            model_shardings = {k: spread_over_stage(v, abstract[k], mesh) for k, v in shardings.items()}
            abstract, shardings, layer_rows = _staged_shapes(abstract, smap.pp * smap.lmax), staged, smap.rows
    step = jax.jit(make_train_step(graphdef, cfg, t, tx, schedule, grad_fn, layer_rows),
                   in_shardings=(shardings, bsh, NamedSharding(mesh, P())), out_shardings=(shardings, None),
                   donate_argnums=(0,) if donate else ())
    return TrainProgram(graphdef, build, abstract, shardings, batch_sharding, tx, schedule, step,
                        model_abstract, model_shardings, smap)


__all__ = ["TrainProgram", "train_program", "BATCH_KEYS"]
