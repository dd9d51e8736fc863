"""The DeepSeek-V3 model: embedding, scanned dense and MoE block stacks, head, MTP (docs/architecture.md §1, §5).

Layers of one kind are stored stacked (leading ``layers`` axis) and run with ``jax.lax.scan``, so
compile time does not grow with depth (docs/design.md §Scan the stack). One forward serves training,
scoring, prompt prefill and decoding: pass a latent cache (``model.init_cache``) to get it back
updated in the output.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sharding.embedding import lookup
from sharding.expert_parallel import ExpertParallel
from sharding.rules import DEFAULT_RULES, Rules

from ..config import ModelConfig, RuntimeConfig
from .execution import Execution, execution
from ..errors import TokenRangeError
from .layers import MLP, RMSNorm, dtype_of, param
from .mla import MLA, LatentCache
from .moe import MoE
from .rope import rope_angles
from .routing import RouterStats


class Block(nnx.Module):
    """Pre-norm transformer block: ``h += MLA(norm(h)); h += FFN(norm(h))`` (FFN dense or MoE)."""

    def __init__(self, cfg: ModelConfig, rt: Execution, moe: bool, rngs: nnx.Rngs,
                 ep: Optional[ExpertParallel] = None):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rt, rngs)
        self.attn = MLA(cfg, rt, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rt, rngs)
        self.mlp = MoE(cfg, rt, rngs, ep) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg, rt, rngs)
        self.is_moe = moe

    def __call__(self, h, cos, sin, segment_ids, valid, cache: Optional[LatentCache] = None, positions=None):
        a, cache = self.attn(self.attn_norm(h), cos, sin, segment_ids, cache=cache, positions=positions)
        h = h + a
        if self.is_moe:
            y, stats = self.mlp(self.mlp_norm(h), valid)
        else:
            y, stats = self.mlp(self.mlp_norm(h)), None
        return h + y, stats, cache


def _stacked_blocks(cfg: ModelConfig, rt: Execution, n: int, moe: bool, rngs: nnx.Rngs,
                    ep: Optional[ExpertParallel]) -> Block:
    """``n`` blocks with every variable stacked on a leading ``layers`` axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, rt, moe, r, ep)
    return make(rngs)


def _remat_policy(name: str):
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # docs/architecture.md §8 recomputes the RMSNorms and the MLA up-projections. Besides the layer input (the scan
    # carry), keep only the MLA down-projections (``checkpoint_name`` "mla_down", [T, q_lora + kv_lora
    # + rope] per layer). Everything else is recomputed: the MoE's exchange buffers and expert
    # activations (``save_anything`` kept them for every layer: terabytes per chip at 671B), and the
    # attention output, whose saving would not spare the flash forward (its backward needs q, k, v).
    return jax.checkpoint_policies.save_only_these_names("mla_down")


def run_stack(blocks: Block, h, cos, sin, segment_ids, valid, rt: Execution,
              cache: Optional[LatentCache] = None, positions=None, active=None):
    """Apply stacked ``blocks`` in sequence (a scan, or a Python loop with ``scan_layers=False``).
    Returns (final hidden, per-layer stats stacked, the stack's updated cache or None). ``active``
    (``[n]`` bool, optional): a layer whose flag is false is skipped (``lax.cond``: no FLOPs) and passes
    ``h`` through with zero stats — a pipeline stage's padding rows (docs/design.md §Pipeline)."""
    graphdef, state = nnx.split(blocks)

    def layer(carry, layer_state, layer_cache):
        return nnx.merge(graphdef, layer_state)(carry, cos, sin, segment_ids, valid, layer_cache, positions)

    def body(carry, xs):
        layer_state, layer_cache, on = xs
        if on is None:
            h, stats, layer_cache = layer(carry, layer_state, layer_cache)
        else:
            shapes = jax.eval_shape(layer, carry, layer_state, layer_cache)
            def skip(c, s, lc):
                return c, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[1]), lc
            h, stats, layer_cache = jax.lax.cond(on, layer, skip, carry, layer_state, layer_cache)
        return h, (stats, layer_cache)

    if rt.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(rt.remat), prevent_cse=not rt.scan_layers)
    if rt.scan_layers:
        h, (stats, cache) = jax.lax.scan(body, h, (state, cache, active))
        return h, stats, cache
    n = jax.tree.leaves(state)[0].shape[0]
    outs = []
    for i in range(n):
        h, out = body(h, jax.tree.map(lambda a: a[i], (state, cache, active)))
        outs.append(out)
    stats, cache = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return h, stats, cache


