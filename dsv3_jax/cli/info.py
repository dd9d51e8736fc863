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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..info import format_info, mesh_memory, model_info
    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg, seq_len=args.seq_len)
    if args.mesh:
        info["mesh"] = mesh_memory(cfg, args.mesh, args.moment_bytes)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_info(info))
        if args.mesh:
            m = info["mesh"]
            print(f"mesh {m['axes']} ({m['devices']} devices): params {m['param_bytes_per_device'] / 2**30:.2f} GiB "
                  f"+ optimizer {m['optimizer_bytes_per_device'] / 2**30:.2f} GiB per device")
    return 0
