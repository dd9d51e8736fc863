"""The on-device decode loop (docs/design.md §Decode loop): chunks of steps per device call, the loop
state (cache included) donated, tokens reaching the host once per chunk."""
import jax
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.inference import Generator


@pytest.fixture(scope="module")
def tiny():
    cfg = dsv3.load_config("tiny")
    return dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_chunk_size_does_not_change_output(tiny, speculative):
    """Chunks of 1, 3 and 16 steps: the same tokens, steps and acceptance (stop handling and the
    per-row limits live on the device, not at chunk boundaries); on_token streams them in order."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    runs = {}
    for chunk in (1, 3, 16):
        seen = [[], []]
        res = Generator(tiny, cache_dtype="float32", chunk=chunk)(
            prompts, max_new_tokens=9, speculative=speculative, on_token=lambda b, t: seen[b].append(t))
        assert seen == res.tokens and all(len(t) == 9 for t in res.tokens)
        runs[chunk] = (res.tokens, res.steps, res.acceptance_rate)
    assert runs[1] == runs[3] == runs[16]


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_one_host_round_trip_per_chunk_and_cache_donated(tiny, speculative):
    """11 tokens after the prefill's first in chunks of 4 steps: at most ceil(11/4) = 3 device calls
    (plain; speculative needs no more), and every call consumes (donates) the cache it was given, so
    the cache is updated in place."""
    gen = Generator(tiny, cache_dtype="float32", chunk=4)
    inner, calls = gen._run_chunk, []

    def spy(state, ls, *a, **kw):
        leaves = jax.tree.leaves(ls.cache)
        out = inner(state, ls, *a, **kw)
        calls.append(all(x.is_deleted() for x in leaves))
        return out

    gen._run_chunk = spy
    res = gen([[1, 2, 3]], max_new_tokens=12, speculative=speculative)
    assert len(res.tokens[0]) == 12
    assert 1 <= len(calls) <= 3 and all(calls), calls
