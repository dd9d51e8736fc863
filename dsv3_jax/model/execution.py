"""How a built model runs: its resolved ``RuntimeConfig`` plus the mesh and rules it was built for.

``DeepSeekV3`` makes one ``Execution`` and hands it to every layer. Reading ``ex.compute_dtype`` or
``ex.remat`` reads the runtime config; ``ex.mesh`` / ``ex.rules`` say where kernels run per shard
(``sharding.kernels.per_shard``); kernel backends are resolved for the platform of the mesh's devices
(not the host's), so a program compiled ahead of time for a TPU slice on a CPU host uses the TPU kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jax.sharding import Mesh

from pallas_kernels import fp8
from pallas_kernels import mla as mla_ops
from sharding.expert_parallel import resolve_strategy
from sharding.kernels import platform_of
from sharding.rules import DEFAULT_RULES, Rules

from ..config import ModelConfig, RuntimeConfig


@dataclasses.dataclass(frozen=True)
class Execution:
    runtime: RuntimeConfig            # resolved: concrete compute dtype and kernel backends
    mesh: Optional[Mesh] = None
    rules: Rules = DEFAULT_RULES
    fp8_backend: str = "auto"         # pallas_kernels.fp8 backend for the mesh's platform

    def __getattr__(self, name: str):
        # the runtime's fields read as the execution's own (ex.compute_dtype, ex.quant, ex.remat, ...)
        if name.startswith("__") or name == "runtime":
            raise AttributeError(name)
        return getattr(self.runtime, name)


def execution(cfg: ModelConfig, runtime: Optional[RuntimeConfig] = None, mesh: Optional[Mesh] = None,
              rules: Rules = DEFAULT_RULES) -> Execution:
    """Resolve ``runtime`` for ``cfg`` on ``mesh``: ``compute_dtype=None`` → the parameters' dtype;
    ``auto`` kernels → the implementation for the mesh's platform; ``ep_strategy='auto'`` → the exchange
    the mesh needs (``sharding.expert_parallel.resolve_strategy``); ``remat='auto'`` → the platform's policy."""
    rt = (runtime or RuntimeConfig()).resolved(cfg)
    platform = platform_of(mesh)
    attn = mla_ops.resolve_backend(rt.attention_impl, rt.interpret, platform=platform)
    # XLA:CPU: the looped expert-major tiles (docs/design.md §MoE on CPU); GPU/TPU: ragged_dot
    moe = rt.moe_impl if rt.moe_impl != "auto" else ("looped" if platform == "cpu" else "ragged")
    fp8_backend = fp8.resolve_backend("pallas" if rt.interpret else "auto", rt.interpret, platform=platform)
    ep = resolve_strategy(rt.ep_strategy, mesh)
    # remat 'auto': none on CPU (plentiful memory; recomputing the forward is a third of the step there),
    # the recipe's policy on GPU/TPU (docs/design.md §Remat)
    remat = rt.remat if rt.remat != "auto" else ("none" if platform == "cpu" else "save_dots_except_mla_up")
    return Execution(dataclasses.replace(rt, attention_impl=attn, moe_impl=moe, ep_strategy=ep, remat=remat), mesh,
                     rules, fp8_backend)


__all__ = ["Execution", "execution"]
