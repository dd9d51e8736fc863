"""FP8 training accuracy (issue M5, docs/architecture.md §6): the demo config trained with ``quant=fp8`` vs BF16.

Three runs of the same data order and step count, all with bf16 compute:

* ``bf16``      — quant=none, init seed 0 (the baseline);
* ``fp8``       — quant=fp8, init seed 0 (every Linear and the routed experts in FP8);
* ``bf16_seed1``— quant=none, init seed 1: the run-to-run spread a change of nothing but the random
  init causes, i.e. the noise floor any other perturbation (such as FP8 rounding) is measured against.

Prints one JSON line per run and a summary line: the relative final-loss difference FP8 vs BF16
(the report's goal: < 0.25%), the same for the seed change, and their ratio (≤ 1: FP8 moves the loss
no more than re-drawing the init does). Final loss = validation loss after the last step and the mean
training CE over the last 50 steps. ``--steps`` (default 300, as ``make demo``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import emit  # noqa: F401  (also puts the repo root on sys.path)

from dsv3_jax.train.config import load_run_config
from dsv3_jax.train.trainer import train


def run_one(label: str, overrides: list[str], out: Path, steps: int, tokenizer: Path | None) -> dict:
    ov = [f"train.steps={steps}", f"train.output_dir={out / label}", f"train.eval_every={steps}",
          f"train.checkpoint_every={steps}", "train.progress=false", "runtime.compute_dtype=bfloat16", *overrides]
    if tokenizer is not None:
        ov.append(f"data.tokenizer={tokenizer}")
    run = load_run_config("demo", ov)
    last = train(run, log=lambda *a, **k: None)
    recs = [json.loads(line) for line in (out / label / "metrics.jsonl").read_text().splitlines()
            if '"kind": "train"' in line]
    tail = [r["ce"] for r in recs[-50:]]
    res = {"bench": "fp8_training", "run": label, "steps": steps, "eval_loss": last["eval_loss"],
           "train_ce_last50": sum(tail) / len(tail)}
    emit(res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        base = run_one("bf16", ["train.seed=0"], out, args.steps, None)
        tok = out / "bf16" / "tokenizer.json"
        fp8 = run_one("fp8", ["train.seed=0", "runtime.quant=fp8"], out, args.steps, tok)
        seed = run_one("bf16_seed1", ["train.seed=1"], out, args.steps, tok)
    summary = {"bench": "fp8_training", "steps": args.steps}
    for key in ("eval_loss", "train_ce_last50"):
        d_fp8 = (fp8[key] - base[key]) / base[key]
        d_seed = (seed[key] - base[key]) / base[key]
        summary.update({f"{key}_rel_diff_fp8": round(d_fp8, 5), f"{key}_rel_diff_seed": round(d_seed, 5),
                        f"{key}_ratio_fp8_to_seed": round(abs(d_fp8) / max(abs(d_seed), 1e-9), 3)})
    summary["goal_rel_diff"] = 0.0025
    emit(summary)


if __name__ == "__main__":
    main()
