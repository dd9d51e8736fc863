"""One pipeline stage of DeepSeek-V3 as a pure function (docs/design.md §Pipeline).

The MoE stack is cut into ``PP`` contiguous slices (``pipeline.partition.StageMap``: ``L/PP`` layers
each, or a cost-balanced uneven split stored padded to ``lmax`` rows per stage); stage ``s`` runs slice
``s``. The first stage also runs the embedding and the dense layers, the last one the final
norm, the head, the MTP depths (sharing the embedding and head, which every stage holds) and the loss.
Every stage adds the balance loss of its own MoE layers. All loss terms are sums divided by the global
batch's denominators (``train.step.denominators``), so summing them over micro-batches and stages
gives the unpipelined step's loss exactly.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..model import DeepSeekV3
from ..model.rope import rope_angles
from ..model.transformer import run_stack
from ..pipeline.partition import StageMap
from .config import TrainConfig
from .losses import balance_loss_terms, mtp_targets, token_ce_sum

STACK = DeepSeekV3.STACKS[1]  # the stack split over stages


class StageAux(NamedTuple):
    """What a stage's forward reports besides its output: loss terms (already divided by the global
    denominators; zero where the stage does not compute them) and router counts."""
    ce: jax.Array
    mtp: jax.Array
    balance: jax.Array
    counts: Any            # [lmax, E] of the stage's MoE rows (zeros on padding rows), or None
    mtp_counts: Any        # [n_mtp, E] on the last stage (zeros elsewhere), or None


def split_paths(tree) -> tuple[list[bool], Any, list]:
    """Leaves of a model state and, per leaf, whether it belongs to the stage-split MoE stack."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    is_stage = [getattr(p[0], "key", None) == STACK for p, _ in leaves]
    return is_stage, treedef, [x for _, x in leaves]


def join(treedef, is_stage: list[bool], stage_leaves: list, shared_leaves: list):
    """Inverse of ``split_paths`` given the two lists of leaves in order."""
    it_s, it_r = iter(stage_leaves), iter(shared_leaves)
    return jax.tree_util.tree_unflatten(treedef, [next(it_s) if s else next(it_r) for s in is_stage])


def make_stage_fn(graphdef, cfg: ModelConfig, t: TrainConfig, pp: int, smap: Optional[StageMap] = None) -> Callable:
    """``fn(params, bias, rest, x_in, mb, denoms, stage) -> ((x_out, loss), StageAux)``.

    ``params/bias/rest``: model states whose MoE-stack leaves hold this stage's ``lmax`` rows;
    ``x_in [b, S, D]``: the previous stage's output (ignored on stage 0, which embeds ``mb["inputs"]``);
    ``stage``: a traced int. ``loss`` is this stage's share of the differentiated objective. With an
    uneven ``smap`` the stage's padding rows (``smap.active[stage]`` false) are skipped: identity, zero
    router stats, zero gradient."""
    n_mtp = cfg.num_mtp_layers if max(t.mtp_weight, t.mtp_weight_final) > 0 else 0
    use_bal = t.balance != "none" and t.balance_alpha > 0
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    active_table = None if smap is None or smap.even else jnp.asarray(smap.active)

    def fn(params, bias, rest, x_in, mb, denoms, stage, poison):
        model = nnx.merge(graphdef, params, bias, rest)
        tokens, seg, pos = mb["inputs"], mb["segment_ids"], mb["positions"]
        valid = seg > 0
        cos, sin = rope_angles(cfg, pos)

        def embed():
            h = model.embed_tokens(tokens)
            if model.dense_layers is not None:
                h, _, _ = run_stack(model.dense_layers, h, cos, sin, seg, valid, model.ex)
            return h.astype(x_in.dtype)

        h = jax.lax.cond(stage == 0, embed, lambda: x_in)
        active = None if active_table is None else active_table[stage]
        h, stats, _ = run_stack(model.moe_layers, h, cos, sin, seg, valid, model.ex, active=active)
        bal = balance_loss_terms(stats, E, K)[0] / denoms["seqs"]

        def head():
            hn = model.final_norm(h)
            ce = token_ce_sum(model.head(hn), mb["targets"], mb["loss_mask"])[0] / denoms["tokens"]
            mtp = jnp.zeros((), jnp.float32)
            bal_mtp = jnp.zeros((), jnp.float32)
            counts = jnp.zeros((n_mtp, E), jnp.float32)
            if n_mtp:
                nxt = jnp.stack([jnp.pad(tokens[:, k:], ((0, 0), (0, k)), constant_values=-1)
                                 for k in range(1, n_mtp + 1)])
                logits, mstats, _ = model.mtp_forward(hn, nxt, positions=pos, segment_ids=seg)
                for k in range(n_mtp):
                    tgt, m = mtp_targets(mb["targets"], mb["loss_mask"], k + 1)
                    mtp = mtp + token_ce_sum(logits[k], tgt, m)[0] / denoms["mtp"][k] / n_mtp
                bal_mtp = balance_loss_terms(mstats, E, K)[0] / denoms["seqs"]
                counts = mstats.counts.astype(jnp.float32)
            return ce, mtp, bal_mtp, counts

        def no_head():
            z = jnp.zeros((), jnp.float32)
            return z, z, z, jnp.zeros((n_mtp, E), jnp.float32)

        ce, mtp, bal_mtp, mtp_counts = jax.lax.cond(stage == pp - 1, head, no_head)
        balance = bal + bal_mtp
        loss = ce + denoms.get("mtp_weight", t.mtp_weight) * mtp + (t.balance_alpha * balance if use_bal else 0.0)
        aux = StageAux(ce, mtp, balance, stats.counts.astype(jnp.float32), mtp_counts if n_mtp else None)
        return (h, loss * (1.0 + poison)), aux
    return fn


__all__ = ["make_stage_fn", "split_paths", "join", "StageAux", "STACK"]
