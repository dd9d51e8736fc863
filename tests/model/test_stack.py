"""The layer stack is stored stacked and run with ``lax.scan`` (docs/design.md §Scan the stack).

* every variable under ``dense_layers`` / ``moe_layers`` has a leading ``layers`` axis of the stack's depth;
* the forward's jaxpr has the same number of equations at 4 and 12 layers: program size (and so compile
  time) does not grow with depth;
* ``scan_layers=False`` (a Python loop over the same stacked weights) gives the scanned model's logits;
* every ``remat`` policy gives the same gradients as no remat.

Tolerance 1e-5 (fp32 compute): the variants run the same fp32 ops on the same values; only XLA's
fusion choices and summation order may differ (observed ≤ 1e-9). The model is built abstractly
(``nnx.eval_shape``) and filled with numpy random weights: eager initialisation would cost more than
the checks themselves.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dsv3_jax as dsv3

TOL = 1e-5
# These tests compare programs, not speed: LLVM optimisation level 0 halves XLA:CPU compile time (the
# bulk of these tests' cost) and leaves fp32 arithmetic IEEE (XLA:CPU fast-math is off either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny(**overrides) -> dsv3.ModelConfig:
    return dsv3.load_config("tiny", overrides=overrides)  # float32 parameters, so float32 compute


def abstract(cfg: dsv3.ModelConfig, *filters, runtime: dsv3.RuntimeConfig | None = None):
    """``nnx.split(model, *filters)`` of the model with ShapeDtypeStruct leaves — nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime)), *filters)


def random_state(state, seed: int = 0):
    """Concrete weights for an abstract state: norm scales near 1, other weights N(0, 0.05²)."""
    rng = np.random.RandomState(seed)

    def fill(path, x):
        is_scale = any(getattr(k, "key", None) == "scale" for k in path)
        value = 1.0 + 0.1 * rng.randn(*x.shape) if is_scale else 0.05 * rng.randn(*x.shape)
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, state)


def tokens(cfg, batch=2, seq=16, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, seq)), jnp.int32)


# ---------------------------------------------------------------------------------------------
def test_stacked_variables_have_leading_layer_axis():
    cfg = tiny(num_layers=6, first_k_dense=2)  # 2 dense + 4 MoE: distinct depths catch a mix-up
    _, state = abstract(cfg)
    depth = {"dense_layers": cfg.first_k_dense, "moe_layers": cfg.num_moe_layers}
    seen = {k: 0 for k in depth}
    for path, var in nnx.to_flat_state(state):
        if path[0] not in depth:
            continue
        seen[path[0]] += 1
        name = "/".join(map(str, path))
        assert var.shape[0] == depth[path[0]], f"{name}: shape {var.shape}, want leading axis {depth[path[0]]}"
        assert var.get_metadata()["out_sharding"][0] == "layers", f"{name}: leading axis not named 'layers'"
    assert seen["dense_layers"] and seen["moe_layers"]


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and, recursively, of its sub-jaxprs (scan bodies, remat, pjit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def _forward_jaxpr(cfg, runtime=None):
    graphdef, state = abstract(cfg, runtime=runtime)

    def forward(state, tokens):  # the functional forward: pure in (state, tokens)
        return nnx.merge(graphdef, state)(tokens).logits

    return jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((2, 16), jnp.int32)).jaxpr


def _forward_eqns(cfg, runtime=None) -> int:
    return sum(1 for _ in _eqns(_forward_jaxpr(cfg, runtime)))


def test_program_size_does_not_grow_with_depth():
    shallow = _forward_eqns(tiny(num_layers=4, first_k_dense=1))
    deep = _forward_eqns(tiny(num_layers=12, first_k_dense=1))
    assert deep == shallow, f"jaxpr equations: {shallow} at 4 layers, {deep} at 12 — the stack is unrolled"
    # The count is sensitive to unrolling: the Python loop over 3 MoE layers makes a bigger program.
    unrolled = _forward_eqns(tiny(num_layers=4, first_k_dense=1), dsv3.RuntimeConfig(scan_layers=False))
    assert unrolled > shallow


def test_unrolled_stack_matches_scan():
    cfg = tiny(num_layers=4, first_k_dense=1)
    graphdef, state = abstract(cfg)
    graphdef_loop, state_loop = abstract(cfg, runtime=dsv3.RuntimeConfig(scan_layers=False))
    assert jax.tree.structure(state) == jax.tree.structure(state_loop)
    weights = random_state(state, seed=1)
    toks = tokens(cfg)

    @jax.jit(compiler_options=FAST_COMPILE)
    def both(weights, toks):
        a = nnx.merge(graphdef, weights)(toks, mtp=False)
        b = nnx.merge(graphdef_loop, weights)(toks, mtp=False)
        return a.logits, b.logits, a.router.counts, b.router.counts

    scanned, looped, counts_scan, counts_loop = both(weights, toks)
    assert np.abs(np.asarray(scanned)).max() > 0.1  # not vacuous
    np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), rtol=0, atol=TOL)
    np.testing.assert_array_equal(np.asarray(counts_loop), np.asarray(counts_scan))


def test_remat_policies_give_identical_gradients():
    # Only the MoE stack (first_k_dense=0, 2 layers): an MoE block holds every op a dense block has
    # (MLA, norms, SwiGLU as the shared expert) plus routing — and keeps the compiles small.
    cfg = tiny(num_layers=2, first_k_dense=0, num_mtp_layers=0)
    policies = ["none", "full", "save_dots", "save_dots_except_mla_up"]
    graphdefs = {p: abstract(cfg, nnx.Param, ..., runtime=dsv3.RuntimeConfig(remat=p))[0] for p in policies}
    for p in policies:  # the config value reaches the model: a checkpoint wraps the layer body unless 'none'
        eqns = _eqns(_forward_jaxpr(cfg, dsv3.RuntimeConfig(remat=p)))
        n_remat = sum(e.primitive.name.startswith(("checkpoint", "remat")) for e in eqns)
        assert (n_remat > 0) == (p != "none"), f"remat={p}: {n_remat} checkpoint equations in the forward"
    _, params, rest = abstract(cfg, nnx.Param, ...)
    params, rest = random_state(params, seed=2), random_state(rest, seed=3)
    toks = tokens(cfg, seed=4)

    @jax.jit(compiler_options=FAST_COMPILE)  # one program for all policies: one compile, not four
    def all_grads(params, rest, toks):
        out = {}
        for policy, graphdef in graphdefs.items():
            def loss(params, graphdef=graphdef):
                logits = nnx.merge(graphdef, params, rest)(toks, mtp=False).logits
                return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:]).mean()
            out[policy] = jax.grad(loss)(params)
        return out

    grads = all_grads(params, rest, toks)
    want = grads["none"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want)) > 0  # not vacuous
    for policy in policies[1:]:
        errs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads[policy], want)
        worst = max(jax.tree.leaves(errs))
        assert worst <= TOL, f"remat={policy}: max |grad - grad(remat=none)| = {worst}"
