"""DeepSeekMoE (docs/architecture.md §4): routed experts with group-limited top-k, shared experts, dropless.

``out = Σ shared FFN(u) + Σ_i g_i FFN_i(u)`` (the residual ``u +`` is added by the block).

How the routed experts are executed is decided when the layer is built: on one device (or
replicated) every expert is local; built for a mesh, the layer runs expert-parallel through
``sharding.expert_parallel`` with the strategy of ``RuntimeConfig.ep_strategy``. Both paths use the
same routing (``routing.route``) and the same local-expert function (``local_expert_sum``).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import fp8
from sharding.expert_parallel import ExpertParallel, moe_forward

from ..config import ModelConfig
from .execution import Execution
from .grouped_gemm import auto_block_size, expert_ffn, grouping, per_row_ffn, sort_by_expert
from .looped_ffn import round_capacity
from .layers import MLP, as_float, dtype_of, fp8_param, param
from .routing import Router, RouterStats, Routing, route, router_stats


def local_expert_sum(x: jax.Array, experts: jax.Array, gates: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                     w_down: jax.Array, *, impl: str, block: int, quant: str, all_local: bool = False,
                     max_slots: Optional[int] = None, out_dtype=jnp.float32, fp8_backend: str = "auto",
                     interpret: bool = False) -> jax.Array:
    """``Σ_k g_k · FFN_{e_k}(x)`` over the slots whose expert is held here: ids in ``[0, E_loc)``
    (``E_loc = w_gate.shape[0]``); any other id is a slot owned by another shard and contributes 0.
    ``x: [N, D]``, ``experts/gates: [N, K]`` → fp32 ``[N, D]``. Dropless: slots are sorted by expert
    and run through the grouped GEMM. ``all_local`` (one device) skips the foreign-slot bookkeeping.

    With foreign slots, only the local ones are computed: they are sorted first and the grouped GEMM
    runs over ``max_slots`` rows (default ``N · min(K, E_loc)``: a token has at most that many local
    slots). A caller passing a smaller ``max_slots`` must guarantee that no more slots are local
    (``sharding.expert_parallel`` does, by construction). ``out_dtype``: the dtype the slots are summed
    in when some may be foreign (``sharding.expert_parallel`` sums a token's ≤ ``min(K, E_loc)`` local
    slots in the compute dtype, as the partial sum it sends home)."""
    N, D = x.shape
    K = experts.shape[-1]
    e_loc = w_gate.shape[0]
    kw = dict(impl=impl, block=block, quant=quant, fp8_backend=fp8_backend, interpret=interpret)
    if impl == "per_row":   # at most one row per expert (decode; chosen by MoE._expert_fn on one device)
        y = per_row_ffn(jnp.repeat(x, K, axis=0), experts.reshape(-1), w_gate, w_up, w_down).reshape(N, K, D)
        return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), gates)
    if all_local:
        order, sizes = sort_by_expert(experts, e_loc)
        y_sorted = expert_ffn(x[order // K], sizes, w_gate, w_up, w_down, **kw)
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True).reshape(N, K, D)
        return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), gates)
    mine = (experts >= 0) & (experts < e_loc)
    key = jnp.where(mine, experts, e_loc).reshape(-1)                 # e_loc: foreign slots, sorted last
    S = min(N * K, max_slots if max_slots is not None else N * min(K, e_loc))
    order = jnp.argsort(key, stable=True)[:S]                          # the local slots, by expert, then padding
    counts = jnp.bincount(key, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    rows = order // K
    g = jnp.where(mine, gates, 0.0).reshape(-1)[order].astype(jnp.float32)
    if impl == "ragged" and quant != "fp8":
        sizes = counts               # ragged_dot leaves rows past the groups at zero: no work for the padding
    else:                            # the blocked layout covers every row: the padding rows are one more group,
        # whose blocks multiply by zero weights (expert_ffn); no zero expert is appended to the stack, which
        # would copy the local expert weights every layer (docs/design.md §Memory at 671B)
        sizes = jnp.concatenate([counts, (S - counts.sum())[None]])
    y = expert_ffn(x[rows], sizes, w_gate, w_up, w_down, **kw)
    # gate product in fp32; checkpointed so the backward keeps ``y`` in its own dtype, not an fp32 copy
    weighted = jax.checkpoint(lambda y, g: (y.astype(jnp.float32) * g[:, None]).astype(out_dtype))(y, g)
    return jnp.zeros((N, D), out_dtype).at[rows].add(weighted)


class Experts(nnx.Module):
    """Stacked routed expert weights ``[E, D, I]`` / ``[E, I, D]`` (with ``fp8_weights``: per-expert
    e4m3 + 128×128 block scales, one ``QuantArray`` each, docs/architecture.md §6)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        for name, shape, axes in (("gate", (E, D, I), ("expert", "embed", "moe_mlp")),
                                  ("up", (E, D, I), ("expert", "embed", "moe_mlp")),
                                  ("down", (E, I, D), ("expert", "moe_mlp", "embed"))):
            setattr(self, name, fp8_param(shape, 1, 1, axes) if cfg.fp8_weights else
                    param(rngs, shape, axes, std=cfg.init_std, dtype=cfg.param_dtype))

    def weights(self, dtype=None) -> list[jax.Array]:
        """``[gate, up, down]`` as ``dtype`` (``None``: the stored dtype, or fp32 for FP8 storage — what
        the FP8 training path quantizes; FP8 storage is dequantised block by block)."""
        ws = [w[...] for w in (self.gate, self.up, self.down)]
        if dtype is None:
            return [as_float(w, jnp.float32) if isinstance(w, fp8.QuantArray) else w for w in ws]
        return [as_float(w, dtype) for w in ws]


