"""`make post-train-demo` in its tiny mode: every stage runs (pre-training, SFT twice, GRPO), each held-out
accuracy is measured, and the last line is the JSON the README documents. (The gain itself is the full
demo's: a few steps of a 2-layer model cannot show one.)"""
import json

from dsv3_jax import post_train_demo
from dsv3_jax.post_train_demo import arithmetic, teacher_conversations


def test_task_split_and_teacher():
    train, test = arithmetic()
    assert len(test) == post_train_demo.HELD_OUT and len(train) + len(test) == len(
        {f.format(a=a) for f in post_train_demo.FORMS for a in range(10)})   # distinct problems (0+0, 1*1 once)
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    assert all(r["answer"] == str(eval(r["messages"][0]["content"][:-1])) for r in train + test)
    conv = teacher_conversations(train, 0.45)
    biased = [any(r["messages"][0]["content"] == f.format(a=r["answer"]) + "=" for f in post_train_demo.BIASED)
              for r in train]
    wrong = [c["messages"][1]["content"] != r["answer"] for c, r in zip(conv, train)]
    assert not any(w and not b for w, b in zip(wrong, biased))          # the unbiased forms are always right
    assert 0.3 < sum(w for w, b in zip(wrong, biased) if b) / sum(biased) < 0.6


def test_tiny_demo_runs_every_stage(tmp_path, capsys):
    assert post_train_demo.main(["--tiny", "--out", str(tmp_path / "pt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res["accuracy"]) == {"pretrained", "sft", "grpo"} and res["held_out"] == post_train_demo.HELD_OUT
    assert all(0.0 <= v <= 1.0 for v in res["accuracy"].values()) and res["seed_noise"] >= 0
    recs = [json.loads(x) for x in (tmp_path / "pt" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all("reward" in r and "kl" in r for r in recs)
    assert any("after SFT (seed 1)" in x for x in lines)
