"""Cost-balanced pipeline stages (docs/pipeline.md §Stage split): the split is optimal (checked against every
contiguous split), the 671B split for 16 stages, the stage map of an uneven split, and the config checks.
Integer FLOP counts, so every comparison is exact."""
import itertools
import random

import numpy as np
import pytest

from dsv3_jax.config import load_config
from dsv3_jax.errors import Dsv3Error, PipelineConfigError
from dsv3_jax.pipeline.config import PipelineConfig, validate_pipeline
from dsv3_jax.pipeline.partition import (StageMap, balance, best_split, layer_costs, parse_layers_per_stage,
                                         stage_costs, stage_extras)
from dsv3_jax.train.config import load_run_config


def _splits(layers, pp):
    """Every split of ``layers`` into ``pp`` parts of at least 1."""
    for cuts in itertools.combinations(range(1, layers), pp - 1):
        yield tuple(b - a for a, b in zip((0,) + cuts, cuts + (layers,)))


@pytest.mark.parametrize("seed", range(4))
def test_best_split_is_the_cheapest_of_all_splits(seed):
    rng = random.Random(seed)
    for layers in range(1, 10):
        for pp in range(1, min(layers, 5) + 1):
            moe, first, last = rng.randint(1, 50), rng.randint(0, 200), rng.randint(0, 200)
            got = best_split(layers, pp, moe, first, last)
            assert sum(got) == layers and len(got) == pp and min(got) >= 1
            worst = max(stage_costs(got, moe, first, last))
            every = [max(stage_costs(s, moe, first, last)) for s in _splits(layers, pp)]
            assert worst == min(every)
            # among the cheapest, the smoothest (least sum of squared stage costs)
            sq = lambda s: sum(c * c for c in stage_costs(s, moe, first, last))  # noqa: E731
            assert sq(got) == min(sq(s) for s in _splits(layers, pp)
                                  if max(stage_costs(s, moe, first, last)) == worst)


def test_671b_on_16_stages():
    """3 dense + 58 MoE layers + 1 MTP depth: stage 0 (embedding + 3 dense layers, each as dear as a MoE layer)
    and stage 15 (head + MTP, about 3.9 MoE layers) take one MoE layer, the 14 others four."""
    cfg = load_config("deepseek_v3_671b")
    c = layer_costs(cfg)
    # 2 x (attention 187M + 8 routed and 1 shared expert 396M + router) + causal attention at 4096 tokens
    assert c["moe"] == 1_338_376_192 and c["dense"] == 1_334_706_176 and c["head"] == 2 * 7168 * 129280
    split = balance(cfg, 16, 1)
    assert split == (1,) + (4,) * 14 + (1,)
    costs = stage_costs(split, *stage_extras(cfg, 1))
    assert max(costs) == costs[-1] and round(max(costs) / np.mean(costs), 3) == 1.213
    # the naive split by layer count (remainder on the first stages) is far worse
    naive = stage_costs((4,) * 10 + (3,) * 6, *stage_extras(cfg, 1))
    assert round(max(naive) / np.mean(naive), 3) == 1.723
    # without MTP training the last stage is cheaper
    assert balance(cfg, 16, 0) == (1,) + (4,) * 13 + (3, 2)


def test_tiny_split_and_stage_map():
    cfg = load_config("tiny", ["num_layers=6"])                       # 1 dense + 5 MoE layers
    assert balance(cfg, 4, 1) == (1, 2, 1, 1)
    sm = StageMap((1, 2, 1, 1))
    assert not sm.even and sm.lmax == 2 and sm.pp == 4 and sm.layers == 5
    np.testing.assert_array_equal(sm.slots, [[0, -1], [1, 2], [3, -1], [4, -1]])
    np.testing.assert_array_equal(sm.rows, [0, 2, 3, 4, 6])             # stored row of each layer
    np.testing.assert_array_equal(sm.source, [0, 0, 1, 2, 3, 0, 4, 0])  # layer of each row (padding: 0, zeroed)
    np.testing.assert_array_equal(sm.source[sm.rows], np.arange(5))
    assert StageMap((2, 2)).even


