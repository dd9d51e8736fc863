"""DeepSeek-V3's chat template: text rendering, ids with the assistant-only mask, malformed conversations,
and `dsv3 generate --chat` (with --jsonl-out, the sequence-level distillation data)."""
import json

import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.cli import main
from dsv3_jax.data import DEEPSEEK_SPECIAL_TOKENS as SP, iter_documents, stdlib_source, train_tokenizer
from dsv3_jax.data.tokenizer import render_chat
from dsv3_jax.errors import DataError

CONV = [{"role": "system", "content": "Be terse."}, {"role": "system", "content": "Answer in digits."},
        {"role": "user", "content": "12+30="}, {"role": "assistant", "content": "42"},
        {"role": "user", "content": "What is 7*6?"}, {"role": "assistant", "content": " 42, again."}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter_documents(stdlib_source(), range(20)), 320)


def test_render_matches_deepseek_template():
    # DeepSeek-V3's tokenizer_config chat_template: BOS, system prompts joined by a blank line, then
    # <｜User｜>u<｜Assistant｜>a<｜end▁of▁sentence｜> per exchange
    want = (f"{SP.bos}Be terse.\n\nAnswer in digits.{SP.user}12+30={SP.assistant}42{SP.eos}"
            f"{SP.user}What is 7*6?{SP.assistant} 42, again.{SP.eos}")
    assert render_chat(CONV) == want
    assert render_chat(CONV[2:3], add_generation_prompt=True) == f"{SP.bos}{SP.user}12+30={SP.assistant}"


def test_encode_chat_ids_and_assistant_mask(tok):
    ids, mask = tok.encode_chat(CONV)
    assert ids == tok.encode(render_chat(CONV), allow_special=True)   # turn by turn = whole text
    assert len(mask) == len(ids)
    learned = [t for t, m in zip(ids, mask) if m]
    # exactly the two answers and their closing EOS, nothing of the prompt or the markers
    assert learned == tok.encode("42") + [tok.eos_id] + tok.encode(" 42, again.") + [tok.eos_id]
    assert all(m == 0 for t, m in zip(ids, mask) if t in (tok.bos_id, tok.user_id, tok.assistant_id))
    gen, gmask = tok.encode_chat(CONV[:3], add_generation_prompt=True)
    assert gen[-1] == tok.assistant_id and not any(gmask)


@pytest.mark.parametrize("conv, needle", [
    ("hello", "list of"),
    ([{"role": "bot", "content": "x"}], "message 0"),
    ([{"role": "user", "content": 3}], "string 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system messages first"),
])
def test_bad_conversations(tok, conv, needle):
    with pytest.raises(DataError, match=needle):
        tok.encode_chat(conv)


def test_tokenizer_without_chat_tokens(tok, tmp_path):
    import tokenizers
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    vocab = backend.get_vocab()
    assert vocab[SP.user] == 6 and vocab[SP.assistant] == 7   # reserved by the trainer, after the FIM tokens
    from dsv3_jax.data.tokenizer import Tokenizer
    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    bare.add_special_tokens([SP.bos, SP.eos, SP.fim_hole, SP.fim_begin, SP.fim_end])
    t = Tokenizer(bare)
    assert t.user_id is None and t.pad_id == t.eos_id
    with pytest.raises(DataError, match="lacks the chat token"):
        t.encode_chat(CONV)


def test_generate_chat_cli(tok, tmp_path, capsys):
    from tests.hf_reference import write_checkpoint
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1"])
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    ckpt = write_checkpoint(model, tmp_path / "ckpt")
    tok.save(ckpt)
    out = tmp_path / "distill.jsonl"
    args = ["generate", "--checkpoint", str(ckpt), "--chat", "--prompt", "2+2=", "--system", "Be terse.",
            "--max-new-tokens", "5", "--json", "--jsonl-out", str(out), "compute_dtype=float32"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    prompt = tok.encode_chat([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2="}],
                             add_generation_prompt=True)[0]
    want = dsv3.generate(model, [prompt], max_new_tokens=5, stop_tokens=[tok.eos_id]).tokens[0]
    assert got["token_ids"] == want
    line = json.loads(out.read_text())
    assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
    assert line["messages"][-1]["content"] == tok.decode([t for t in want if t != tok.eos_id],
                                                         skip_special_tokens=True)
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "1,2", "--chat"]) == 2
    assert "--chat" in capsys.readouterr().err
