"""The latent cache in bf16 by default (docs/design.md §Latent cache dtype): attention reads it as
stored and accumulates in fp32; ``cache_dtype="float32"`` keeps the exact cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.inference import GenerationError, Generator
from dsv3_jax.info import model_info

# bf16 keeps 8 significant bits: a cached latent is off by ≤ 2^-9 relative; through attention and the
# layers above it the logits of the tiny model move by ≤ 1% of their largest magnitude (seen: ~0.2%).
REL = 1e-2


@pytest.fixture(scope="module")
def tiny():
    cfg = dsv3.load_config("tiny")
    return cfg, dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))


def test_default_cache_is_bf16_and_matches_info(tiny):
    cfg, model = tiny
    cache = model.init_cache(1, 4)
    assert cache.moe.ckv.dtype == jnp.bfloat16 and Generator(model).cache_dtype == "bfloat16"
    assert cache.bytes_per_token() == model_info(cfg)["kv_cache_bytes_per_token"]
    assert model.init_cache(1, 4, dtype=jnp.float32).bytes_per_token() == 2 * cache.bytes_per_token()


def test_bf16_cache_logits_within_tolerance_of_fp32(tiny):
    """Prefill 5 tokens, then 8 decode steps and one two-token (verify-shaped) step through each
    cache: every step's logits agree within REL of the largest logit."""
    cfg, model = tiny
    seq = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 15)).astype(np.int32)
    step = jax.jit(lambda m, t, p, c: m(t, positions=p, cache=c, mtp=False))
    outs = {}
    for dt in (jnp.float32, jnp.bfloat16):
        cache = model.init_cache(2, 16, dtype=dt, mtp=False)
        o = step(model, jnp.asarray(seq[:, :5]), None, cache)
        logits, cache = [o.logits], o.cache
        for i in range(5, 13):
            o = step(model, jnp.asarray(seq[:, i:i + 1]), jnp.full((2, 1), i), cache)
            logits.append(o.logits)
            cache = o.cache
        o = step(model, jnp.asarray(seq[:, 13:15]), jnp.broadcast_to(jnp.arange(13, 15), (2, 2)), cache)
        logits.append(o.logits)
        outs[dt] = np.concatenate([np.asarray(x) for x in logits], 1)
    exact, approx = outs[jnp.float32], outs[jnp.bfloat16]
    scale = np.abs(exact).max()
    err = np.abs(approx - exact)[:, 5:].max()   # the prompt's own logits do not read the cache
    assert 0 < err <= REL * scale, (err, scale)  # > 0: the bf16 cache is really used


def test_greedy_tokens_unchanged_by_bf16_cache(tiny):
    """Greedy generation with the bf16 cache emits the fp32 cache's tokens, plain and speculative.
    (A token may flip only where fp32's two best logits are closer than the bf16 error above; the
    prompts here have no such near-tie, so equality is exact.)"""
    _, model = tiny
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    for spec in (None, "mtp"):
        exact = Generator(model, cache_dtype="float32")(prompts, max_new_tokens=12, speculative=spec).tokens
        assert Generator(model)(prompts, max_new_tokens=12, speculative=spec).tokens == exact


def test_bad_cache_dtype(tiny):
    with pytest.raises(GenerationError, match="cache_dtype='int8'.*bfloat16"):
        Generator(tiny[1], cache_dtype="int8")
    with pytest.raises(GenerationError, match="chunk=0"):
        Generator(tiny[1], chunk=0)
