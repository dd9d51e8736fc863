"""Latent-cache generation and MTP speculative decoding (issue M7)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.inference import GenerationError, Generator, init_cache

TOL = 1e-4  # fp32; absorbed vs re-expanded attention differ only in summation order (~2e-7 seen)


@pytest.fixture(scope="module")
def tiny():
    cfg = dsv3.load_config("tiny")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    return cfg, model, Generator(model, cache_dtype="float32")  # exact comparisons; bf16: test_cache_dtype.py


@pytest.mark.parametrize("prefill", ["flash", "absorbed"])
def test_cached_decode_equals_full_forward_every_step(tiny, prefill):
    """Prefill 6 tokens through the model's own forward with a cache — as a prompt (no positions:
    the flash prefill kernel) or as a chunk at explicit positions (absorbed attention against the
    cache) — then decode one at a time: every step's logits equal a full forward over the whole
    sequence without a cache; so do the MTP logits run over the cache."""
    cfg, model, _ = tiny
    seq = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 14)).astype(np.int32)
    full = model(seq)
    cache = model.init_cache(2, 16, dtype=jnp.float32)  # exact; the bf16 default: test_cache_dtype.py
    step = jax.jit(lambda m, t, p, c: m(t, positions=p, cache=c))
    first = (None if prefill == "flash" else jnp.broadcast_to(jnp.arange(6), (2, 6)))
    out = step(model, jnp.asarray(seq[:, :6]), first, cache)
    assert out.mtp_logits is None and out.cache is not None
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full.logits[:, :6]), atol=TOL)
    hiddens, cache = [out.hidden], out.cache
    for i in range(6, 14):
        out = step(model, jnp.asarray(seq[:, i:i + 1]), jnp.full((2, 1), i), cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full.logits[:, i]), atol=TOL)
        hiddens.append(out.hidden)
        cache = out.cache
    hidden = jnp.concatenate(hiddens, 1)
    nxt = jnp.asarray(np.concatenate([seq[:, 1:], np.full((2, 1), -1, np.int32)], 1))[None]
    mtp_logits, _, cache = model.mtp_forward(hidden, nxt, positions=jnp.broadcast_to(jnp.arange(14), (2, 14)),
                                             cache=cache)
    np.testing.assert_allclose(np.asarray(mtp_logits[0]), np.asarray(full.mtp_logits[0]), atol=TOL)


def test_two_token_steps_over_rejected_drafts_equal_the_full_forward(tiny):
    """The speculative verify step's cache discipline (docs/design.md §Speculative decoding): a
    two-token step writes a wrong draft at pos+1; the next step starts at pos+1 and overwrites it, and
    a query never reads the stale entry past its own position. Every kept row's logits equal the
    uncached forward over the true sequence (fp32 cache, ``TOL``)."""
    cfg, model, _ = tiny
    seq = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    full = np.asarray(model(seq, mtp=False).logits)
    step = jax.jit(lambda m, t, p, c: m(t, positions=p, cache=c))
    cache = step(model, jnp.asarray(seq[:, :5]), jnp.broadcast_to(jnp.arange(5), (2, 5)),
                 model.init_cache(2, 12, dtype=jnp.float32)).cache
    junk = (seq + 7) % cfg.vocab_size                       # drafts that are always wrong
    for p in (5, 6):                                        # rejected: only row 0 is kept, pos += 1
        out = step(model, jnp.asarray(np.stack([seq[:, p], junk[:, p + 1]], 1)), jnp.full((2, 2), p) + jnp.arange(2),
                   cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, p], atol=TOL)
        cache = out.cache
    out = step(model, jnp.asarray(seq[:, 7:9]), jnp.full((2, 2), 7) + jnp.arange(2), cache)  # accepted
    np.testing.assert_allclose(np.asarray(out.logits), full[:, 7:9], atol=TOL)


def test_cache_bytes_match_info(tiny):
    cfg, model, _ = tiny
    cache = model.init_cache(1, 4)  # the default (bf16) cache is what dsv3 info counts
    from dsv3_jax.info import model_info
    assert cache.bytes_per_token() == model_info(cfg)["kv_cache_bytes_per_token"]


def test_greedy_generation_equals_uncached_greedy(tiny):
    """Generation through the cache (flash prefill, decode kernel) emits exactly the tokens of
    greedy decoding by re-running the full uncached forward on the growing sequence."""
    cfg, model, gen = tiny
    prompt = [5, 17, 3, 99, 42]
    got = gen([prompt], max_new_tokens=10).tokens[0]
    fwd = jax.jit(lambda m, t: m(t, mtp=False).logits[:, -1])
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(jnp.argmax(fwd(model, jnp.asarray([seq], jnp.int32))[0])))
    assert got == seq[len(prompt):]


def test_mixed_length_batch_equals_each_alone(tiny):
    _, _, gen = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    together = gen(prompts, max_new_tokens=8).tokens
    for p, t in zip(prompts, together):
        assert gen([p], max_new_tokens=8).tokens[0] == t


def test_speculative_greedy_equals_plain_greedy(tiny):
    _, _, gen = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    plain = gen(prompts, max_new_tokens=10)
    spec = gen(prompts, max_new_tokens=10, speculative="mtp")
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate is not None and 0 <= spec.acceptance_rate <= 1


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_speculative_bookkeeping_with_oracle_drafts(tiny, monkeypatch, wrong_every):
    """Replace the MTP head by an oracle that knows plain greedy's answer: drafts are always right
    (or wrong at every third position) — the output must not change, and accepted drafts save steps."""
    cfg, model, _ = tiny
    gen = Generator(model)
    prompt = [5, 6, 7, 8]
    plain = gen([prompt], max_new_tokens=12).tokens[0]
    full = jnp.asarray(prompt + plain + [0, 0, 0])
    real_mtp = gen.mtp

    def oracle(state, hidden, next_tokens, positions, cache):  # traced inside the jitted step
        _, cache = real_mtp(state, hidden, next_tokens, positions, cache)
        if positions is None:  # the prompt, from position 0
            positions = jnp.broadcast_to(jnp.arange(next_tokens.shape[1]), next_tokens.shape)
        want = full[jnp.minimum(positions + 2, full.shape[0] - 1)]
        if wrong_every:
            want = jnp.where(positions % wrong_every == 0, (want + 1) % cfg.vocab_size, want)
        return jax.nn.one_hot(want, cfg.vocab_size) * 100.0, cache

    monkeypatch.setattr(gen, "mtp", oracle)
    spec = gen([prompt], max_new_tokens=12, speculative="mtp")
    assert spec.tokens[0] == plain
    if not wrong_every:
        assert spec.acceptance_rate == 1.0 and spec.steps <= 6
    else:
        assert 0 < spec.acceptance_rate < 1 and spec.steps < 11


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    _, _, gen = tiny
    greedy = gen([[1, 2, 3]], max_new_tokens=6).tokens
    assert gen([[1, 2, 3]], max_new_tokens=6, temperature=0.8, top_k=1, seed=3).tokens == greedy
    a = gen([[1, 2, 3]], max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7).tokens
    assert a == gen([[1, 2, 3]], max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7).tokens


def test_greedy_is_argmax():
    """``greedy`` (two plain reductions; XLA:CPU's argmax reduction is 15-20x slower) picks what
    ``jnp.argmax`` picks: the first maximum on ties, the first NaN, index 0 for an all -inf row."""
    from dsv3_jax.inference.generate import greedy
    x = np.random.RandomState(0).randn(6, 3, 50).astype(np.float32)
    x[0, 0, [7, 30]] = 9.0                       # a tie: the first index wins
    x[1, 1, [4, 20]] = np.nan                    # NaN: the first NaN wins
    x[2, 2] = -np.inf
    x[3] = np.round(x[3])                        # many ties
    got, want = jax.jit(greedy)(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), -1)
    assert got.dtype == jnp.int32 and np.array_equal(np.asarray(got), np.asarray(want))
    assert int(got[0, 0]) == 7 and int(got[1, 1]) == 4 and int(got[2, 2]) == 0


def test_speculative_accept_preserves_the_target_distribution():
    """The rejection rule on its own: drafts drawn from q, kept with min(1, p/q), else resampled
    from max(p − q, 0) — the kept-or-replaced token is distributed as p (200k trials, 5σ bound), and
    the acceptance rate is Σ min(p, q) (the theory)."""
    from dsv3_jax.inference.generate import speculative_accept
    p = jnp.array([0.5, 0.2, 0.2, 0.1, 0.0])
    q = jnp.array([0.1, 0.1, 0.3, 0.3, 0.2])
    n = 200_000
    kd, ka = jax.random.split(jax.random.key(0))
    logp, logq = jnp.broadcast_to(jnp.log(p), (n, 5)), jnp.broadcast_to(jnp.log(q), (n, 5))
    draft = jax.random.categorical(kd, logq).astype(jnp.int32)
    tok, ok = jax.jit(speculative_accept)(ka, logp, logq, draft)
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / n))
    assert abs(float(ok.mean()) - float(jnp.minimum(p, q).sum())) < 5 * np.sqrt(0.25 / n)
    assert freq[4] == 0  # never emits a token the target excludes (top-k / top-p)


def test_speculative_sampling_has_the_target_conditionals(tiny):
    """End to end with temperature and top-k: 512 copies of a prompt, two tokens each. The second
    token went through the MTP draft + speculative accept/resample; given the first, its frequencies
    match the main model's own filtered distribution p(· | prompt, t1)."""
    from dsv3_jax.inference.generate import filter_logits
    cfg, model, gen = tiny
    prompt, n, T, K = [3, 1, 4, 1, 5], 512, 1.5, 3
    res = gen([prompt] * n, max_new_tokens=2, temperature=T, top_k=K, speculative="mtp", seed=11)
    toks = np.array(res.tokens)
    assert toks.shape == (n, 2) and res.acceptance_rate is not None
    for t1 in np.unique(toks[:, 0]):
        rows = toks[toks[:, 0] == t1, 1]
        logits = model(jnp.asarray([prompt + [int(t1)]]), mtp=False).logits[:, -1]
        p = np.asarray(jax.nn.softmax(filter_logits(logits, T, K)))[0]
        freq = np.bincount(rows, minlength=cfg.vocab_size) / len(rows)
        bound = 5 * np.sqrt(p * (1 - p) / len(rows)) + 1.5 / len(rows)
        assert np.all(np.abs(freq - p) <= bound), (t1, len(rows), np.nonzero(freq)[0], np.nonzero(p)[0])
    assert gen([prompt] * 4, max_new_tokens=5, temperature=T, top_k=K, speculative="mtp", seed=2).tokens == \
        gen([prompt] * 4, max_new_tokens=5, temperature=T, top_k=K, speculative="mtp", seed=2).tokens  # seeded


def test_stop_tokens(tiny):
    _, _, gen = tiny
    first = gen([[1, 2, 3]], max_new_tokens=6).tokens[0]
    assert gen([[1, 2, 3]], max_new_tokens=6, stop_tokens=[first[2]]).tokens[0] == first[:first.index(first[2]) + 1]


def test_bad_requests(tiny, tmp_path):
    cfg, _, gen = tiny
    with pytest.raises(GenerationError, match="at least one token"):
        gen([[]])
    with pytest.raises(GenerationError, match="exceeds the model's context of 1024"):
        gen([[1] * 1000], max_new_tokens=100)
    with pytest.raises(dsv3.TokenRangeError, match="prompt tokens contain id 512"):
        gen([[1, 512]])
    with pytest.raises(Exception, match="not a dsv3 checkpoint|does not exist|no such"):
        dsv3.generate(str(tmp_path / "missing"), [[1, 2]])


def test_sharded_generation_equals_single_device(tiny):
    """Under a data=2 × expert=4 mesh (expert-parallel MoE, batch padded to the 8 batch shards)
    the tokens equal single-device generation, plain and speculative."""
    import sharding
    cfg, _, gen = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    sharded = Generator(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0)), mesh=sharding.make_mesh("data=2,expert=4"),
                        ep_strategy="ragged_a2a")
    for spec in (None, "mtp"):
        assert sharded(prompts, max_new_tokens=6, speculative=spec).tokens == \
            gen(prompts, max_new_tokens=6, speculative=spec).tokens