class MTPLayer(nnx.Module):
    """One MTP depth (docs/architecture.md §5): ``h' = W_eh [enorm(Emb(t_{i+k})) ; hnorm(h_i)]``, a full MoE block,
    its own final norm; the embedding and output head are the main model's."""

    def __init__(self, cfg: ModelConfig, rt: Execution, rngs: nnx.Rngs, ep: Optional[ExpertParallel] = None):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg, rt, rngs)
        self.hnorm = RMSNorm(D, cfg, rt, rngs)
        self.eh_proj = param(rngs, (2 * D, D), ("mtp_concat", "embed"), std=cfg.init_std, dtype=cfg.param_dtype)
        self.block = _stacked_blocks(cfg, rt, 1, cfg.num_moe_layers > 0, rngs, ep)
        self.norm = RMSNorm(D, cfg, rt, rngs)
        self.rt = rt

    def __call__(self, h, emb_next, cos, sin, segment_ids, valid, cache: Optional[LatentCache] = None,
                 positions=None):
        """Returns (hidden for the next depth, normed hidden for the head, router stats, cache)."""
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h)], axis=-1)  # embedding first
        x = x @ self.eh_proj[...].astype(dtype_of(self.rt.compute_dtype))
        x, stats, cache = run_stack(self.block, x, cos, sin, segment_ids, valid, self.rt, cache, positions)
        return x, self.norm(x), stats, cache


class ModelCache(NamedTuple):
    """The model's latent cache: one ``LatentCache`` per stack (``[n_layers, B, T, ·]``) and one per
    MTP depth (``n_layers = 1``). Made by ``DeepSeekV3.init_cache``."""
    dense: Optional[LatentCache]
    moe: Optional[LatentCache]
    mtp: tuple

    def bytes_per_token(self, include_mtp: bool = False) -> int:
        """Bytes one token occupies in the cache (all layers of the main model, optionally MTP)."""
        stacks = [c for c in (self.dense, self.moe) if c is not None] + (list(self.mtp) if include_mtp else [])
        return sum(c.ckv.shape[0] * (c.ckv.shape[-1] + c.krope.shape[-1]) * c.ckv.dtype.itemsize for c in stacks)


# The latent cache's default dtype (what ``dsv3 info`` counts): bf16 halves the bytes every decode step
# reads; attention over it accumulates in fp32 (docs/design.md §Latent cache dtype).
CACHE_DTYPE = "bfloat16"


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=CACHE_DTYPE, mtp: bool = True) -> ModelCache:
    """An empty latent cache for ``batch`` sequences of up to ``max_len`` tokens, in ``dtype``."""
    def stack(n):
        if n == 0:
            return None
        return LatentCache(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                           jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))
    return ModelCache(stack(cfg.first_k_dense), stack(cfg.num_moe_layers),
                      tuple(stack(1) for _ in range(cfg.num_mtp_layers if mtp else 0)))


class ModelOutput(NamedTuple):
    logits: jax.Array                    # [B, S, V] fp32
    mtp_logits: Optional[jax.Array]      # [Dmtp, B, S, V] fp32; depth k predicts t_{i+1+k}
    router: Optional[RouterStats]        # stacked over MoE layers: counts [Lm, E], ...
    mtp_router: Optional[RouterStats]    # stacked over MTP depths
    hidden: jax.Array                    # [B, S, D] main model final hidden state, after final norm
    cache: Optional[ModelCache] = None   # the updated cache when one was passed in


