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


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="run on a device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; "
                                  "one may be -1). On CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    p.add_argument("--ep-strategy", default="allgather", choices=("allgather", "ragged_a2a", "a2a_capacity"),
                   help="expert-parallel strategy on the mesh (default allgather)")


def cmd_info(args) -> int:
    from .info import format_info, mesh_memory, model_info
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


def cmd_convert(args) -> int:
    from .checkpoint import convert
    if args.direction == "hf-to-orbax":
        cfg = convert.hf_to_orbax(args.src, args.dst, dtype=args.dtype, include_mtp=not args.no_mtp,
                                  keep_fp8=args.keep_fp8, overwrite=args.overwrite,
                                  progress=False if args.quiet else None)
        print(f"wrote {args.dst} ({cfg.name}: {cfg.num_layers} layers, {cfg.num_mtp_layers} MTP, {args.dtype})")
    else:
        convert.orbax_to_hf(args.src, args.dst, fp8_weights=args.fp8, include_mtp=not args.no_mtp,
                            max_shard_bytes=int(args.max_shard_size * 2**30), overwrite=args.overwrite,
                            progress=False if args.quiet else None)
        print(f"wrote {args.dst} (Hugging Face layout{', FP8 weights' if args.fp8 else ''})")
    return 0


def cmd_score(args) -> int:
    import numpy as np
    from .checkpoint.orbax_io import load_checkpoint
    from .scoring import score, tokenize
    if args.token_ids:
        try:
            tokens = np.load(args.token_ids)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read --token-ids {args.token_ids}: {e}") from None
        if not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"--token-ids {args.token_ids} holds {tokens.dtype}, expected integer ids "
                             "(fix: save an int32 [batch, seq] array).")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise InputError(f"--token-ids {args.token_ids} has shape {tokens.shape}, expected [batch, seq].")
    else:
        tokens = tokenize(args.checkpoint, args.text)
    mesh = None
    if args.mesh:
        from sharding import check_batch, expert_parallel, make_mesh
        mesh = make_mesh(args.mesh)
        check_batch(tokens.shape[0], mesh)
    cfg, model = load_checkpoint(args.checkpoint, mesh=mesh, overrides=args.overrides)
    if mesh is not None:
        expert_parallel.enable(model, mesh, args.ep_strategy)
    want_mtp = args.save_mtp_logits is not None
    if want_mtp and not cfg.num_mtp_layers:
        raise InputError(f"{args.checkpoint} has no MTP module, so there are no MTP logits to save.")
    res = score(model, tokens, mtp=want_mtp)
    if args.save_logits:
        np.save(args.save_logits, res.logits)
    if want_mtp:
        np.save(args.save_mtp_logits, res.mtp_logits)
    summary = {"batch": int(tokens.shape[0]), "seq": int(tokens.shape[1]), "scored_tokens": int(res.nll.size),
               "mean_nll": res.mean_nll, "perplexity": res.perplexity}
    if args.json:
        print(json.dumps({**summary, "nll": res.nll.tolist()}))
    else:
        print(f"{summary['scored_tokens']} tokens scored: mean NLL {summary['mean_nll']:.4f} nats, "
              f"perplexity {summary['perplexity']:.3f}")
        for b, row in enumerate(res.nll):
            print(f"  [{b}] " + " ".join(f"{x:.3f}" for x in row))
    return 0


