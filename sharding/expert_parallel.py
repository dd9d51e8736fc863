"""Expert parallelism: the MoE expert compute under ``shard_map`` (issue M3, SPEC §4 and §9).

Routing is computed outside, on the global token arrays, so router statistics (and with them the
aux-loss-free bias update) always see the whole global batch. Strategies:

* ``allgather`` — each expert shard gathers the tokens of its ``expert``-axis peers, runs its local
  experts (dropless grouped GEMM; token-slots routed elsewhere go to an all-zero "null" expert), and
  ``psum_scatter`` returns each token's summed expert output to its owner. Works on every backend.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from flax import nnx
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.model.grouped_gemm import expert_ffn, sort_by_expert

from .mesh import MeshError
from .rules import DEFAULT_RULES, Rules

STRATEGIES = ("allgather",)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    mesh: Mesh
    strategy: str
    batch_axes: tuple
    impl: str = "auto"
    block: int = 128

    @property
    def n_expert_shards(self) -> int:
        return self.mesh.shape["expert"]

    @property
    def n_tensor(self) -> int:
        return self.mesh.shape.get("tensor", 1)


def enable(model, mesh: Mesh, strategy: str = "allgather", rules: Rules = DEFAULT_RULES):
    """Make every MoE layer of ``model`` run expert-parallel on ``mesh``. Returns the model."""
    from dsv3_jax.model.moe import MoE
    if strategy not in STRATEGIES:
        raise MeshError(f"unknown expert-parallel strategy {strategy!r} (fix: use one of {list(STRATEGIES)}).")
    cfg = model.cfg
    n_ep = mesh.shape.get("expert", 1)
    if cfg.n_routed_experts % n_ep:
        raise MeshError(f"{cfg.n_routed_experts} routed experts cannot be split over the mesh's expert axis of "
                        f"size {n_ep} (fix: choose an expert axis size that divides {cfg.n_routed_experts}).")
    target = rules["batch"]
    batch_axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape.get(a, 1) > 1)
    if n_ep > 1 and "expert" not in batch_axes:
        raise MeshError("the allgather strategy needs the batch sharded over the 'expert' axis "
                        "(fix: keep 'expert' in the 'batch' rule).")
    ep = ExpertParallel(mesh, strategy, batch_axes, cfg.moe_impl, cfg.moe_block_size)
    iter_modules = getattr(nnx, "iter_modules", None) or (lambda m: m.iter_modules())
    for _, module in iter_modules(model):
        if isinstance(module, MoE):
            module.ep = ep
    return model


def routed_experts(ep: ExpertParallel, x: jax.Array, weights: jax.Array, experts: jax.Array,
                   w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """``x: [B, S, D]``, ``weights/experts: [B, S, K]``, expert weights ``[E, D, I]``/``[E, I, D]``
    → routed output ``[B, S, D]``."""
    tensor = "tensor" if ep.n_tensor > 1 and w_gate.shape[-1] % ep.n_tensor == 0 else None
    tok = P(ep.batch_axes or None, None, None)
    w_in = P("expert", None, tensor)
    w_out = P("expert", tensor, None)

    def local(x, weights, experts, w_gate, w_up, w_down):
        B, S, D = x.shape
        K = experts.shape[-1]
        if ep.n_expert_shards > 1:
            x, weights, experts = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, weights, experts))
        xt, wt, et = x.reshape(-1, D), weights.reshape(-1, K), experts.reshape(-1, K)
        e_loc = w_gate.shape[0]
        lo = jax.lax.axis_index("expert") * e_loc
        mine = (et >= lo) & (et < lo + e_loc)
        slot_expert = jnp.where(mine, et - lo, e_loc)  # e_loc = the null expert (zero weights)
        order, sizes = sort_by_expert(slot_expert, e_loc + 1)
        pad = lambda w: jnp.concatenate([w, jnp.zeros((1,) + w.shape[1:], w.dtype)])  # noqa: E731
        y_sorted = expert_ffn(xt[order // K], sizes, pad(w_gate), pad(w_up), pad(w_down), impl=ep.impl, block=ep.block)
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True).reshape(-1, K, D)
        out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), jnp.where(mine, wt, 0.0))
        if tensor:
            out = jax.lax.psum(out, "tensor")
        if ep.n_expert_shards > 1:
            out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        return out.reshape(B, S, D).astype(x.dtype)

    fn = jax.shard_map(local, mesh=ep.mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                       check_vma=False)
    return fn(x, weights, experts, w_gate, w_up, w_down)
