"""Sources and the grain pipeline: batches, resume exactness, sharding, validation split, vocab check."""
import json
import re
import sysconfig

import numpy as np
import pytest

from dsv3_jax.data import (FIELDS, DataConfig, JsonlSource, TextFileSource, check_token_ids, document_ids,
                           list_files, make_dataset, open_source, split_document_ids, stdlib_files,
                           train_tokenizer)

N_DOCS = 60


def _doc(i):
    body = "".join(f"    v{j} = v{j - 1} * {i} + {j}\n" for j in range(1, 1 + (i * 7) % 23))
    return f"# doc {i}:\ndef f_{i}(v0):\n{body}    return v0\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "part0.jsonl", "w") as f:
        for i in range(N_DOCS // 2):
            f.write(json.dumps({"id": i, "text": _doc(i)}) + "\n")
    with open(d / "part1.jsonl", "w") as f:
        for i in range(N_DOCS // 2, N_DOCS):
            f.write(json.dumps({"id": i, "text": _doc(i)}) + "\n\n")      # blank lines are skipped
    return d


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer([_doc(i) for i in range(N_DOCS)], 512)


def _cfg(corpus, **kw):
    base = dict(path=str(corpus), seq_len=32, batch_size=3, fim_rate=0.5, val_fraction=0.1, seed=3, read_threads=0)
    return DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in FIELDS)


def test_sources(corpus, tmp_path):
    src = open_source(corpus)
    assert isinstance(src, JsonlSource) and len(src) == N_DOCS
    assert [src[i] for i in (0, 31, 59)] == [_doc(0), _doc(31), _doc(59)]
    assert src.describe(31).endswith("part1.jsonl:3")
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    for name in ("b.txt", "a.py", "sub/c.txt", "sub/.hidden/d.txt", "sub/e.md"):
        (tmp_path / name).write_text(name)
    assert [p.relative_to(tmp_path).as_posix() for p in list_files(tmp_path)] == ["a.py", "b.txt", "sub/c.txt",
                                                                                  "sub/e.md"]
    txt = open_source(tmp_path, glob="**/*.txt")
    assert isinstance(txt, TextFileSource) and list(txt) == ["b.txt", "sub/c.txt"]
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.dat is not UTF-8"):
        open_source(tmp_path)[2]
    (tmp_path / "x.jsonl").write_text('{"meta": {"body": "hi"}}\n{"other": 1}\n')
    with pytest.raises(ValueError, match="mixes JSONL"):
        open_source(tmp_path)
    nested = open_source(tmp_path / "x.jsonl", text_field="meta.body")
    assert nested[0] == "hi"
    with pytest.raises(ValueError, match=r"x.jsonl:2: no text field 'meta.body'"):
        nested[1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "missing")


def test_stdlib_corpus():
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files()
    assert len(files) > 200 and all(f.suffix == ".py" and str(f).startswith(root) for f in files)
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts[-3:-1])
    assert files == sorted(files, key=lambda p: p.relative_to(root).as_posix())
    src = open_source("stdlib")
    assert len(src) == len(files) and "import" in src[files.index(next(f for f in files if f.name == "os.py"))]


