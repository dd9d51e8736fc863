"""The pipelined gradient: a schedule's tick table executed inside one jitted step (docs/design.md §Pipeline).

``make_pipeline_grad_fn`` returns a drop-in for the step's ``value_and_grad`` (``train.step``): the
same ``(total, aux), grads`` from the same ``(params, bias, rest, batch, denoms, poison)``, computed by
``PP`` stage groups that each hold their MoE layers (``L/PP``, or an uneven split's ``lmax`` rows with
padding: then the stack leaves come and go in the staged layout, ``pipeline.partition.StageMap``).
Inside a ``shard_map`` manual over the ``stage`` axis only (the other axes stay with the compiler, and the MoE's expert-parallel
``shard_map`` nests inside it), a ``lax.scan`` walks the ticks; at each tick every device takes the
branch (``lax.switch``) of its own item:

* ``F``: run the stage forward on the stashed input (stage 0: on the micro-batch's tokens), keep the
  loss terms and router counts, send the output to the next stage;
* ``B``: recompute the stage forward from the stashed input and pull the stashed output gradient
  back through it (``jax.vjp``): weight gradients are accumulated, the input gradient is sent to the
  previous stage; ``I``/``W`` are its input-gradient and weight-gradient halves;

then the outputs move one stage on (``lax.ppermute``) into the slots the tables assign
(``pipeline.tables``). The devices of one stage group take the same branch at the same tick, so the
collectives inside a stage (expert all-to-all, tensor/fsdp reductions) pair the right devices.
DualPipe's reverse pipeline (chunk 1) runs stage ``PP-1-d`` on device ``d``: its parameters are the
stage-split stack reversed (a second copy), its gradients are reversed back and added.

Parameters outside the MoE stack (embedding, dense layers, final norm, head, MTP) are replicated
over ``stage``; each device accumulates the gradient of what it ran, summed over ``stage`` at the end.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import ModelConfig, RuntimeConfig
from ..model.layers import dtype_of
from .config import TrainConfig
from ..pipeline.config import PipelineConfig
from ..pipeline.simulate import simulate
from .pipeline_stage import STACK, join, make_stage_fn, split_paths
from ..pipeline.tables import OPS, TickTables, build_tables


def schedule_tables(p: PipelineConfig, pp: int) -> TickTables:
    """The tick tables of ``p``'s schedule on ``pp`` stages (unit time per item)."""
    return build_tables(simulate(p.schedule, pp=pp, microbatches=p.microbatches, f=1, b=1, w=1, fb=1).ticks(), pp)


