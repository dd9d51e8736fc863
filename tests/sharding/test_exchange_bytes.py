"""``ep_bytes.shards_per_token`` and ``exchange_bytes_per_token`` on routings small enough to
count by hand: which shards each token reaches, and the bytes per token each strategy moves."""
import numpy as np
import pytest

import dsv3_jax as dsv3
from dsv3_jax.model import route
from sharding import MeshError
from sharding.ep_bytes import exchange_bytes_per_token, shards_per_token


def row_bytes(D, b, K):
    # one token row out (hidden D·b bytes + K int32 expert ids + K fp32 gates) and its result back in the
    # compute dtype (D·b: partial sums come home in bf16 when computing in bf16)
    return D * b + 4 * K + 4 * K + D * b


def test_shards_per_token_counts_distinct_shards():
    # 8 experts over 4 shards: shard j holds experts 2j, 2j+1
    experts = np.array([[0, 1],    # both on shard 0                  -> 1
                        [0, 7],    # shards 0 and 3                   -> 2
                        [5, 4],    # both on shard 2 (order ignored)  -> 1
                        [6, 2]])   # shards 3 and 1                   -> 2
    np.testing.assert_array_equal(shards_per_token(experts, 8, 4), [1, 2, 1, 2])
    # the same experts over 2 shards (experts 0-3 | 4-7)
    np.testing.assert_array_equal(shards_per_token(experts, 8, 2), [1, 2, 1, 2])
    # one shard holds everything; 8 shards of one expert each: a shard per distinct expert
    np.testing.assert_array_equal(shards_per_token(experts, 8, 1), [1, 1, 1, 1])
    np.testing.assert_array_equal(shards_per_token(experts, 8, 8), [2, 2, 2, 2])
    # a shard counted once even when its experts are not next to each other in the top-K list
    np.testing.assert_array_equal(shards_per_token(np.array([[0, 7, 1], [6, 0, 7]]), 8, 4), [2, 2])
    # leading [L, B, S] axes (as out.router.experts) are flattened into tokens
    np.testing.assert_array_equal(shards_per_token(experts.reshape(1, 2, 2, 2), 8, 4), [1, 2, 1, 2])


def test_two_tokens_four_experts_two_shards():
    # experts 0,1 on shard 0 and 2,3 on shard 1; token 0 lives on shard 0, token 1 on shard 1 (default layout)
    D, b, K = 8, 4, 2
    row = row_bytes(D, b, K)   # 32 + 8 + 8 + 32 = 80
    assert row == 80
    kw = dict(n_experts=4, n_shards=2, hidden=D, dtype_bytes=b)

    # token 0 -> experts {0, 1}: only its own shard; token 1 -> {1, 2}: shard 0 (other) and its own shard 1
    got = exchange_bytes_per_token(np.array([[0, 1], [1, 2]]), **kw)
    others = (0 + 1) / 2
    # T_s = 1 token per shard, cap = min(1, ceil(int(1.25·1·2) / 2)) = 1 row to the other shard
    assert got == {"allgather": 1 * 80.0, "a2a_capacity": 1 * 1 / 1 * 80.0,
                   "ragged_a2a": others * 80, "minimum": others * 2 * D * b}
    assert got["ragged_a2a"] == 40.0 and got["minimum"] == 32.0

    # both tokens routed only to the other shard: one copy each, however many of its experts are there
    got = exchange_bytes_per_token(np.array([[2, 3], [0, 1]]), **kw)
    assert got["ragged_a2a"] == 80.0 and got["minimum"] == 64.0
    # both tokens routed only to their own shard: nothing crosses for ragged/minimum ...
    local = exchange_bytes_per_token(np.array([[0, 1], [3, 2]]), **kw)
    assert local["ragged_a2a"] == 0.0 and local["minimum"] == 0.0
    # ... while allgather and a2a_capacity move fixed-size buffers whatever the routing
    assert local["allgather"] == got["allgather"] == 80.0
    assert local["a2a_capacity"] == got["a2a_capacity"] == 80.0

    # the default layout is contiguous blocks: with 4 tokens, tokens 0-1 on shard 0 and 2-3 on shard 1
    blocks = exchange_bytes_per_token(np.array([[0, 1], [1, 0], [2, 3], [3, 2]]), **kw)
    assert blocks["ragged_a2a"] == 0.0 and blocks["minimum"] == 0.0

    # where the tokens live matters: swap them and the all-local routing becomes all-remote
    swapped = exchange_bytes_per_token(np.array([[0, 1], [3, 2]]), source_shard=np.array([1, 0]), **kw)
    assert swapped["ragged_a2a"] == 80.0 and swapped["minimum"] == 64.0