def cmd_train(args) -> int:
    from .train import load_run_config
    from .train.trainer import train
    overrides = list(args.overrides)
    if args.mesh:
        overrides.append(f"train.mesh={args.mesh}")
    if args.balance:
        overrides.append(f"train.balance={args.balance}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    run = load_run_config(args.config, overrides)
    res = train(run, log=lambda m: print(m, file=sys.stderr, flush=True))
    keep = ("step", "loss", "ce", "mtp", "balance", "eval_loss", "skipped", "tokens_per_s", "mfu", "checkpoint")
    print(json.dumps({k: res[k] for k in keep if k in res}))
    return 0


def cmd_tokenizer(args) -> int:
    from .data.tokenizer import tokenizer_train_main
    return tokenizer_train_main(args.args)


class InputError(ValueError):
    """Bad command-line input (a file that cannot be read, a wrong shape...)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX: inspect, train, convert, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, KV-cache bytes and FLOPs of a config (nothing allocated)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs")
    p.add_argument("--mesh", help="report per-device bytes of params and AdamW state on this mesh, "
                                  "e.g. expert=64,fsdp=4 (any size: nothing is allocated)")
    p.add_argument("--moment-bytes", type=int, default=4, choices=(2, 4),
                   help="bytes per AdamW moment element (2 = bf16 moments, SPEC §6)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert weights: hf-to-orbax (released/HF → our Orbax checkpoint) "
                                       "or orbax-to-hf")
    csub = p.add_subparsers(dest="direction", required=True)
    c = csub.add_parser("hf-to-orbax", help="HF model dir (safetensors, FP8 or not) or PyTorch .bin/.pt → Orbax")
    c.add_argument("src", help="HF model directory (config.json + safetensors) or a .bin/.pt state dict")
    c.add_argument("dst", help="output checkpoint directory (must not exist unless --overwrite)")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="stored parameter dtype")
    c.add_argument("--keep-fp8", action="store_true", help="store linear weights as e4m3 + 128x128 block scales (FP8 sources bit for bit): half the size of bf16; inference only")
    c.add_argument("--no-mtp", action="store_true", help="drop the MTP module (model.layers.{num_layers}.*)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)
    c = csub.add_parser("orbax-to-hf", help="our Orbax checkpoint → HF layout (sharded safetensors + index + config)")
    c.add_argument("src", help="checkpoint directory written by hf-to-orbax")
    c.add_argument("dst", help="output HF model directory (must not exist unless --overwrite)")
    c.add_argument("--fp8", action="store_true", help="FP8 e4m3 linear weights with 128x128 weight_scale_inv")
    c.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    c.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    p = sub.add_parser("score", help="per-token NLL and perplexity of token ids or text under a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (dsv3 convert hf-to-orbax)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token-ids", help="int32 .npy of shape [batch, seq]")
    g.add_argument("--text", help="text, tokenized with the checkpoint's tokenizer.json")
    p.add_argument("--save-logits", metavar="OUT.npy", help="save float32 logits [batch, seq, vocab]")
    p.add_argument("--save-mtp-logits", metavar="OUT.npy",
                   help="save float32 MTP logits [mtp_depth, batch, seq, vocab]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_mesh_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="runtime config overrides, e.g. compute_dtype=float32 moe_impl=ragged")
    p.set_defaults(func=cmd_score)

    from .inference.cli import add_parser as add_generate
    add_generate(sub)

    p = sub.add_parser("train", help="pre-train (CE + MTP + balance loss, aux-loss-free bias, AdamW, Orbax resume)")
    p.add_argument("--config", default="demo",
                   help="run config NAME/PATH (model/train/data sections, e.g. configs/demo.yaml) or a model config")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (default: one device)")
    p.add_argument("--balance", choices=["aux_free", "aux_loss", "none"],
                   help="router balancing: aux-loss-free bias update (+α loss), α loss only, or none")
    p.add_argument("--output-dir", help="run directory: checkpoints/, metrics.jsonl, tensorboard/ (resumes if present)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. steps=200 train.lr=1e-3 data.path=corpus/ model.n_routed_experts=32")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer (see `dsv3 tokenizer train --help`)",
                        add_help=False)
    t.add_argument("args", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_tokenizer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["tokenizer", "train"]:  # its own parser (data/tokenizer.py), options included
        from .data.tokenizer import tokenizer_train_main
        return tokenizer_train_main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dsv3 {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: BaseException) -> bool:
    """Errors with a sentence for the user (bad files, bad ids), as opposed to bugs."""
    from .checkpoint.fp8 import FP8FormatError
    from .checkpoint.hf_source import CheckpointError
    from .checkpoint.mapping import MappingError
    from .checkpoint.safetensors_io import SafetensorsError
    from .model import TokenRangeError
    from .scoring import TokenizerMissingError
    from .inference.generate import GenerationError
    if isinstance(e, GenerationError):
        return True
    from sharding import MeshError
    if isinstance(e, MeshError) or (isinstance(e, ValueError) and "not divisible by the" in str(e)):
        return True
    return isinstance(e, (CheckpointError, MappingError, SafetensorsError, FP8FormatError, TokenRangeError,
                          TokenizerMissingError, InputError))


if __name__ == "__main__":
    sys.exit(main())