def _split_stage(x, pp: int):
    return x.reshape(pp, x.shape[0] // pp, *x.shape[1:])


def _without_stage(spec) -> tuple:
    """A partition spec's entries with the (manual) ``stage`` axis taken out."""
    def drop(ax):
        if isinstance(ax, tuple):
            ax = tuple(a for a in ax if a != "stage")
            return ax if len(ax) > 1 else (ax[0] if ax else None)
        return None if ax == "stage" else ax
    return tuple(drop(ax) for ax in spec)


def make_pipeline_grad_fn(graphdef, cfg: ModelConfig, runtime: RuntimeConfig, t: TrainConfig, p: PipelineConfig,
                          mesh: Mesh, param_shardings=None) -> Callable:
    """``grad_fn(params, bias, rest, batch, denoms, poison) -> ((total, aux), grads)`` like
    ``jax.value_and_grad(loss_fn, has_aux=True)`` of ``train.step``; ``aux`` also holds, measured on each
    device as the step runs, ``"activations"``: the peak in-flight micro-batches ``[PP]``, and
    ``"busy_ticks"``: the ticks it had work in (of ``schedule_tables(p, PP).n_ticks``).

    ``param_shardings``: the parameters' (staged) shardings. The gradient accumulators inside the stage
    ``shard_map`` are held in them (over the axes other than ``stage``); left to the compiler they came out
    replicated: the 671B on ``stage=4,expert=64`` kept each stage's attention output projections' gradient
    whole, 7 GiB per chip (docs/pipeline.md §What the compiler allocates)."""
    pp = mesh.shape["stage"]
    tables = schedule_tables(p, pp)
    C, M = tables.chunks, p.microbatches
    # the layers of each stage (pipeline/partition.py); an uneven split takes the stack in its staged
    # layout, PP x lmax rows with padding rows skipped (docs/design.md §Pipeline)
    smap = p.stage_map() if p.layers_per_stage else None
    uneven = smap is not None and not smap.even
    stage_fn = make_stage_fn(graphdef, cfg, t, pp, smap)
    cdt = dtype_of(runtime.compute_dtype or cfg.param_dtype)
    n_mtp = cfg.num_mtp_layers if max(t.mtp_weight, t.mtp_weight_final) > 0 else 0
    fwd_perm = [[(i, i + 1) for i in range(pp - 1)], [(i + 1, i) for i in range(pp - 1)]]
    bwd_perm = [[(i + 1, i) for i in range(pp - 1)], [(i, i + 1) for i in range(pp - 1)]]
    tab = {k: jnp.asarray(getattr(tables, k)) for k in ("kind", "chunk", "mb", "x_slot", "g_slot", "recv_x", "recv_g")}
    # per gradient leaf, its spec inside the shard_map (None: left to the compiler): a stage leaf's gradient
    # is [L/PP, ...] there (its accumulator [C, L/PP, ...]), a shared leaf's is the parameter's shape
    n_specs = st_specs = sh_specs = None
    if param_shardings is not None:
        flags, _, shs = split_paths(param_shardings)
        specs = [_without_stage(sh.spec) if isinstance(sh, NamedSharding) else None for sh in shs]
        n_specs = len(specs)
        st_specs = [None if sp is None else (None,) + sp[1:] for sp, f in zip(specs, flags) if f]
        sh_specs = [sp for sp, f in zip(specs, flags) if not f]

    def grad_fn(params, bias, rest, batch, denoms, poison):
        trees = {"params": params, "bias": bias, "rest": rest}
        parts = {k: split_paths(v) for k, v in trees.items()}   # (is_stage, treedef, leaves)
        if n_specs is not None and n_specs != len(parts["params"][2]):
            raise ValueError(f"param_shardings has {n_specs} leaves, the parameters {len(parts['params'][2])}: "
                             "pass the shardings of these parameters (train_program's staged 'params').")
        stage_in, shared_in = {}, {}
        for k, (is_stage, _, leaves) in parts.items():
            st = [_split_stage(x, pp) for x, s in zip(leaves, is_stage) if s]
            # chunk c's copy: row d holds the slice of stage stage_of(c, d) (chunk 1: the stack reversed)
            stage_in[k] = [st] + ([[x[::-1] for x in st]] if C == 2 else [])
            shared_in[k] = [x for x, s in zip(leaves, is_stage) if not s]
        B, S = batch["inputs"].shape
        # micro-batch j = rows j, j+M, ... (as train.step's accumulation): the sharded batch dim stays put
        micro = jax.tree.map(lambda x: x.reshape(B // M, M, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(stage_in, shared_in, micro, denoms, poison, tab):
            d = jax.lax.axis_index("stage")
            # chunk c's stage leaves, stacked over chunks: [C, L/PP, ...]
            local = {k: [jnp.stack([v[c][i][0] for c in range(C)]) for i in range(len(v[0]))]
                     for k, v in stage_in.items()}

            def run(c, sp, shp, x, m):
                """Chunk c's stage on micro-batch m with stage params ``sp`` and shared params ``shp``."""
                tr = {k: join(treedef, is_stage, sp if k == "params" else [a[c] for a in local[k]],
                              shp if k == "params" else shared_in[k])
                      for k, (is_stage, treedef, _) in parts.items()}
                mb = jax.tree.map(lambda a: a[m], micro)
                return stage_fn(tr["params"], tr["bias"], tr["rest"], x, mb, denoms,
                                jnp.where(c == 0, d, pp - 1 - d), poison)

            def held(leaves, specs, lead=0):
                """``leaves`` constrained to ``specs`` (with ``lead`` unsharded leading dims)."""
                if specs is None:
                    return leaves
                am = jax.sharding.get_abstract_mesh()
                return [x if sp is None else jax.lax.with_sharding_constraint(x, NamedSharding(am, P(*((None,) * lead + sp))))
                        for x, sp in zip(leaves, specs)]

            x_shape = (B // M, S, cfg.hidden_size)
            zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
            aux0 = jax.eval_shape(lambda: run(0, [a[0] for a in local["params"]], shared_in["params"],
                                              jnp.zeros(x_shape, cdt), 0)[1])
            carry = {
                "xs": jnp.zeros((C, max(tables.n_x) or 1) + x_shape, cdt),   # stage inputs waiting
                "gs": jnp.zeros((C, max(tables.n_g) or 1) + x_shape, cdt),   # output gradients waiting
                "out_x": jnp.zeros((C,) + x_shape, cdt),                      # this tick's messages
                "out_g": jnp.zeros((C,) + x_shape, cdt),
                "gst": held(zeros(local["params"]), st_specs, 1), "gsh": held(zeros(shared_in["params"]), sh_specs),
                "aux": jax.tree.map(lambda s: jnp.zeros((C,) + s.shape, s.dtype), aux0),
                "live": jnp.zeros((), jnp.int32), "peak": jnp.zeros((), jnp.int32),
                "busy": jnp.zeros((), jnp.int32),                              # ticks with work
            }

            def operands(carry, op):
                c, m = op["chunk"], op["mb"]
                x = carry["xs"][c, jnp.minimum(op["x_slot"], carry["xs"].shape[1] - 1)]
                g = carry["gs"][c, jnp.minimum(op["g_slot"], carry["gs"].shape[1] - 1)]
                last = jnp.where(c == 0, d, pp - 1 - d) == pp - 1
                g = jnp.where(last, jnp.zeros_like(g), g)       # the last stage's output feeds only the loss
                return c, m, x, (g, jnp.ones((), jnp.float32)), [a[c] for a in local["params"]], shared_in["params"]

            def accumulate(carry, c, dsp, dshp):   # weight gradients into the chunk's accumulators
                gst = [a.at[c].add(v) for a, v in zip(carry["gst"], held(dsp, st_specs))]
                gsh = [a + v for a, v in zip(carry["gsh"], held(dshp, sh_specs))]
                return dict(carry, gst=held(gst, st_specs, 1), gsh=held(gsh, sh_specs))

            def add_at(tree, c, value):
                return jax.tree.map(lambda a, v: a.at[c].add(v), tree, value)

            def op_none(carry, op):
                return carry

            def op_f(carry, op):
                c, m, x, _, sp, shp = operands(carry, op)
                (h, _), aux = run(c, sp, shp, x, m)
                live = carry["live"] + 1
                return dict(carry, aux=add_at(carry["aux"], c, aux), live=live, peak=jnp.maximum(carry["peak"], live),
                            out_x=carry["out_x"].at[c].set(h.astype(cdt)))

            def op_b(carry, op):        # full backward: weight gradients and the input gradient
                c, m, x, cot, sp, shp = operands(carry, op)
                dsp, dshp, dx = jax.vjp(lambda sp, shp, x: run(c, sp, shp, x, m)[0], sp, shp, x)[1](cot)
                return dict(accumulate(carry, c, dsp, dshp), live=carry["live"] - 1,
                            out_g=carry["out_g"].at[c].set(dx.astype(cdt)))

            def op_i(carry, op):        # input-gradient half: on the critical path
                c, m, x, cot, sp, shp = operands(carry, op)
                dx = jax.vjp(lambda x: run(c, sp, shp, x, m)[0], x)[1](cot)[0]
                return dict(carry, out_g=carry["out_g"].at[c].set(dx.astype(cdt)))

            def op_w(carry, op):        # weight-gradient half: fills bubbles; frees the stash entry
                c, m, x, cot, sp, shp = operands(carry, op)
                dsp, dshp = jax.vjp(lambda sp, shp: run(c, sp, shp, x, m)[0], sp, shp)[1](cot)
                return dict(accumulate(carry, c, dsp, dshp), live=carry["live"] - 1)

            # one branch per op kind the schedule uses, each traced once (chunk and micro-batch are data)
            used = sorted({OPS.index(k) for cb in tables.combos for k, _ in cb} | {0})
            impl = {0: op_none, 1: op_f, 2: op_b, 3: op_i, 4: op_w}
            branch_of = np.zeros(len(OPS), np.int32)
            branch_of[used] = np.arange(len(used))
            branch_of = jnp.asarray(branch_of)
            branches = [impl[k] for k in used]
            width = max(len(cb) for cb in tables.combos)      # ops per item: 2 with DualPipe's pairs

            def one_op(carry, op):
                return jax.lax.switch(branch_of[op["kind"]], branches, carry, op), None

            def tick(carry, row):
                row = jax.tree.map(lambda a: a[d], row)        # this device's item
                ops = {k: row[k][:width] for k in ("kind", "chunk", "mb", "x_slot", "g_slot")}
                carry, _ = jax.lax.scan(one_op, carry, ops)
                xs, gs = carry["xs"], carry["gs"]
                for c in range(C):
                    if tables.n_x[c]:
                        got = jax.lax.ppermute(carry["out_x"][c], "stage", fwd_perm[c])
                        xs = xs.at[c, row["recv_x"][c]].set(got, mode="drop")
                    if tables.n_g[c]:
                        got = jax.lax.ppermute(carry["out_g"][c], "stage", bwd_perm[c])
                        gs = gs.at[c, row["recv_g"][c]].set(got, mode="drop")
                return dict(carry, xs=xs, gs=gs, busy=carry["busy"] + (row["kind"][0] > 0)), None

            carry, _ = jax.lax.scan(tick, carry, tab)
            gsh = jax.lax.psum(carry["gsh"], "stage")
            aux = carry["aux"]
            terms = jax.lax.psum((aux.ce.sum(), aux.mtp.sum(), aux.balance.sum()), "stage")
            mtp_counts = None if n_mtp == 0 else jax.lax.psum(aux.mtp_counts.sum(0), "stage")
            return ([g[:, None] for g in carry["gst"]], gsh, terms, aux.counts[:, None], mtp_counts,
                    jnp.stack([carry["peak"], carry["busy"]])[None])

        rep = P()
        stage_specs = jax.tree.map(lambda _: P("stage"), stage_in)
        shared_specs = jax.tree.map(lambda _: rep, shared_in)
        n_st = len(stage_in["params"][0])
        out_specs = ([P(None, "stage")] * n_st, [rep] * len(shared_in["params"]), rep, P(None, "stage"),
                     None if n_mtp == 0 else rep, P("stage", None))
        fn = jax.shard_map(body, mesh=mesh, axis_names={"stage"}, check_vma=False,
                           in_specs=(stage_specs, shared_specs, jax.tree.map(lambda _: rep, micro),
                                     jax.tree.map(lambda _: rep, denoms), rep, jax.tree.map(lambda _: rep, tab)),
                           out_specs=out_specs)
        gst, gsh, terms, counts, mtp_counts, measured = fn(stage_in, shared_in, micro, denoms, poison, tab)
        # [C, PP, L/PP, ...]: chunk 1 ran the stack reversed; reverse its rows back, then add the chunks
        unrev = lambda a: a[0] if C == 1 else a[0] + a[1][::-1]  # noqa: E731
        g_stage = [unrev(g).reshape(-1, *g.shape[3:]) for g in gst]
        is_stage, treedef, _ = parts["params"]
        grads = join(treedef, is_stage, g_stage, gsh)
        ce, mtp, balance = terms
        use_bal = t.balance != "none" and t.balance_alpha > 0
        total = (ce + denoms.get("mtp_weight", t.mtp_weight) * mtp + (t.balance_alpha * balance if use_bal else 0.0)) * (1.0 + poison)
        cnt = unrev(counts)
        cnt = cnt.reshape(-1, cnt.shape[-1])
        aux = {"ce": ce, "mtp": mtp, "balance": balance, "counts": cnt[smap.rows] if uneven else cnt,
               "mtp_counts": mtp_counts, "activations": measured[:, 0], "busy_ticks": measured[:, 1]}
        if uneven:     # the bias update's counts, row for row with the staged bias (padding rows: zero)
            aux["stack_counts"] = cnt
        return (total, aux), grads
    return grad_fn


def stage_layout(shardings, mesh: Mesh):
    """``shardings`` (a tree of ``NamedSharding``) with the MoE stack's leading ``layers`` dim split over
    ``stage``: each stage group keeps only its ``L/PP`` layers (and their optimizer moments). The
    arrays stay those of the unsplit model, so checkpoints do not depend on the stage count."""
    pp = mesh.shape.get("stage", 1)

    def one(path, sh):
        if pp == 1 or not isinstance(sh, NamedSharding) or not any(getattr(k, "key", None) == STACK for k in path):
            return sh
        spec = tuple(sh.spec)
        if not spec or spec[0] is not None:
            return sh
        return NamedSharding(mesh, P("stage", *spec[1:]))
    return jax.tree_util.tree_map_with_path(one, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


__all__ = ["make_pipeline_grad_fn", "schedule_tables", "stage_layout"]