class MoE(nnx.Module):
    """Router + routed experts + shared experts. ``ep``: the expert-parallel layout when the model is
    built for a mesh (``None``: every expert is local)."""

    def __init__(self, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs, ep: Optional[ExpertParallel] = None):
        self.cfg, self.rt, self.ep = cfg, rt, ep
        self.router = Router(cfg, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg, rt, rngs)
                       if cfg.n_shared_experts else None)

    def _expert_fn(self, all_local: bool, tokens: int):
        """The local-expert function with its grouping chosen at trace time from the *global* batch's
        rows per expert (``grouped_gemm.grouping``: per-row weights for decode steps, blocks sized to
        the batch otherwise), so every sharding of the same batch runs the same block layout (and the
        same FP8 tiles)."""
        rt = self.rt
        rows, n_exp = tokens * self.cfg.num_experts_per_tok, self.cfg.n_routed_experts
        # FP8 expert GEMMs run on the blocked layout whatever the float implementation (grouped_gemm.expert_ffn)
        base = "blocked" if rt.quant == "fp8" and rt.moe_impl == "looped" else rt.moe_impl
        impl, block = grouping(base, rows, n_exp, rt.moe_block_size)
        if impl == "per_row" and (not all_local or rt.quant == "fp8"):  # per-row is the one-device float path
            impl, block = base, (round_capacity(rows, n_exp) if base == "looped" else auto_block_size(rows, n_exp))
        return functools.partial(local_expert_sum, impl=impl, block=block, quant=rt.quant,
                                 all_local=all_local, fp8_backend=rt.fp8_backend, interpret=rt.interpret)

    def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> tuple[jax.Array, RouterStats]:
        """``x: [B, S, D]``, ``valid: [B, S]`` bool (padding excluded from statistics)."""
        B, S, D = x.shape
        cdt = dtype_of(self.rt.compute_dtype)
        # FP8 (docs/architecture.md §6) quantizes the fp32 master weights and returns fp32 weight gradients.
        ws = self.experts.weights(None if self.rt.quant == "fp8" else cdt)
        if self.ep is None:
            flat = x.reshape(B * S, D)
            routing = self.router(flat)
            out = self._expert_fn(True, B * S)(flat.astype(cdt), routing.experts, routing.weights, *ws)
            out = out.astype(cdt).reshape(B, S, D)
            dropped = jnp.zeros((), jnp.int32)
        else:  # expert-parallel over a mesh (sharding/expert_parallel.py)
            r = self.router
            route_fn = lambda xt, kernel, bias: tuple(route(  # noqa: E731
                xt.astype(jnp.float32) @ kernel.astype(jnp.float32), bias, self.cfg))
            out, (gates, experts, scores), dropped = moe_forward(
                self.ep, x.astype(cdt), r.kernel[...], None if r.bias is None else r.bias[...], *ws,
                route_fn=route_fn, expert_fn=self._expert_fn(False, B * S))
            routing = Routing(gates, experts, scores)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, router_stats(routing, B, S, self.cfg.n_routed_experts, valid)._replace(dropped=dropped)
