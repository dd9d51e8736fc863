"""SFT data: packed conversations learn only their assistant tokens, attention stays inside a conversation,
and the iterator resumes exactly."""
import json

import numpy as np
import pytest

from dsv3_jax.data import DataConfig, iter_documents, stdlib_source, train_tokenizer
from dsv3_jax.data.conversations import SFTBatches, make_sft_dataset, open_conversations, write_conversations
from dsv3_jax.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter_documents(stdlib_source(), range(10)), 300)


def _convs(n=30):
    return [[{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{a + 3}="},
             {"role": "assistant", "content": str(2 * a + 3)}, {"role": "user", "content": "again?"},
             {"role": "assistant", "content": f"yes {2 * a + 3}"}][: 3 + 2 * (a % 2)] for a in range(n)]


def test_assistant_only_masks_on_packed_rows(tok, tmp_path):
    convs = _convs()
    path = write_conversations(tmp_path / "c.jsonl", convs)
    cfg = DataConfig(path=str(path), seq_len=40, batch_size=4, val_fraction=0.0, shuffle=False, read_threads=0)
    it = iter(make_sft_dataset(cfg, tok, shard_index=0, shard_count=1))
    by_inputs = {tuple(tok.encode_chat(c)[0][:-1]): c for c in convs}   # first-fit packing reorders
    seen = []
    for _ in range(3):
        b = next(it)
        for r in range(4):
            seg, inp, tgt, m, pos = (b[k][r] for k in ("segment_ids", "inputs", "targets", "loss_mask", "positions"))
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                conv = by_inputs[tuple(inp[idx].tolist())]
                seen.append(convs.index(conv))
                ids, mask = tok.encode_chat(conv)
                # one whole conversation per segment, positions from 0, shifted ids, mask = chat mask shifted
                assert inp[idx].tolist() == ids[:-1] and tgt[idx].tolist() == ids[1:]
                assert pos[idx].tolist() == list(range(len(idx)))
                assert m[idx].tolist() == mask[1:]
                learned = tok.decode(tgt[idx][m[idx] == 1])
                answers = [x["content"] for x in conv if x["role"] == "assistant"]
                assert learned == tok.special.eos.join(answers) + tok.special.eos
            assert not m[seg == 0].any()   # padding learns nothing
    assert len(seen) > 12 and len(set(seen)) == len(seen)   # several conversations share a row, none twice


def test_sft_batches_resume_and_long_conversations(tok, tmp_path):
    convs = _convs() + [[{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y " * 50}]]
    path = write_conversations(tmp_path / "c.jsonl", convs)
    cfg = DataConfig(path=str(path), seq_len=32, batch_size=4, val_fraction=0.1, read_threads=0)
    a = SFTBatches(cfg, tok)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    want = [next(a) for _ in range(4)]
    b = SFTBatches(cfg, tok)
    b.set_state(state)
    for w in want:
        g = next(b)
        assert all(np.array_equal(w[k], g[k]) for k in w)
    val = SFTBatches(cfg, tok, split="validation")
    assert next(val)["loss_mask"].sum() > 0


@pytest.mark.parametrize("line, needle", [("not json", "not valid JSON"), ('{"text": "x"}', "'messages' list"),
                                          ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0")])
def test_bad_sft_records(tok, tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    cfg = DataConfig(path=str(p), seq_len=16, batch_size=1, val_fraction=0.0, read_threads=0)
    with pytest.raises(DataError, match=needle):
        next(iter(make_sft_dataset(cfg, tok, shard_index=0, shard_count=1)))
    with pytest.raises(DataError, match="does not exist"):
        open_conversations(tmp_path / "missing.jsonl")
