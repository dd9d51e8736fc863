"""What the expert-parallel exchange puts on the wire (issue M13, docs/architecture.md §6): token rows in
the compute dtype (bf16 when computing in bf16) or, under ``quant=fp8``, as e4m3 bits with float32
1×128 tile scales; partial expert sums home in the compute dtype.

Tolerances: bf16 compute, expert=8 vs one device: |Δlogits| ≤ 2⁻⁷·max|logits| (two bf16 ulps: the
mesh rounds each shard's partial sum to bf16 before the reduce-scatter / return trip, one device sums
in fp32 and rounds once). FP8 dispatch vs the same mesh dispatching bf16 rows: the same bound (the
receiver re-quantises each tile to the same e4m3 values, so only the scale's last bit may differ).
FP8 dispatch against one device in fp32 is ``test_expert_parallel.py::test_fp8_expert_parallel_equals_
single_device`` (1e-5; ``dispatch_fp8`` is on whenever ``quant=fp8``)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
import sharding
from dsv3_jax.model.moe import MoE
from sharding.rules import DEFAULT_RULES

CFG = ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0"]
# a collective's operation and its result type in the lowered (StableHLO) program: what a TPU/GPU
# receives (XLA:CPU later widens bf16 collectives to f32, so the compiled CPU program cannot tell)
_COLLECTIVE = re.compile(r'"stablehlo\.(all_gather|reduce_scatter|all_to_all)".*?\) -> tensor<([0-9x]+)x(\w+)>',
                         re.S)


def _setup(runtime, mesh=None):
    cfg = dsv3.load_config("tiny", CFG)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 24)))
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime, mesh=mesh)
    return cfg, tokens, model


def _run(model, tokens, mesh=None):
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = DEFAULT_RULES.place(state, mesh)
        tokens = jax.device_put(tokens, DEFAULT_RULES.batch_sharding(mesh))
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, mtp=False).logits)
    text = fn.lower(state, tokens).as_text()
    return np.asarray(fn(state, tokens), np.float32), text


def _row_collectives(text: str, hidden: int) -> set[tuple[str, str]]:
    """(operation, element type) of every collective moving rows of width ``hidden``."""
    return {(op, dt) for op, dims, dt in _COLLECTIVE.findall(text) if dims.split("x")[-1] == str(hidden)}


@pytest.mark.parametrize("strategy", ["allgather", "ragged_a2a"])
def test_bf16_exchange_equals_one_device(strategy):
    rt = dsv3.RuntimeConfig(compute_dtype="bfloat16")
    cfg, tokens, ref = _setup(rt)
    want, _ = _run(ref, tokens)
    mesh = sharding.make_mesh("expert=8")
    _, _, model = _setup(rt.replace(ep_strategy=strategy), mesh)
    got, text = _run(model, tokens, mesh)
    assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max()
    rows = _row_collectives(text, cfg.hidden_size)
    assert rows and {dt for _, dt in rows} == {"bf16"}, rows  # dispatch and combine: no fp32 rows
    if strategy == "allgather":
        assert ("reduce_scatter", "bf16") in rows and ("all_gather", "bf16") in rows


def test_fp8_dispatch_sends_e4m3_and_loses_nothing():
    rt = dsv3.RuntimeConfig(compute_dtype="bfloat16", quant="fp8", ep_strategy="ragged_a2a")
    mesh = sharding.make_mesh("expert=8")
    cfg, tokens, model = _setup(rt, mesh)
    got, text = _run(model, tokens, mesh)
    rows = _row_collectives(text, cfg.hidden_size)
    assert rows == {("all_to_all", "ui8"), ("all_to_all", "bf16")}, rows  # e4m3 bits out, bf16 sums back
    n_tiles = -(-cfg.hidden_size // 128)
    scales = {(op, dt) for op, dims, dt in _COLLECTIVE.findall(text) if dims.endswith(f"x{n_tiles}") and dt == "f32"}
    assert scales, "the 1x128 tile scales travel with the e4m3 rows"
    # the same mesh with the rows dispatched in bf16
    for _, m in nnx.iter_modules(model):
        if isinstance(m, MoE) and m.ep is not None:
            assert m.ep.dispatch_fp8
            m.ep = dataclasses.replace(m.ep, dispatch_fp8=False)
    want, text16 = _run(model, tokens, mesh)
    assert ("all_to_all", "ui8") not in _row_collectives(text16, cfg.hidden_size)
    assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max()


def test_exchange_bytes_at_the_dtypes_used():
    """``ep_bytes`` counts what the exchange moves: bf16 rows out and back (2 bytes an element), or e4m3
    rows (1 byte) + one fp32 scale per 1×128 tile out and bf16 back; the minimum at the same dtypes."""
    from sharding.ep_bytes import exchange_bytes_per_token, lowered_collective_bytes
    D, K = 256, 2                                # 2 tiles of 128
    experts = np.array([[2, 3], [0, 1]])         # both tokens: only the other shard (2 shards of 2 experts)
    kw = dict(n_experts=4, n_shards=2, hidden=D)
    bf16 = exchange_bytes_per_token(experts, dtype_bytes=2, **kw)
    assert bf16["minimum"] == 2 * D + 2 * D and bf16["ragged_a2a"] == 2 * D + 8 * K + 2 * D
    fp8 = exchange_bytes_per_token(experts, dtype_bytes=2, fp8_dispatch=True, **kw)
    assert fp8["minimum"] == (D + 4 * 2) + 2 * D and fp8["ragged_a2a"] == (D + 4 * 2) + 8 * K + 2 * D
    assert fp8["allgather"] == 1 * ((D + 8) + 8 * K + 2 * D)
    f32 = exchange_bytes_per_token(experts, dtype_bytes=4, **kw)  # fp32 compute: fp32 both ways
    assert f32["minimum"] == 8 * D
    text = ('%1 = "stablehlo.all_to_all"(%0) <{...}> : (tensor<8x15x64xui8>) -> tensor<8x15x64xui8>\n'
            '%2 = "stablehlo.reduce_scatter"(%1) <{...}> ({\n^bb0(%a: tensor<bf16>, %b: tensor<bf16>):\n'
            '  %s = stablehlo.add %a, %b : tensor<bf16>\n  stablehlo.return %s : tensor<bf16>\n'
            '}) : (tensor<192x64xbf16>) -> tensor<24x64xbf16>\n')
    assert lowered_collective_bytes(text) == 8 * 15 * 64 + 24 * 64 * 2
