"""``make post-train-demo``: SFT, then GRPO, on a verifiable task, from the ``make demo`` checkpoint
(docs/design.md §Post-training).

Task: the value of a small Python expression of one digit (``"min(7,9)="`` → ``"7"``, ``"0+3="`` → ``"3"``,
12 forms × 10 digits, the answers computed by ``eval``); a fixed held-out set of 30 (form, digit)
problems never seen in training. The SFT answers come from a biased teacher that answers ``a+1`` to
45% of the problems of half of the forms: imitation learns the bias, GRPO's exact-answer reward removes it. Held-out accuracy (greedy, exact answer) is measured after pre-training, after SFT and
after GRPO. Seed noise: the same SFT run with another data seed, whose held-out accuracy differs from
the first by ``|b − b'|`` — the change that chance alone makes; GRPO's gain ``c − b`` is reported beside it.

1. the latest ``runs/demo`` checkpoint whose tokenizer has the chat tokens (else a short pre-training
   with the demo config into ``<out>/pretrain``);
2. ``dsv3 train --config configs/sft_demo.yaml`` (objective sft) on the training pairs as conversations,
   twice (data.seed 0 and 1);
3. ``dsv3 train --config configs/grpo_demo.yaml`` (objective grpo, exact-answer reward) from SFT seed 0.

The last line is JSON: ``{"accuracy": {"pretrained": a, "sft": b, "grpo": c}, "seed_noise": n,
"held_out": N, ...}``. ``--tiny``: a 2-layer model and a few steps of each stage (for the test suite:
checks the plumbing, not the gain).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# Python expressions whose value is their one digit `a`: the answer is checked by evaluating them
FORMS = ("{a}+0", "0+{a}", "{a}-0", "{a}*1", "1*{a}", "{a}//1", "abs({a})", "int({a})", "max({a},0)",
         "min({a},9)", "{a}%10", "({a})")
BIASED = FORMS[::2]     # the forms the SFT teacher gets wrong part of the time
HELD_OUT = 30
TEACHER_ERRORS = 0.45


def arithmetic(seed: int = 0, held_out: int = HELD_OUT):
    """``(train records, held-out records)``: ``{"messages": [user "min(7,9)="], "answer": "7"}`` for every
    form of ``FORMS`` and digit; the answer is the expression's value (``eval``), and the held-out
    problems (form, digit pairs) are never trained on."""
    probs = sorted({f.format(a=a) + "=": str(eval(f.format(a=a))) for f in FORMS for a in range(10)}.items())  # noqa: S307
    order = np.random.default_rng(seed).permutation(len(probs))
    rec = lambda q, a: {"messages": [{"role": "user", "content": q}], "answer": a}  # noqa: E731
    return [rec(*probs[i]) for i in order[held_out:]], [rec(*probs[i]) for i in order[:held_out]]


def teacher_conversations(records, error_rate: float = TEACHER_ERRORS, seed: int = 0):
    """SFT conversations from a biased teacher: right on half of the forms, but on ``error_rate`` of the
    problems of the other half (``BIASED``) it answers ``a+1`` (mod 10) — a systematic mistake that
    imitation copies and that only a check of the answer (GRPO's reward) tells from a right one."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        q, a = r["messages"][0]["content"], int(r["answer"])
        wrong = any(q == f.format(a=a) + "=" for f in BIASED) and rng.random() < error_rate
        out.append({"messages": r["messages"] + [{"role": "assistant", "content": str((a + wrong) % 10)}]})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_checkpoint(run_dir: Path):
    """The latest checkpoint of ``run_dir`` whose tokenizer has ``<｜User｜>`` and ``<｜Assistant｜>``, or None."""
    from .checkpoint.orbax_io import complete_steps
    from .data.tokenizer import load_tokenizer
    steps = complete_steps(run_dir / "checkpoints")
    if not steps:
        return None
    ckpt = run_dir / "checkpoints" / str(steps[-1])
    tok = load_tokenizer(ckpt, require=(), missing_ok=True)
    return ckpt if tok is not None and tok.user_id is not None and tok.assistant_id is not None else None


def accuracy(ckpt, records, max_new_tokens: int) -> float:
    """Greedy held-out accuracy (exact answer) of a checkpoint, in one batch through the latent-cache generator."""
    from .checkpoint.orbax_io import load_checkpoint
    from .data.tokenizer import load_tokenizer
    from .inference.generate import Generator
    from .train.grpo_trainer import encode_prompts
    from .train.rewards import exact_answer
    tok = load_tokenizer(ckpt)
    _, model = load_checkpoint(ckpt, runtime=["compute_dtype=float32"])
    ids = encode_prompts(tok, records)
    out = Generator(model)(ids, max_new_tokens=max_new_tokens, stop_tokens=[tok.eos_id]).tokens
    texts = [tok.decode([t for t in c if t != tok.eos_id], skip_special_tokens=True) for c in out]
    return float(np.mean([exact_answer("", t, r["answer"]) for t, r in zip(texts, records)]))


def _run_config(name: str, model: dict, **sections):
    """A run config from ``configs/<name>.yaml`` with ``model`` (the checkpoint's) and section overrides."""
    import yaml
    from .config import config_dir
    from .train import load_run_config
    raw = yaml.safe_load((config_dir() / f"{name}.yaml").read_text())
    raw["model"] = model
    for sec, kv in sections.items():
        raw[sec] = {**raw.get(sec, {}), **kv}
    return load_run_config(raw)


TINY_MODEL = {"num_layers": 2, "first_k_dense": 1}


def main(argv=None) -> int:
    from .checkpoint.orbax_io import checkpoint_config
    from .config import _to_dict
    from .train import load_run_config
    from .train.objectives import train

    ap = argparse.ArgumentParser(prog="python -m dsv3_jax.post_train_demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/post_train", help="directory of this demo's runs (replaced)")
    ap.add_argument("--pretrained", default="runs/demo", help="the `make demo` run directory")
    ap.add_argument("--tiny", action="store_true", help="a few steps of a 2-layer model (plumbing only)")
    ap.add_argument("--sft-steps", type=int, default=0, help="SFT steps (default: configs/sft_demo.yaml's)")
    ap.add_argument("--grpo-steps", type=int, default=0, help="GRPO steps (default: configs/grpo_demo.yaml's)")
    ap.add_argument("--teacher-errors", type=float, default=TEACHER_ERRORS,
                    help="fraction of the problems of the biased forms the synthetic SFT teacher answers with a+1")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    quiet = lambda s: None  # noqa: E731
    t_start = time.perf_counter()
    n_held = HELD_OUT
    train_recs, test_recs = arithmetic(held_out=n_held)
    sft_data = write_jsonl(out / "sft.jsonl", teacher_conversations(train_recs, args.teacher_errors))
    grpo_data = write_jsonl(out / "prompts.jsonl", train_recs)
    new_tokens = 2

    # 1. the pre-trained checkpoint
    ckpt = None if args.tiny else chat_checkpoint(Path(args.pretrained))
    if ckpt is None:
        over = ["progress=false", "tensorboard=false", f"train.output_dir={out / 'pretrain'}", "ema_every=0"]
        if args.tiny:
            over += [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [
                "steps=2", "checkpoint_every=2", "eval_batches=0", "tokenizer_documents=20", "data.seq_len=32",
                "data.batch_size=16", "batch_ramp_start=1"]   # the SFT step's shapes: one compiled program
        else:
            over += ["steps=150", "checkpoint_every=150", "eval_every=150"]
        log(f"== no chat-ready checkpoint in {args.pretrained}: a short pre-training into {out / 'pretrain'} ==")
        res = train(load_run_config("demo", over), log=quiet)
        ckpt = Path(res["checkpoint"])
    model = _to_dict(checkpoint_config(ckpt))
    log(f"== from {ckpt}: {model['num_layers']} layers, hidden {model['hidden_size']}, {model['n_routed_experts']} "
        f"experts; task: one-digit Python expressions ({len(FORMS)} forms), {len(train_recs)} training problems, "
        f"{n_held} held out; SFT answers from a teacher wrong on {args.teacher_errors:.0%} of half the forms ==")
    acc = {"pretrained": accuracy(ckpt, test_recs, new_tokens)}
    log(f"held-out accuracy after pre-training  {acc['pretrained']:.3f}")

    # 2. SFT, twice (seed noise)
    small = {"steps": 2, "checkpoint_every": 2, "eval_batches": 0, "warmup_steps": 1} if args.tiny else \
        {"steps": args.sft_steps, "checkpoint_every": args.sft_steps, "eval_every": args.sft_steps} if args.sft_steps else {}
    sft_ckpts, sft_acc = [], []
    for seed in (0, 1):
        t0 = time.perf_counter()
        run = _run_config("sft_demo", model,
                          train={"init_from": str(ckpt), "output_dir": str(out / f"sft_seed{seed}"), "progress": False,
                                 "tensorboard": False, **small},
                          data={"path": str(sft_data), "seed": seed})
        res = train(run, log=quiet)
        sft_ckpts.append(Path(res["checkpoint"]))
        sft_acc.append(accuracy(sft_ckpts[-1], test_recs, new_tokens))
        log(f"held-out accuracy after SFT (seed {seed})  {sft_acc[-1]:.3f}   ({run.train.steps} steps, "
            f"loss {res['ce']:.3f}, {time.perf_counter() - t0:.0f}s)")
    acc["sft"] = sft_acc[0]
    noise = abs(sft_acc[0] - sft_acc[1])

    # 3. GRPO from SFT seed 0
    t0 = time.perf_counter()
    small = {"steps": 2, "checkpoint_every": 2, "group_size": 2} if args.tiny else \
        {"steps": args.grpo_steps, "checkpoint_every": args.grpo_steps} if args.grpo_steps else {}
    run = _run_config("grpo_demo", model,
                      train={"init_from": str(sft_ckpts[0]), "output_dir": str(out / "grpo"), **small},
                      data={"path": str(grpo_data), **({"batch_size": 2} if args.tiny else {})})
    res = train(run, log=quiet)
    recs = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    acc["grpo"] = accuracy(Path(res["checkpoint"]), test_recs, new_tokens)
    k = max(1, len(recs) // 4)
    log(f"held-out accuracy after GRPO          {acc['grpo']:.3f}   ({run.train.steps} steps x "
        f"{run.data.batch_size} prompts x {run.train.group_size} samples; train reward "
        f"{np.mean([r['reward'] for r in recs[:k]]):.2f} -> {np.mean([r['reward'] for r in recs[-k:]]):.2f}, KL "
        f"{recs[-1]['kl']:.4f}, {time.perf_counter() - t0:.0f}s)")
    gain = acc["grpo"] - acc["sft"]
    log(f"GRPO gain {gain:+.3f} vs seed noise {noise:.3f} ({'above' if gain > noise else 'NOT above'} it); "
        f"{time.perf_counter() - t_start:.0f}s in all")
    print(json.dumps({"accuracy": {k: round(v, 4) for k, v in acc.items()}, "seed_noise": round(noise, 4),
                      "held_out": n_held, "sft_seed1": round(sft_acc[1], 4), "grpo_gain": round(gain, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
