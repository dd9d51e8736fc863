"""`dsv3 info --mesh stage=N` per-stage memory (docs/pipeline.md §Memory per stage), against hand arithmetic
for the tiny config (exact integers, no tolerance)."""
import json

import pytest

from dsv3_jax.cli import main
from dsv3_jax.config import load_config
from dsv3_jax.errors import PipelineConfigError
from dsv3_jax.pipeline.memory import pipeline_overrides, stage_memory

# configs/tiny.yaml by hand: D=64, 4 heads, q_lora 48, kv_lora 32, nope 16, rope 8, v 16; 16 experts of width 32,
# 1 shared expert, dense FFN width 160, vocab 512
D = 64
ATTN = (D * 48 + 48) + 48 * 4 * (16 + 8) + (D * (32 + 8) + 32) + 32 * 4 * (16 + 16) + 4 * 16 * D + D  # + attn norm
MOE_LAYER = ATTN + 16 * 3 * D * 32 + D * 16 + 3 * D * 32 + D   # experts, router, shared expert, mlp norm
DENSE_LAYER = ATTN + 3 * D * 160 + D
MTP = MOE_LAYER + 2 * D + 2 * D * D + D                            # + enorm/hnorm, eh_proj, its final norm
BIAS = 16                                                          # router correction bias (not a Param)
SHARED = 2 * 512 * D + D + DENSE_LAYER + MTP                       # embedding, head, final norm, dense, MTP


def test_tiny_dualpipe_by_hand():
    cfg = load_config("tiny", ["num_layers=5"])  # 1 dense + 4 MoE layers: one MoE layer per stage on 4 stages
    m = stage_memory(cfg, "stage=4,data=2", schedule="dualpipe", microbatches=8, seq_len=64, batch_size=32)
    assert (MOE_LAYER, SHARED) == (124_112, 247_456)
    params = 2 * 4 * (MOE_LAYER + BIAS) + 4 * (SHARED + BIAS)      # two stage copies + shared leaves, fp32
    optimizer = 2 * 4 * (2 * MOE_LAYER + SHARED)                    # two fp32 moments per trainable element
    rows = 32 // (8 * 2)                                            # batch over micro-batches x data shards
    stash = rows * 64 * D * 4                                       # one stage input [rows, seq, D] in fp32
    assert (m["rows_per_microbatch"], m["stash_bytes"], m["param_copies"]) == (2, 32_768, 2)
    for s in m["stages"]:
        assert s["param_bytes"] == params and s["optimizer_bytes"] == optimizer
        assert s["activations"] == 4 + 1 and s["activation_bytes"] == 5 * stash  # PP + 1 on every device


def test_tiny_1f1b_cli_json(capsys):
    # 3 MoE layers over 3 stages; 1F1B stashes PP - d micro-batches on device d; bf16 activations
    assert main(["info", "--config", "tiny", "--mesh", "stage=3", "pipeline.schedule=1f1b",
                 "pipeline.microbatches=6", "--seq-len", "32", "--act-bytes", "2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["pipeline"]
    assert [s["activations"] for s in m["stages"]] == [3, 2, 1]
    assert [s["activation_bytes"] for s in m["stages"]] == [n * 32 * D * 2 for n in (3, 2, 1)]
    assert {s["param_bytes"] for s in m["stages"]} == {4 * (MOE_LAYER + BIAS + SHARED + BIAS)}


def test_text_output_and_errors(capsys):
    assert main(["info", "--config", "tiny", "--mesh", "stage=3", "pipeline.schedule=zb1p", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "pipeline zb1p: 3 stages" in out and "activations 3 x stash = 48.00 KiB" in out
    assert main(["info", "--config", "tiny", "--mesh", "stage=2", "pipeline.layers_per_stage=2,2"]) == 2
    assert "add up to 3" in capsys.readouterr().err                # the tiny model has 3 MoE layers
    with pytest.raises(PipelineConfigError, match="fix: use pipeline.schedule"):
        pipeline_overrides(["pipeline.stages=4"])
    with pytest.raises(PipelineConfigError, match="whole number"):
        pipeline_overrides(["pipeline.microbatches=many"])
    with pytest.raises(PipelineConfigError, match="multiple of 6"):
        stage_memory(load_config("tiny"), "stage=3,data=2", microbatches=3, batch_size=8)


def test_uneven_split_memory_and_costs(capsys):
    """3 MoE layers on 2 stages: stored as 2 rows per stage (stage 1 pads one), costs from the cost model."""
    from dsv3_jax.pipeline.partition import stage_costs, stage_extras
    cfg = load_config("tiny")
    m = stage_memory(cfg, "stage=2", schedule="1f1b", seq_len=64, layers_per_stage=(2, 1))
    assert m["layers_per_stage"] == [2, 1] and m["lmax"] == 2
    assert [(s["moe_layers"], s["padding_rows"]) for s in m["stages"]] == [(2, 0), (1, 1)]
    assert {s["param_bytes"] for s in m["stages"]} == {4 * (2 * (MOE_LAYER + BIAS) + SHARED + BIAS)}
    assert {s["optimizer_bytes"] for s in m["stages"]} == {2 * 4 * (2 * MOE_LAYER + SHARED)}
    costs = stage_costs((2, 1), *stage_extras(cfg, 1, 64))
    assert [s["cost"] for s in m["stages"]] == costs and m["imbalance"] == max(costs) / (sum(costs) / 2)
    assert main(["info", "--config", "tiny", "--mesh", "stage=2", "pipeline.layers_per_stage=2,1",
                 "--seq-len", "64"]) == 0
    assert "MoE layers per stage [2, 1] (2 rows stored per stage)" in capsys.readouterr().out
