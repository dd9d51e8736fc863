"""Ablations of the V3 design choices at the demo's scale (issue M15 deliverable 4; docs/design.md
§Recipe schedules). Not part of ``make test``: each run trains the demo config from scratch.

Runs (same data order, same steps, same tokens; each with ``--seeds`` init seeds):

* ``base``     — configs/demo.yaml as it is: MTP (λ 0.3 → 0.1), aux-loss-free balancing (+ α loss);
* ``no_mtp``   — λ = 0 (the MTP module is not run): (a) MTP on vs off, main-head validation loss;
* ``aux_loss`` — balancing by the α loss only, α = 1e-3 (no bias update): (b) validation loss and
  max/mean expert load;
* ``dense``    — every layer dense with an FFN as wide as the MoE layer's active experts
  (shared 1×48 + top-4 × 48 = 240): (c) equal active FLOPs per token in the main layers.

Every run prints one JSON line (validation loss of the main head over ``--eval-batches`` batches, mean
training CE of the last 20% of steps, the per-layer expert load max/mean of the validation batches);
then one line per comparison: the variant's mean over seeds, the base's, their difference and the
seed-to-seed spread of the base (max − min over seeds: the noise floor a difference must exceed).
FP8 vs BF16 (d) is ``benchmarks/fp8_training.py``. ``--needle CKPT_BEFORE CKPT_AFTER`` adds (e): the
needle grid of the demo checkpoint (its RoPE unchanged, context opened to the longest length) against
the long-context-extended one, at lengths beyond the pre-training length.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from common import emit  # noqa: F401  (also puts the repo root on sys.path)

from dsv3_jax.train.config import load_run_config
from dsv3_jax.train.trainer import train

VARIANTS = {
    "base": [],
    "no_mtp": ["train.mtp_weight=0"],
    "aux_loss": ["train.balance=aux_loss", "train.balance_alpha=1e-3"],
    "dense": ["model.first_k_dense=3", "model.intermediate_size=240"],
}


def run_one(variant: str, seed: int, out: Path, steps: int, eval_batches: int, tokenizer: Path | None) -> dict:
    label = f"{variant}_s{seed}"
    ov = [f"train.steps={steps}", f"train.seed={seed}", f"train.output_dir={out / label}", f"train.eval_every={steps}",
          f"train.eval_batches={eval_batches}", f"train.checkpoint_every={steps}", "train.progress=false",
          "train.tensorboard=false", "train.ema_every=0", *VARIANTS[variant]]
    if tokenizer is not None:
        ov.append(f"data.tokenizer={tokenizer}")
    last = train(load_run_config("demo", ov), log=lambda *a, **k: None)
    recs = [json.loads(line) for line in (out / label / "metrics.jsonl").read_text().splitlines()
            if '"kind": "train"' in line]
    tail = [r["ce"] for r in recs[-max(1, steps // 5):]]
    res = {"bench": "ablations", "variant": variant, "seed": seed, "steps": steps, "eval_loss": last["eval_loss"],
           "eval_tokens": last.get("eval_tokens"), "train_ce_tail": sum(tail) / len(tail),
           "eval_imbalance": last.get("eval_imbalance")}
    emit(res)
    return res


def compare(name: str, metric: str, base: list[dict], other: list[dict], what: str) -> None:
    b = [r[metric] for r in base]
    o = [r[metric] for r in other]
    emit({"bench": "ablations", "comparison": name, "metric": metric, "what": what, "ours": statistics.mean(b),
          "baseline": statistics.mean(o), "ratio": statistics.mean(b) / statistics.mean(o),
          "difference": statistics.mean(o) - statistics.mean(b), "noise_floor": max(b) - min(b),
          "seeds": len(b)})


def answer_nll(model, tok, texts, lengths: list[int], trials: int) -> list[float]:
    """Per length, the mean NLL (nats/token) of the needle's answer given the prompt, teacher-forced: a
    graded version of the needle accuracy for models too small to retrieve the key outright."""
    import numpy as np

    from dsv3_jax.eval.needle import haystack_stream, make_trial
    from dsv3_jax.inference.scoring import score
    rng = np.random.default_rng(1)
    stream = haystack_stream(tok, texts, max(lengths))
    out = []
    for L in lengths:
        vals = []
        for d in (0, 25, 50, 75, 100):
            for _ in range(trials):
                t = make_trial(tok, stream, L, d, rng)
                nll = score(model, [t.tokens + t.answer]).nll[0]
                vals.append(float(nll[-len(t.answer):].mean()))
        out.append(float(np.mean(vals)))
    return out


def needle(before: str, after: str, lengths: list[int], trials: int) -> None:
    from dsv3_jax.checkpoint.orbax_io import load_checkpoint
    from dsv3_jax.data.tokenizer import load_tokenizer
    from dsv3_jax.eval import heldout_documents, needle_eval
    from dsv3_jax.model import DeepSeekV3
    from flax import nnx
    res = {}
    for label, ckpt in (("before", before), ("after", after)):
        cfg, model = load_checkpoint(ckpt)
        if cfg.max_position_embeddings < max(lengths) + 16:   # the pre-trained model read past its length
            wide = DeepSeekV3(dataclasses.replace(cfg, max_position_embeddings=max(lengths) + 16), rngs=nnx.Rngs(0))
            nnx.update(wide, nnx.state(model))
            model = wide
        tok = load_tokenizer(ckpt)
        src, ids, _ = heldout_documents(ckpt)
        texts = [src[i] for i in ids]
        r = needle_eval(model, tok, texts, lengths=lengths, depths=[0, 25, 50, 75, 100], trials=trials)
        res[label] = r
        emit({"bench": "ablations", "needle": label, "checkpoint": ckpt, **r.to_json(),
              "answer_nll": answer_nll(model, tok, texts, lengths, trials)})
    mean = {k: statistics.mean(a for row in v.accuracy for a in row) for k, v in res.items()}  # noqa: B023
    emit({"bench": "ablations", "comparison": "long_context", "metric": "needle_accuracy", "ours": mean["after"],
          "baseline": mean["before"], "ratio": mean["after"] / mean["before"] if mean["before"] else None,
          "lengths": lengths})


def main() -> None:
    import jax
    # the runs of one variant differ only in their init seed: one compile, reused through the cache
    jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--needle", nargs=2, metavar=("BEFORE", "AFTER"), help="checkpoints for (e)")
    ap.add_argument("--needle-lengths", default="512,1024,2048")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    ap.add_argument("--base-from", metavar="LOG", help="reuse the base runs' JSON lines of an earlier run's output "
                                                      "(same --steps/--seeds) instead of training them again")
    a = ap.parse_args()
    if a.needle:
        needle(a.needle[0], a.needle[1], [int(x) for x in a.needle_lengths.split(",")], a.trials)
    variants = [v for v in a.variants.split(",") if v]
    if not variants:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        tokenizer = None
        runs: dict[str, list[dict]] = {}
        if a.base_from:
            runs["base"] = [r for r in map(json.loads, filter(str.strip, Path(a.base_from).read_text().splitlines()))
                            if r.get("variant") == "base" and r.get("steps") == a.steps][:a.seeds]
        for v in ([] if a.base_from else ["base"]) + [v for v in variants if v != "base"]:
            for s in range(a.seeds):
                runs.setdefault(v, []).append(run_one(v, s, out, a.steps, a.eval_batches, tokenizer))
                tokenizer = tokenizer or out / f"{v}_s{s}" / "tokenizer.json"   # one tokenizer for every run
        base = runs["base"]
        if "no_mtp" in runs:
            compare("mtp_on_vs_off", "eval_loss", base, runs["no_mtp"], "main-head validation loss")
        if "aux_loss" in runs:
            compare("aux_free_vs_aux_loss", "eval_loss", base, runs["aux_loss"], "validation loss")
            imb = lambda rs: [{"imb": max(r["eval_imbalance"] or [1.0])} for r in rs]  # noqa: E731
            compare("aux_free_vs_aux_loss", "imb", imb(base), imb(runs["aux_loss"]), "worst-layer max/mean expert load")
        if "dense" in runs:
            compare("moe_vs_dense", "eval_loss", base, runs["dense"], "validation loss at equal active FLOPs")


if __name__ == "__main__":
    main()
