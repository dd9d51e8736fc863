"""Document-level FIM (PSM) and document encoding: exact format, rate, determinism."""
import numpy as np
import pytest

from dsv3_jax.data import DEEPSEEK_SPECIAL_TOKENS as SP, encode_document, fim_rng, format_fim, maybe_fim, train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def tok():
    corpus = [TEXT * 3, "import numpy as np\n\nx = np.zeros((3, 4), dtype=np.float32)  # ünï\n" * 5]
    return train_tokenizer(corpus, 400)


def test_fim_split_pinned():
    # numpy's SeedSequence + PCG64 streams are stable across versions: these split points are the contract
    # for (seed 1234, documents 1 and 2, epoch 0).
    assert maybe_fim(TEXT, fim_rng(1234, 1), 1.0) == ("def add(a, b)", ":\n    return ", "a + b\n")
    assert maybe_fim(TEXT, fim_rng(1234, 2), 1.0) == ("def add(a, b):\n ", "   re", "turn a + b\n")
    assert maybe_fim(TEXT, fim_rng(1234, 1), 0.0) is None
    with pytest.raises(ValueError, match="fim_rate"):
        maybe_fim(TEXT, fim_rng(0, 0), 1.5)


def test_fim_format_exact(tok):
    for idx in range(20):
        ids = encode_document(TEXT, tok, fim_rate=1.0, seed=1234, doc_index=idx)
        pre, mid, suf = maybe_fim(TEXT, fim_rng(1234, idx), 1.0)
        assert pre + mid + suf == TEXT
        assert ids.dtype == np.int32
        expected = ([tok.bos_id, tok.fim_begin_id] + tok.encode(pre) + [tok.fim_hole_id] + tok.encode(suf)
                    + [tok.fim_end_id] + tok.encode(mid) + [tok.eos_id])
        assert ids.tolist() == expected
        assert tok.decode(ids) == SP.bos + format_fim(pre, mid, suf)
        assert tok.decode(ids) == f"{SP.bos}<｜fim▁begin｜>{pre}<｜fim▁hole｜>{suf}<｜fim▁end｜>{mid}<｜end▁of▁sentence｜>"
    ids = encode_document(TEXT, tok, fim_rate=1.0, seed=1234, doc_index=1, add_bos=False)
    assert tok.decode(ids) == format_fim("def add(a, b)", ":\n    return ", "a + b\n")


def test_no_fim_format_exact(tok):
    for idx in range(5):
        ids = encode_document(TEXT, tok, fim_rate=0.0, seed=1234, doc_index=idx)
        assert ids.tolist() == [tok.bos_id] + tok.encode(TEXT) + [tok.eos_id]
    assert encode_document(TEXT, tok, fim_rate=0.0, add_bos=False).tolist() == tok.encode(TEXT) + [tok.eos_id]


def test_fim_rate_and_determinism(tok):
    n = 2000
    docs = [f"x_{i} = {i} * 2\n" for i in range(n)]
    enc = [encode_document(d, tok, fim_rate=0.1, seed=7, doc_index=i) for i, d in enumerate(docs)]
    fim = np.array([e[1] == tok.fim_begin_id for e in enc])
    assert 0.08 < fim.mean() < 0.12          # binomial(2000, 0.1): sd 0.0067
    assert all(tok.decode(e, skip_special_tokens=True) == d for e, d in zip(enc, docs) if e[1] != tok.fim_begin_id)
    again = [encode_document(docs[i], tok, fim_rate=0.1, seed=7, doc_index=i) for i in range(50)]
    assert all((a == b).all() for a, b in zip(again, enc))
    # Another epoch (or seed) draws anew.
    other = [encode_document(docs[i], tok, fim_rate=0.1, seed=7, doc_index=i, epoch=1) for i in range(200)]
    assert any(a.tolist() != b.tolist() for a, b in zip(other, enc))


def test_split_points_uniform_on_characters():
    text = "αβγδε"                               # multi-byte characters are never cut
    counts = np.zeros(len(text) + 1)
    for i in range(3000):
        pre, mid, suf = maybe_fim(text, fim_rng(0, i), 1.0)
        assert pre + mid + suf == text
        counts[len(pre)] += 1
        counts[len(pre) + len(mid)] += 1
    # Each of the 6 positions gets ~1/6 of the 6000 boundary draws.
    assert np.all(np.abs(counts / counts.sum() - 1 / 6) < 0.03)
