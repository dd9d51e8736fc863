"""Tokenizer: training, lossless round trip on code, special tokens, save/load, DeepSeek layout, CLI."""
import json

import pytest
import tokenizers

from dsv3_jax.cli import main
from dsv3_jax.data import (DEEPSEEK_SPECIAL_TOKENS as SP, Tokenizer, iter_documents, load_tokenizer,
                           stdlib_source, train_tokenizer)

TRICKY = ("def f(x):\r\n\treturn x.y_z + 1234567  # ünïcødé 你好, カタカナ 🙂\n\n\n   \t\n"
          "s = '<｜end▁of▁sentence｜>' + \"<|x|>\"\\\n")


@pytest.fixture(scope="module")
def code():
    src = stdlib_source()
    return list(iter_documents(src, range(0, len(src), 50)))     # ~15 real stdlib files


@pytest.fixture(scope="module")
def tok(code):
    return train_tokenizer(code, 1024)


def test_special_ids_and_vocab(tok):
    assert tok.special_ids == {"bos": 0, "eos": 1, "pad": 2, "fim_hole": 3, "fim_begin": 4, "fim_end": 5,
                               "user": 6, "assistant": 7}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id) == (4, 3, 5)
    assert 256 + 6 < tok.vocab_size <= 1024
    assert SP.bos == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and SP.fim_hole == "<\uff5cfim\u2581hole\uff5c>"


def test_round_trip_on_code(tok, code):
    for text in code + [TRICKY, "", " ", "\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(code[0])) < len(code[0].encode()) / 2      # merges learned something


def test_pre_tokenizer_splits_punctuation_and_line_breaks(tok):
    def pieces(text):
        return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
    # As DeepSeek-V3's: digits in threes, punctuation runs apart from words (taking trailing line breaks),
    # line breaks apart from indentation. (Byte-level: "Ġ" is a space, "Ċ" a line feed.)
    assert pieces("x = foo.bar(1234)\n\nreturn") == ["x", "Ġ=", "Ġfoo", ".bar", "(", "123", "4", ")ĊĊ", "return"]
    assert pieces("a\n\n    b = 1\n") == ["a", "ĊĊ", "ĠĠĠ", "Ġb", "Ġ=", "Ġ", "1", "Ċ"]


def test_special_tokens_are_single_ids(tok):
    for role, token in SP.items():
        assert tok.encode(token, allow_special=True) == [tok.special_ids[role]]
    ids = tok.encode(f"{SP.bos}def f(): pass{SP.eos}", allow_special=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == f"{SP.bos}def f(): pass{SP.eos}"
    # By default special-token text in a document is plain text: no injected EOS, still lossless.
    plain = tok.encode(TRICKY)
    assert not set(plain) & set(tok.special_ids.values())
    assert tok.decode([tok.bos_id] + plain, skip_special_tokens=True) == TRICKY


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json" and path.is_file()
    for where in (tmp_path / "tok", path):
        back = load_tokenizer(where)
        assert back.special_ids == tok.special_ids and back.vocab_size == tok.vocab_size
        assert back.encode(TRICKY) == tok.encode(TRICKY)
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        load_tokenizer(tmp_path / "bad.json")


def _bare_tokenizer(code, specials):
    """A tokenizer trained without our wrapper; `specials` added afterwards (as in DeepSeek's file, where
    the FIM tokens sit at the end of the 128K vocabulary)."""
    t = tokenizers.Tokenizer(tokenizers.models.BPE())
    t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tokenizers.decoders.ByteLevel()
    t.train_from_iterator(code[:3], tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=[SP.bos, SP.eos], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(specials)
    return t


def test_load_deepseek_layout_and_missing_specials(code, tmp_path):
    t = _bare_tokenizer(code, [SP.pad, SP.fim_hole, SP.fim_begin, SP.fim_end])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    n = tok.vocab_size
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.pad_id, tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id) == (n - 4, n - 3, n - 2, n - 1)

    no_fim = _bare_tokenizer(code, [])
    no_fim.save(str(tmp_path / "nofim.json"))
    with pytest.raises(ValueError, match="fim_begin '<｜fim▁begin｜>'.*fim_end"):
        load_tokenizer(tmp_path / "nofim.json")
    no_pad = _bare_tokenizer(code, [SP.fim_hole, SP.fim_begin, SP.fim_end])
    assert Tokenizer(no_pad).pad_id == 1     # no pad token: padding uses EOS


def test_vocab_too_small():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], 100)


def test_dsv3_tokenizer_train(tmp_path, capsys):
    data = tmp_path / "corpus"
    (data / "pkg").mkdir(parents=True)
    (data / "a.py").write_text("import os\n\ndef main():\n    print(os.getcwd())\n" * 20)
    (data / "pkg" / "b.py").write_text("class Foo:\n    x: int = 1\n\n    def bar(self):\n        return self.x\n" * 20)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--output", str(out), "--vocab-size", "300", "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["documents"] == 2 and report["vocab_size"] <= 300
    tok = load_tokenizer(out)
    assert tok.vocab_size == report["vocab_size"] and tok.decode(tok.encode("def bar(self):")) == "def bar(self):"
    capsys.readouterr()
    assert main(["tokenizer", "train", "--output", str(out), "--vocab-size", "10", "--data", str(data)]) == 2
    assert "vocab_size 10 is too small" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--vocab-size", "300"]) == 2            # --output is required
    assert "--output" in capsys.readouterr().err
