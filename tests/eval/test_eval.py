"""``dsv3 eval`` (dsv3_jax/eval; docs/design.md §Evaluation): needle construction, the scoring of the
needle grid and of FIM against oracle generators, perplexity against the independent scoring path,
and the three commands on a tiny checkpoint."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

import dsv3_jax as dsv3
from dsv3_jax.cli import main
from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.eval import fim_eval, fim_samples, heldout_documents, make_trial, needle_eval, perplexity
from dsv3_jax.eval.fim import fim_prompt
from dsv3_jax.eval.needle import PREFIX, haystack_stream
from dsv3_jax.eval.ppl import windows
from dsv3_jax.inference.scoring import score


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def texts(tiny_checkpoint):
    src, ids, _ = heldout_documents(tiny_checkpoint)
    return [src[i] for i in ids[:12]]


@pytest.mark.parametrize("length", [64, 300])
def test_needle_sits_at_the_asked_depth_and_length(tok, texts, length):
    stream = haystack_stream(tok, texts, length)
    rng = np.random.default_rng(0)
    prefix = tok.encode(PREFIX)
    for depth in range(0, 101, 10):
        t = make_trial(tok, stream, length, depth, rng)
        needle = prefix + t.answer
        n_hay = length - 1 - len(needle) - len(prefix)
        assert len(t.tokens) == length and t.tokens[0] == tok.bos_id
        assert t.needle_start == 1 + round(depth / 100 * n_hay)
        assert t.tokens[t.needle_start:t.needle_start + len(needle)] == needle
        assert t.tokens[-len(prefix):] == prefix                       # the question ends the prompt
        hay = t.tokens[1:t.needle_start] + t.tokens[t.needle_start + len(needle):-len(prefix)]
        assert len(hay) == n_hay and any(hay == stream[s:s + n_hay] for s in range(len(stream) - n_hay + 1))
        key = tok.decode(t.answer)
        assert len(key) == 6 and key[:5].isdigit() and key[5] == "\n"
    assert "def " in tok.decode(stream) or "import" in tok.decode(stream)  # real code
    with pytest.raises(dsv3.Dsv3Error, match="depth"):
        make_trial(tok, stream, length, 110, rng)


class _Oracle:
    """A stand-in generator: answers the needle by copying it from the prompt, except in prompts of
    ``blind_len`` tokens whose needle is not at the very start, where it answers garbage."""
    def __init__(self, tok, blind_len: int = 0):
        self.prefix, self.blind_len = tok.encode(PREFIX), blind_len

    def __call__(self, prompts, max_new_tokens, **_):
        out = []
        for p in prompts:
            n = len(self.prefix)
            i = next(i for i in range(len(p) - n) if p[i:i + n] == self.prefix)
            ans = p[i + n:i + n + max_new_tokens]
            out.append([0] * max_new_tokens if len(p) == self.blind_len and i > 1 else ans)
        return types.SimpleNamespace(tokens=out)


def test_needle_grid_is_scored_per_length_and_depth(tok, texts):
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_position_embeddings=512))
    res = needle_eval(model, tok, texts, lengths=[64, 256], depths=[0, 50, 100], trials=3, generator=_Oracle(tok))
    assert res.to_json() == {"lengths": [64, 256], "depths": [0, 50, 100], "accuracy": [[1.0] * 3, [1.0] * 3]}
    res = needle_eval(model, tok, texts, lengths=[64, 256], depths=[0, 50, 100], trials=3,
                      generator=_Oracle(tok, blind_len=256))
    assert res.accuracy == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]   # [length][depth]
    with pytest.raises(dsv3.Dsv3Error, match="context"):
        needle_eval(model, tok, texts, lengths=[510], depths=[0], generator=_Oracle(tok))


def test_fim_samples_and_exact_match(tok, texts):
    samples = fim_samples(texts, 8, seed=0)
    assert len(samples) == 8
    for s in samples:
        assert s.middle.endswith("\n") and s.middle.count("\n") == 1 and s.middle.strip()
        assert s.prefix.lstrip().startswith(("def ", "async def ", "@"))
        p = fim_prompt(tok, s)
        assert p[:2] == [tok.bos_id, tok.fim_begin_id] and p[-1] == tok.fim_end_id and tok.fim_hole_id in p
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_position_embeddings=4096))
    by_prompt = {tuple(fim_prompt(tok, s)): s.middle for s in fim_samples(texts, 24, seed=0)}

    def oracle(right):
        def gen(prompts, max_new_tokens, stop_tokens, **_):
            return types.SimpleNamespace(tokens=[(tok.encode(by_prompt[tuple(p)]) if right else [5, 6])
                                                 + [tok.eos_id] for p in prompts])
        return gen
    assert fim_eval(model, tok, texts, n=6, generator=oracle(True)).to_json() == {"exact_match": 1.0, "n": 6}
    assert fim_eval(model, tok, texts, n=6, generator=oracle(False)).to_json() == {"exact_match": 0.0, "n": 6}


def test_perplexity_matches_the_scoring_path(tiny_checkpoint, tok, texts):
    """Windows: a 5-token document in windows of 3 → [a b c] [d e pad], 2 + 1 predicted tokens. The
    perplexity equals exp(mean NLL) from dsv3_jax.inference.scoring on the same windows (rtol 1e-5)."""
    w, m = windows([[1, 2, 3, 4, 5], [7]], 3, pad_id=0)
    np.testing.assert_array_equal(w, [[1, 2, 3], [4, 5, 0]])
    np.testing.assert_array_equal(m, [[1, 1], [1, 0]])
    _, model = dsv3.load_checkpoint(tiny_checkpoint)
    res = perplexity(model, tok, texts[:3], seq_len=64, batch_size=4, max_tokens=500)
    docs = [[tok.bos_id] + ids + [tok.eos_id] for ids in tok.encode_batch(texts[:3])]
    w, m = windows(docs, 64, tok.pad_id, 500)
    nll = score(model, w).nll
    assert res.tokens == int(m.sum()) >= 500
    np.testing.assert_allclose(res.ppl, np.exp((nll * m).sum() / m.sum()), rtol=1e-5)


def _eval(capsys, *args):
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def test_eval_commands_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    c = str(tiny_checkpoint)
    code, lines, err = _eval(capsys, "ppl", "--checkpoint", c, "--seq-len", "64", "--max-tokens", "300",
                             "--plot", str(tmp_path / "ppl.png"), "--json")
    assert code == 0, err
    ppl = json.loads(lines[-1])
    assert set(ppl) == {"ppl", "tokens"} and ppl["tokens"] >= 300 and 1 < ppl["ppl"] < 1e4
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    code, lines, err = _eval(capsys, "ppl", "--checkpoint", c, "--seq-len", "64", "--max-tokens", "300", "--ema", "--json")
    assert code == 0, err
    assert json.loads(lines[-1])["ppl"] != ppl["ppl"]      # the EMA item holds other weights
    code, lines, err = _eval(capsys, "needle", "--checkpoint", c, "--lengths", "64,128", "--depths", "0,50,100",
                             "--trials", "2", "--plot", str(tmp_path / "n.png"), "--json")
    assert code == 0, err
    nd = json.loads(lines[-1])
    assert set(nd) == {"lengths", "depths", "accuracy"} and nd["lengths"] == [64, 128] and nd["depths"] == [0, 50, 100]
    assert np.shape(nd["accuracy"]) == (2, 3) and all(0 <= a <= 1 for r in nd["accuracy"] for a in r)
    assert (tmp_path / "n.png").stat().st_size > 1000
    code, lines, err = _eval(capsys, "fim", "--checkpoint", c, "--n", "4", "--json")
    assert code == 0, err
    fm = json.loads(lines[-1])
    assert set(fm) == {"exact_match", "n"} and fm["n"] == 4 and 0 <= fm["exact_match"] <= 1
    code, _, err = _eval(capsys, "needle", "--checkpoint", c, "--lengths", "600")
    assert code == 2 and "context of 512" in err


def test_eval_ema_missing_is_one_line(tmp_path, checkpoint_writer, capsys):
    c = checkpoint_writer(tmp_path, ema_scale=None)
    code, _, err = _eval(capsys, "fim", "--checkpoint", str(c), "--ema")
    assert code == 2 and "no parameter EMA" in err and "fix:" in err


def test_score_and_generate_take_ema(tiny_checkpoint, capsys):
    """``--ema`` reads ema/ (here the parameters × 0.5): other NLLs than the weights', same shape."""
    args = ["score", "--checkpoint", str(tiny_checkpoint), "--text", "def f(x):\n    return x", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--ema"]) == 0
    ema = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ema["scored_tokens"] == plain["scored_tokens"] and ema["mean_nll"] != plain["mean_nll"]
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt-ids", "0,9,10", "--max-new-tokens", "3",
                 "--ema", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) <= 3