def test_capacity_rows_and_tokens_per_shard():
    # 8 experts over 4 shards, 8 tokens (T_s = 2), K = 2, bf16 hidden 16
    D, b, K, n = 16, 2, 2, 4
    row = row_bytes(D, b, K)   # 32 + 16 + 32 = 80
    experts = np.tile([[0, 2]], (8, 1))
    kw = dict(n_experts=8, n_shards=n, hidden=D, dtype_bytes=b)
    # cf 1.25: cap = min(2, ceil(int(1.25·2·2)=5 / 4) = 2) = 2 rows to each of 3 peers per 2 tokens
    assert exchange_bytes_per_token(experts, **kw)["a2a_capacity"] == 3 * 2 / 2 * row
    # cf 0.5: cap = ceil(int(0.5·2·2)=2 / 4) = 1 row per peer for 2 tokens: half of the above
    assert exchange_bytes_per_token(experts, capacity_factor=0.5, **kw)["a2a_capacity"] == 3 * 1 / 2 * row
    # tokens_per_shard overrides T // n: T_s = 64, cap = min(64, ceil(int(1.25·64·2)=160 / 4) = 40)
    got = exchange_bytes_per_token(experts, tokens_per_shard=64, **kw)
    assert got["a2a_capacity"] == 3 * 40 / 64 * row
    assert got["allgather"] == 3 * row
    # tokens on shards 0,0,1,1,2,2,3,3 and routed to shards {0, 1}: tokens 0-3 reach 1 other, 4-7 reach 2
    assert got["ragged_a2a"] == (4 * 1 + 4 * 2) / 8 * row
    assert got["minimum"] == (4 * 1 + 4 * 2) / 8 * 2 * D * b


def test_group_limited_routing_reaches_fewer_shards():
    # 16 experts in 4 groups of 4, one group per shard (n_shards = n_group = 4), top-4
    D, b, K = 16, 2, 4
    row = row_bytes(D, b, K)   # 32 + 32 + 32 = 96
    kw = dict(n_experts=16, n_shards=4, hidden=D, dtype_bytes=b, source_shard=np.array([0]))
    limited = np.array([[0, 1, 4, 5]])      # top-2 groups {0, 1}: shards 0 (own) and 1
    free = np.array([[0, 4, 8, 12]])        # one expert in every group: all 4 shards
    assert shards_per_token(limited, 16, 4).tolist() == [2]
    assert shards_per_token(free, 16, 4).tolist() == [4]
    lim, unr = exchange_bytes_per_token(limited, **kw), exchange_bytes_per_token(free, **kw)
    assert lim["ragged_a2a"] == 1 * row and unr["ragged_a2a"] == 3 * row
    assert lim["minimum"] == 1 * 2 * D * b and unr["minimum"] == 3 * 2 * D * b
    assert lim["allgather"] == unr["allgather"] == 3 * row


def test_group_limited_route_through_the_router():
    # The tiny config's own routing rule (16 experts, 4 groups, top-2 groups, top-4, sigmoid, noaux_tc).
    # One strong expert per group, strongest in group 0: unrestricted top-4 takes one expert from each
    # group; group-limited keeps groups 0 and 1 only (group score = sum of its top-2 scores).
    cfg = dsv3.load_config("tiny")
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (16, 4, 2, 4)
    logits = np.full((1, 16), -5.0, np.float32)
    logits[0, [0, 4, 8, 12]] = [5.0, 4.0, 3.0, 2.0]
    free_cfg = dsv3.load_config("tiny", ["n_group=1", "topk_group=1"])
    e_lim = np.asarray(route(logits, None, cfg).experts)
    e_free = np.asarray(route(logits, None, free_cfg).experts)
    assert sorted(e_free[0].tolist()) == [0, 4, 8, 12]
    assert set(e_lim[0].tolist()) <= set(range(8)) and {0, 4} <= set(e_lim[0].tolist())
    # 4 shards (one group each): 2 vs 4 shards; 2 shards (groups 0-1 | 2-3): 1 vs 2
    assert shards_per_token(e_lim, 16, 4).tolist() == [2] and shards_per_token(e_free, 16, 4).tolist() == [4]
    assert shards_per_token(e_lim, 16, 2).tolist() == [1] and shards_per_token(e_free, 16, 2).tolist() == [2]
    D, b = 16, 2
    row = row_bytes(D, b, 4)
    kw = dict(n_experts=16, n_shards=4, hidden=D, dtype_bytes=b, source_shard=np.array([0]))
    assert exchange_bytes_per_token(e_lim, **kw)["ragged_a2a"] == 1 * row
    assert exchange_bytes_per_token(e_free, **kw)["ragged_a2a"] == 3 * row
    # the token on shard 3 instead: group-limited still reaches 2 shards, neither of them its own
    kw["source_shard"] = np.array([3])
    assert exchange_bytes_per_token(e_lim, **kw)["ragged_a2a"] == 2 * row


def test_experts_must_divide_over_shards():
    with pytest.raises(MeshError, match="cannot be split"):
        exchange_bytes_per_token(np.array([[0, 1]]), n_experts=6, n_shards=4, hidden=8)
