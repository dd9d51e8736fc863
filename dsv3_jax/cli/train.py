"""``dsv3 train``: pre-training from a run config (model/train/data/runtime sections) and overrides."""
from __future__ import annotations

import json
import sys

from .common import add_distributed_args, add_overrides


def register(sub) -> None:
    p = sub.add_parser("train", help="pre-train (CE + MTP + balance loss, aux-loss-free bias, AdamW, Orbax resume)")
    p.add_argument("--config", default="demo",
                   help="run config NAME/PATH (model/train/data sections, e.g. configs/demo.yaml) or a model config")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (default: one device)")
    p.add_argument("--balance", choices=["aux_free", "aux_loss", "none"],
                   help="router balancing: aux-loss-free bias update (+α loss), α loss only, or none")
    p.add_argument("--output-dir", help="run directory: checkpoints/, metrics.jsonl, tensorboard/ (resumes if present)")
    add_distributed_args(p)
    add_overrides(p, "e.g. steps=200 train.lr=1e-3 data.path=corpus/ model.n_routed_experts=32")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distributed import initialize_from_args, is_primary
    from ..data.sources import check_path
    from ..train.stages import load_stages
    from ..train.objectives import train  # the loop of train.objective (pre-training, SFT, GRPO)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    initialize_from_args(args, log)  # before anything touches a JAX backend
    overrides = list(args.overrides)
    if args.mesh:
        overrides.append(f"train.mesh={args.mesh}")
    if args.balance:
        overrides.append(f"train.balance={args.balance}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    runs = load_stages(args.config, overrides)   # one run, or the stages of a staged config (demo_long)
    keep = ("step", "loss", "ce", "mtp", "balance", "eval_loss", "skipped", "tokens_per_s", "mfu", "checkpoint")
    for i, run_cfg in enumerate(runs):
        check_path(run_cfg.data.path)  # before the model is built: a wrong path is reported in a second, not a minute
        if len(runs) > 1:
            log(f"== stage {i + 1}/{len(runs)}: {run_cfg.train.steps} steps of {run_cfg.data.batch_size}x"
                f"{run_cfg.data.seq_len} tokens into {run_cfg.train.output_dir} ==")
        res = train(run_cfg, log=log)
        if is_primary():
            print(json.dumps({**({"stage": i + 1} if len(runs) > 1 else {}), **{k: res[k] for k in keep if k in res}}))
    return 0
