"""``dsv3 info``: parameter counts, KV-cache bytes and FLOPs of a config (nothing allocated)."""
from __future__ import annotations

import json

from .common import add_config_args, int_arg


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, KV-cache bytes and FLOPs of a config (nothing allocated)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seq-len", type=int_arg(1, "--seq-len 4096"), default=4096, help="sequence length for the attention FLOPs")
    p.add_argument("--mesh", help="report per-device bytes of params and AdamW state on this mesh, "
                                  "e.g. expert=64,fsdp=4 (any size: nothing is allocated)")
    p.add_argument("--moment-bytes", type=int, default=4, choices=(2, 4),
                   help="bytes per AdamW moment element (2 = bf16 moments, docs/architecture.md §6)")
    p.add_argument("--batch-size", type=int_arg(1, "--batch-size 64"), default=None,
                   help="with --mesh stage=N: global sequences per step (default: one per micro-batch per batch shard)")
    p.add_argument("--act-bytes", type=int, default=None, choices=(2, 4),
                   help="with --mesh stage=N: bytes per stashed activation element (default: the parameters' dtype)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..info import format_info, mesh_memory, model_info
    from ..pipeline.memory import format_stage_memory, pipeline_overrides, stage_memory
    from sharding import MeshConfig
    pipe, overrides = pipeline_overrides(args.overrides)  # pipeline.schedule=... / pipeline.microbatches=...
    cfg = load_config(args.config, overrides)
    info = model_info(cfg, seq_len=args.seq_len)
    if args.mesh:
        info["mesh"] = mesh_memory(cfg, args.mesh, args.moment_bytes)
        if MeshConfig.parse(args.mesh).stage > 1:  # per-stage memory with the schedule's activations
            info["pipeline"] = stage_memory(cfg, args.mesh, **pipe, seq_len=args.seq_len, batch_size=args.batch_size,
                                            moment_bytes=args.moment_bytes, act_bytes=args.act_bytes)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_info(info))
        if args.mesh:
            m = info["mesh"]
            print(f"mesh {m['axes']} ({m['devices']} devices): params {m['param_bytes_per_device'] / 2**30:.2f} GiB "
                  f"+ optimizer {m['optimizer_bytes_per_device'] / 2**30:.2f} GiB per device")
            if "pipeline" in info:
                print(format_stage_memory(info["pipeline"]))
    return 0