def test_layers_per_stage_in_configs():
    assert PipelineConfig(layers_per_stage="1,2,1,1").layers_per_stage == (1, 2, 1, 1)
    assert PipelineConfig(layers_per_stage=[3, 1]).layers_per_stage == (3, 1)
    run = load_run_config("demo", ["pipeline.layers_per_stage=1,2,1,1"])
    assert run.pipeline.layers_per_stage == (1, 2, 1, 1)
    run = load_run_config("demo", ["pipeline.layers_per_stage=[2, 3]"])
    assert run.pipeline.layers_per_stage == (2, 3)
    cfg = load_config("tiny", ["num_layers=6"])
    # empty: resolved to the balanced split; given: kept
    assert validate_pipeline(PipelineConfig(), cfg, 4).layers_per_stage == (1, 2, 1, 1)
    assert validate_pipeline(PipelineConfig(layers_per_stage=(2, 1, 1, 1)), cfg, 4).layers_per_stage == (2, 1, 1, 1)


@pytest.mark.parametrize("split,pp,match", [
    ((2, 2, 1), 4, "names 3 stages but the mesh has stage=4"),
    ((3, 0, 1, 1), 4, "without MoE layers"),
    ((1, 1, 1, 1), 4, "sums to 4, but the model has 5 MoE layers"),
    ((), 6, "at least one MoE layer each"),
])
def test_split_errors_name_the_fix(split, pp, match):
    cfg = load_config("tiny", ["num_layers=6"])
    with pytest.raises(PipelineConfigError, match=match) as e:
        validate_pipeline(PipelineConfig(layers_per_stage=split), cfg, pp)
    assert isinstance(e.value, Dsv3Error) and "fix:" in str(e.value)


def test_bad_layers_per_stage_value():
    for bad in ("1,x", [1.5, 2], [True, 1]):
        with pytest.raises(PipelineConfigError, match="not a list of whole numbers"):
            parse_layers_per_stage(bad)


def test_padding_rows_are_identity_layers():
    """``run_stack`` with ``active`` flags (a stage's padding rows, docs/design.md §Pipeline): layers 0, 2
    with row 1 inactive give the output and router stats of the two-layer stack [0, 2] (fp32, 1e-6 of the
    largest entry), row 1's stats are zero and its weights get an exactly zero gradient."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax.config import RuntimeConfig
    from dsv3_jax.model import DeepSeekV3
    from dsv3_jax.model.rope import rope_angles
    from dsv3_jax.model.transformer import run_stack

    cfg = load_config("tiny", ["num_layers=4"])                       # 3 MoE layers
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=RuntimeConfig(compute_dtype="float32"))
    graphdef, state = nnx.split(model.moe_layers)
    B, S = 2, 8
    h = jax.random.normal(jax.random.key(0), (B, S, cfg.hidden_size))
    pos = jnp.tile(jnp.arange(S), (B, 1))
    seg = jnp.ones((B, S), jnp.int32)
    cos, sin = rope_angles(cfg, pos)

    def run(st, active):
        out, stats, _ = run_stack(nnx.merge(graphdef, st), h, cos, sin, seg, seg > 0, model.ex, active=active)
        return out, stats

    out, stats = jax.jit(run)(state, jnp.array([True, False, True]))
    want, wstats = jax.jit(run)(jax.tree.map(lambda a: a[jnp.array([0, 2])], state), None)
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(out - want).max()) <= 1e-6 * scale
    np.testing.assert_array_equal(np.asarray(stats.counts)[[0, 2]], np.asarray(wstats.counts))
    assert not np.asarray(stats.counts)[1].any() and not np.asarray(stats.seq_probs)[1].any()
    grads = jax.jit(jax.grad(lambda st: run(st, jnp.array([True, False, True]))[0].sum()))(state)
    for g in jax.tree.leaves(grads):
        assert not np.asarray(g)[1].any()
    gate = np.asarray(grads["mlp"]["experts"]["gate"].get_value())
    assert gate[0].any() and gate[2].any()