@pytest.mark.parametrize("argv, needle", [
    (["ppl", "--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["needle", "--checkpoint", "{c}", "--lengths", "12x"], "comma list of integers"),
    (["ppl", "--checkpoint", "{c}", "--plot", "{tmp}/nll.jpg"], "PNG"),
    (["ppl", "--checkpoint", "{c}", "--plot", "{tmp}/no/such/dir/nll.png"], "does not exist"),
    (["ppl", "--checkpoint", "{c}", "--seq-len", "9999"], "context"),
    (["fim", "--checkpoint", "{c}", "--val-fraction", "0"], "held-out fraction"),
])
def test_eval_bad_input_is_one_line(argv, needle, tiny_checkpoint, tmp_path, capsys):
    argv = [a.format(c=tiny_checkpoint, tmp=tmp_path) for a in argv]
    code, _, err = _eval(capsys, *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_eval_ppl_on_a_mesh_equals_one_device(tiny_checkpoint, capsys):
    """--mesh data=2,expert=4 (8 CPU devices, expert-parallel MoE): the same perplexity (rtol 1e-5)."""
    args = ["ppl", "--checkpoint", str(tiny_checkpoint), "--seq-len", "64", "--max-tokens", "200", "--json"]
    code, one, err = _eval(capsys, *args)
    assert code == 0, err
    code, mesh, err = _eval(capsys, *args, "--mesh", "data=2,expert=4")
    assert code == 0, err
    a, b = json.loads(one[-1]), json.loads(mesh[-1])
    assert a["tokens"] == b["tokens"] and b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
