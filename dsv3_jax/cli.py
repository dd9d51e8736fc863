"""``dsv3`` command line. Every subcommand has ``--help``; configs are ``--config NAME|PATH`` plus
``key=value`` overrides."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import ConfigError, list_configs, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny",
                   help=f"config NAME from configs/ ({', '.join(list_configs())}) or a path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config fields, e.g. n_routed_experts=32 rope_scaling.factor=8")


def cmd_info(args) -> int:
    from .info import format_info, model_info
    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX: inspect, train, convert, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, KV-cache bytes and FLOPs of a config (nothing allocated)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dsv3 {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
