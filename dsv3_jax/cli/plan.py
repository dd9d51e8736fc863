"""``dsv3 plan``: the real program (train step or serving step) compiled ahead of time for a TPU slice
from this machine, with the compiler's per-chip memory, FLOPs and collectives (see ``dsv3_jax.plan``)."""
from __future__ import annotations

import json
import os

from .common import add_overrides


def register(sub) -> None:
    p = sub.add_parser("plan", help="compile the train/prefill/decode step for a TPU slice (no TPU needed) and "
                                    "report per-chip memory, FLOPs, collectives")
    p.add_argument("--config", default="deepseek_v3_671b", help="model or run config NAME/PATH")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:2x2x2, v5p:8x8x4, v6e:4x4")
    p.add_argument("--mesh", required=True, help="mesh over the topology's chips, e.g. expert=64,fsdp=4 (one axis may be -1)")
    p.add_argument("--step", default="train", choices=("train", "prefill", "decode"))
    p.add_argument("--batch", type=int, help="sequences per step (default: one per batch shard)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (train, prefill)")
    p.add_argument("--context", type=int, default=32768, help="latent-cache length for --step decode")
    p.add_argument("--hbm-gib", type=float, help="compile against this much HBM per chip (e.g. 85 for headroom; "
                                                  "a small value answers 'how much would it need' quickly)")
    p.add_argument("--buffers", type=int, default=0, metavar="N",
                   help="also list the N largest buffers live at the compiler's memory peak")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_overrides(p, "model / runtime / train overrides, e.g. remat=full quant=fp8 moment_dtype=bfloat16")
    p.set_defaults(func=run)


def run(args) -> int:
    # Only compiling for the topology: keep this process's own jax on the CPU (no TPU probing).
    if not os.environ.get("JAX_PLATFORMS"):
        import jax
        jax.config.update("jax_platforms", "cpu")
    from ..plan import format_plan, plan
    from ..train import load_run_config
    run_cfg = load_run_config(args.config, args.overrides)
    p = plan(run_cfg.model, args.topology, args.mesh, step=args.step, batch=args.batch, seq=args.seq,
             runtime=run_cfg.runtime, train=run_cfg.train, context=args.context, hbm_gib=args.hbm_gib,
             buffers=args.buffers, pipeline=run_cfg.pipeline)
    print(json.dumps(p.as_dict()) if args.json else format_plan(p))
    return 0