def test_batches(corpus, tok):
    ds = make_dataset(_cfg(corpus), tok, shard_index=0, shard_count=1)
    batches = _take(iter(ds), 20)
    for b in batches:
        assert set(b) == set(FIELDS)
        assert all(v.shape == (3, 32) and v.dtype == np.int32 for v in b.values())
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        assert b["inputs"].max() < tok.vocab_size
    # Only a row's first piece can be a continuation: every later piece starts a document with BOS.
    later = np.concatenate([b["inputs"][(b["positions"] == 0) & (b["segment_ids"] > 1)] for b in batches])
    assert later.size > 5 and (later == tok.bos_id).all()
    assert any((b["inputs"] == tok.fim_begin_id).any() for b in batches)
    unmasked = _take(iter(make_dataset(_cfg(corpus, mask_documents=False), tok, shard_index=0, shard_count=1)), 5)
    for b in unmasked:
        assert set(np.unique(b["segment_ids"])) <= {0, 1}
        np.testing.assert_array_equal(b["positions"], np.tile(np.arange(32), (3, 1)))
    assert _same(batches[:5], _take(iter(make_dataset(_cfg(corpus), tok, shard_index=0, shard_count=1)), 5))
    other_seed = _take(iter(make_dataset(_cfg(corpus, seed=4), tok, shard_index=0, shard_count=1)), 5)
    assert not _same(batches[:5], other_seed)


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_from_state_is_exact(corpus, tok, threads):
    cfg = _cfg(corpus, read_threads=threads)
    it = iter(make_dataset(cfg, tok, shard_index=0, shard_count=1))
    # One epoch is ~30 batches here: resume points inside the first epoch, mid-document and across the
    # epoch boundary (where the order reshuffles and FIM draws anew).
    for n in (1, 7, 25):
        _take(it, n)
        state = json.loads(json.dumps(it.get_state()))       # a checkpoint is JSON
        expected = _take(it, 12)
        fresh = iter(make_dataset(cfg, tok, shard_index=0, shard_count=1))
        fresh.set_state(state)
        assert _same(_take(fresh, 12), expected)
    val = iter(make_dataset(cfg, tok, split="validation", shard_index=0, shard_count=1))
    _take(val, 2)
    state = val.get_state()
    rest = list(val)
    fresh = iter(make_dataset(cfg, tok, split="validation", shard_index=0, shard_count=1))
    fresh.set_state(state)
    assert _same(list(fresh), rest)


def _doc_numbers(batches, tok):
    """Document numbers (`# doc N:`) read from one pass of packed batches (docs shorter than a row)."""
    found = []
    for b in batches:
        for inp, tgt in zip(b["inputs"], b["targets"]):
            text = tok.decode(np.concatenate([inp, tgt[-1:]]))
            found += [int(m) for m in re.findall(r"# doc (\d+):", text)]
    return found


def test_sharding_and_validation_split(corpus, tok):
    cfg = _cfg(corpus, seq_len=512, fim_rate=0.0)
    assert max(len(tok.encode(_doc(i))) + 2 for i in range(N_DOCS)) <= 513     # no document is split
    train, val = split_document_ids(N_DOCS, cfg.val_fraction)
    assert len(val) == 6 and not set(train) & set(val) and sorted([*train, *val]) == list(range(N_DOCS))
    assert np.array_equal(split_document_ids(N_DOCS, 0.1)[1], val)           # independent of the seed
    shards = [document_ids(N_DOCS, cfg, shard_index=i, shard_count=3) for i in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == train.tolist()
    seen = []
    for i in range(3):
        batches = list(make_dataset(cfg, tok, shard_index=i, shard_count=3, num_epochs=1))
        docs = _doc_numbers(batches, tok)
        assert sorted(docs) == sorted(shards[i].tolist())          # each document once, in its own shard
        seen += docs
    assert sorted(seen) == train.tolist()                           # disjoint and covering
    val_batches = list(make_dataset(cfg, tok, split="validation", shard_index=0, shard_count=1))
    assert sorted(_doc_numbers(val_batches, tok)) == val.tolist()
    assert all(b["inputs"].shape == (3, 512) for b in val_batches)   # last batch padded with empty rows
    assert split_document_ids(10, 0.0)[1].size == 0 and split_document_ids(10, 0.01)[1].size == 1
    with pytest.raises(ValueError, match="shard_index 3"):
        document_ids(N_DOCS, cfg, shard_index=3, shard_count=3)
    with pytest.raises(ValueError, match="split must be"):
        document_ids(N_DOCS, cfg, "test", shard_index=0, shard_count=1)


def test_out_of_vocab_ids_raise(corpus, tok):
    with pytest.raises(ValueError, match=r"token id \d+ is outside the model vocabulary of size 9"):
        next(iter(make_dataset(_cfg(corpus), tok, vocab_size=9, shard_index=0, shard_count=1)))
    with pytest.raises(ValueError, match=r"token id 4 of the special token 'fim_begin'.*size 4"):
        make_dataset(_cfg(corpus), tok, vocab_size=4, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="token id -1 .* size 10"):
        check_token_ids(np.array([3, -1, 12]), 10)
    with pytest.raises(ValueError, match="token id 12 .* size 10"):
        check_token_ids(np.array([3, 12]), 10)
    check_token_ids(np.arange(10), 10)


def test_config_validation(corpus):
    with pytest.raises(ValueError, match="fim_rate"):
        DataConfig(fim_rate=1.5)
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_dataset(_cfg(corpus))