def check_tokens(tokens: Any, vocab_size: int, what: str = "tokens", allow_missing: bool = False,
                 ndim: Optional[int] = None) -> None:
    """Raise when ``tokens`` is not an integer array (of rank ``ndim``, if given: 2 = ``[batch, seq]``),
    or when concrete ids are outside ``[0, vocab_size)`` (``-1`` allowed with ``allow_missing``: "no
    token"). JAX gathers clamp out-of-range indices silently, so this check is the only thing between
    a bad id and a wrong answer. Rank and dtype are checked under ``jit`` too (they are static)."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or dtype is None:
        raise TokenRangeError(f"{what} must be an array of integer token ids, got a {type(tokens).__name__} "
                              "(fix: pass jnp.asarray(ids, jnp.int32)" + (", shape [batch, seq])." if ndim == 2 else ")."))
    if ndim is not None and len(shape) != ndim:
        layout = "[batch, seq]" if ndim == 2 else f"rank {ndim}"
        fix = "add a batch axis: tokens[None]" if ndim == 2 and len(shape) == 1 else f"pass a {layout} array"
        raise TokenRangeError(f"{what} must be {layout} (rank {ndim}), got shape {tuple(shape)} (fix: {fix}).")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TokenRangeError(f"{what} must be integer token ids, got dtype {dtype} (fix: cast to int32).")
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    lo_ok = -1 if allow_missing else 0
    lo, hi = int(arr.min()), int(arr.max())
    if lo < lo_ok or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        pos = tuple(int(i) for i in np.argwhere(arr == bad)[0])
        raise TokenRangeError(
            f"{what} contain id {bad} at index {pos}, outside the vocabulary [0, {vocab_size}) "
            f"(fix: use the model's own tokenizer, or a config whose vocab_size covers your ids).")


class DeepSeekV3(nnx.Module):
    """DeepSeek-V3 (and V2-family via config flags). Call with ``tokens: [B, S]`` int32.

    ``runtime`` says how it runs (kernels, compute dtype, remat, FP8, expert-parallel strategy);
    ``mesh``: build the MoE layers expert-parallel on it, with the batch laid out by ``rules``."""

    STACKS = ("dense_layers", "moe_layers")   # the scanned block stacks, in order
    MTP = "mtp"                               # the list of MTP depths

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Optional[RuntimeConfig] = None,
                 mesh: Optional[Mesh] = None, rules: Rules = DEFAULT_RULES):
        rt = execution(cfg, runtime, mesh, rules)
        # runtime: as asked (``auto`` kernels stay ``auto``, so with_runtime can rebuild for another platform);
        # ex: resolved for this config and mesh, what every layer reads
        self.cfg, self.runtime, self.ex, self.mesh, self.rules = cfg, runtime or RuntimeConfig(), rt, mesh, rules
        ep = None
        if mesh is not None and mesh.size > 1 and cfg.num_moe_layers:  # one device: every expert is local
            ep = ExpertParallel.create(mesh, rt.ep_strategy, cfg.n_routed_experts, rules,
                                       capacity_factor=rt.capacity_factor, emulate_ragged=rt.emulate_ragged,
                                       dispatch_fp8=rt.quant == "fp8")
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           std=cfg.init_std, dtype=cfg.param_dtype)
        self.dense_layers = _stacked_blocks(cfg, rt, cfg.first_k_dense, False, rngs, None) if cfg.first_k_dense else None
        self.moe_layers = _stacked_blocks(cfg, rt, cfg.num_moe_layers, True, rngs, ep) if cfg.num_moe_layers else None
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rt, rngs)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                             std=cfg.init_std, dtype=cfg.param_dtype)
        self.mtp = nnx.List([MTPLayer(cfg, rt, rngs, ep) for _ in range(cfg.num_mtp_layers)])

    def init_cache(self, batch: int, max_len: int, dtype=CACHE_DTYPE, mtp: bool = True) -> ModelCache:
        return init_cache(self.cfg, batch, max_len, dtype, mtp)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Embeddings in the compute dtype; id ``-1`` ("no token") embeds to zeros."""
        # on a mesh, looked up per shard with one explicit exchange (sharding/embedding.py): left to XLA the
        # batch-sharded activation was replicated and re-partitioned to the table's layout
        emb = lookup(self.embed[...].astype(dtype_of(self.ex.compute_dtype)), jnp.maximum(tokens, 0),
                     self.ex.mesh, self.ex.rules)
        return jnp.where((tokens >= 0)[..., None], emb, 0)

    def head(self, h: jax.Array) -> jax.Array:
        # The output head is kept out of FP8 (docs/architecture.md §6): a GEMM in the compute dtype with fp32 logits.
        # (An fp32 GEMM under bf16 compute gathered the [D, V] head in fp32 on every chip and made an
        # fp32 [D, V] weight gradient before the reduce-scatter: 7 GiB per chip at 671B.)
        cdt = dtype_of(self.ex.compute_dtype)
        return jnp.dot(h.astype(cdt), self.lm_head[...].astype(cdt), preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, mtp: bool = True,
                 cache: Optional[ModelCache] = None) -> ModelOutput:
        """``tokens, segment_ids, positions: [B, S]``. ``segment_ids`` > 0 marks documents of a packed
        row (0 = padding, excluded from router statistics); attention never crosses segments.
        ``positions`` default to ``0..S-1``; for packed rows pass per-document positions.

        With a ``cache``: the tokens are written into it and the output carries the updated cache.
        Without ``positions`` they are a prompt starting at 0 (flash prefill); with ``positions`` they
        are new tokens at those cache positions, attending to everything cached before them (decode).
        The MTP module needs the token after each position, unknown while generating, so with a
        cache it runs only through ``mtp_forward``."""
        cfg = self.cfg
        check_tokens(tokens, cfg.vocab_size, ndim=2)
        B, S = tokens.shape
        cache_positions = positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        valid = None if segment_ids is None else segment_ids > 0
        cos, sin = rope_angles(cfg, positions)
        h = self.embed_tokens(tokens)
        stats = dense_c = moe_c = None
        if self.dense_layers is not None:
            h, _, dense_c = run_stack(self.dense_layers, h, cos, sin, segment_ids, valid, self.ex,
                                      None if cache is None else cache.dense, cache_positions)
        if self.moe_layers is not None:
            h, stats, moe_c = run_stack(self.moe_layers, h, cos, sin, segment_ids, valid, self.ex,
                                        None if cache is None else cache.moe, cache_positions)
        h = self.final_norm(h)
        logits = self.head(h)
        mtp_logits = mtp_stats = None
        if cache is not None:
            return ModelOutput(logits, None, stats, None, h, cache._replace(dense=dense_c, moe=moe_c))
        if mtp and len(self.mtp):
            # depth k at position i sees t_{i+k}; beyond the row there is no token (-1: zero embedding,
            # as the serving engines do at the sequence boundary); the loss masks those positions.
            nxt = jnp.stack([jnp.pad(tokens[:, k:], ((0, 0), (0, k)), constant_values=-1)
                             for k in range(1, len(self.mtp) + 1)])
            mtp_logits, mtp_stats, _ = self.mtp_forward(h, nxt, positions=positions, segment_ids=segment_ids)
        return ModelOutput(logits, mtp_logits, stats, mtp_stats, h)

    def mtp_forward(self, hidden: jax.Array, next_tokens: jax.Array, *, positions: Optional[jax.Array] = None,
                    segment_ids: Optional[jax.Array] = None, cache: Optional[ModelCache] = None):
        """The first ``n = next_tokens.shape[0]`` MTP depths (docs/architecture.md §5). ``hidden [B, S, D]``: the main
        model's final-normed hidden state; ``next_tokens [n, B, S]``: at depth k, token ``t_{i+k}`` for
        position i (``-1``: none). Depth k combines the previous depth's hidden state with that
        token's embedding and predicts ``t_{i+k+1}``. ``positions``/``cache`` as in ``__call__``.
        Returns (logits ``[n, B, S, V]`` fp32, router stats stacked over depths, updated cache)."""
        check_tokens(next_tokens, self.cfg.vocab_size, "next_tokens", allow_missing=True)
        B, S = hidden.shape[:2]
        cache_positions = positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        cos, sin = rope_angles(self.cfg, positions)
        valid = None if segment_ids is None else segment_ids > 0
        logits, stats, caches = [], [], list(cache.mtp) if cache is not None else None
        h = hidden
        for k in range(next_tokens.shape[0]):
            layer_cache = None if caches is None else caches[k]
            h, normed, s, layer_cache = self.mtp[k](h, self.embed_tokens(next_tokens[k]), cos, sin, segment_ids,
                                                    valid, layer_cache, cache_positions)
            if caches is not None:
                caches[k] = layer_cache
            logits.append(self.head(normed))
            stats.append(s)
        stacked = None if stats[0] is None else jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
        new_cache = None if cache is None else cache._replace(mtp=tuple(caches))
        return jnp.stack(logits), stacked, new_cache

    def with_runtime(self, runtime: Optional[RuntimeConfig] = None, *, mesh: Optional[Mesh] = None,
                     rules: Optional[Rules] = None) -> "DeepSeekV3":
        """The same weights, run another way: another ``RuntimeConfig`` and/or built for ``mesh``
        (expert-parallel). The variables are shared with ``self``, not copied."""
        rules = rules or self.rules
        new = nnx.eval_shape(lambda: DeepSeekV3(self.cfg, rngs=nnx.Rngs(0), runtime=runtime or self.runtime,
                                                mesh=mesh, rules=rules))
        nnx.update(new, nnx.state(self))
        return new
