"""``dsv3 convert hf-to-orbax | orbax-to-hf``: weights between the Hugging Face layout (the release,
FP8 or not) and our Orbax checkpoint."""
from __future__ import annotations

import math
import os


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert weights: hf-to-orbax (released/HF → our Orbax checkpoint) "
                                       "or orbax-to-hf")
    csub = p.add_subparsers(dest="direction", required=True)
    c = csub.add_parser("hf-to-orbax", help="HF model dir (safetensors, FP8 or not) or PyTorch .bin/.pt → Orbax")
    c.add_argument("src", help="HF model directory (config.json + safetensors) or a .bin/.pt state dict")
    c.add_argument("dst", help="output checkpoint directory (must not exist unless --overwrite)")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="stored parameter dtype")
    c.add_argument("--keep-fp8", action="store_true", help="store linear weights as e4m3 + 128x128 block scales (FP8 sources bit for bit): half the size of bf16; inference only")
    c.add_argument("--no-mtp", action="store_true", help="drop the MTP module (model.layers.{num_layers}.*)")
    _safety_flags(c, "convert")
    c = csub.add_parser("orbax-to-hf", help="our Orbax checkpoint → HF layout (sharded safetensors + index + config)")
    c.add_argument("src", help="checkpoint directory written by hf-to-orbax")
    c.add_argument("dst", help="output HF model directory (must not exist unless --overwrite)")
    c.add_argument("--fp8", action="store_true", help="FP8 e4m3 linear weights with 128x128 weight_scale_inv")
    c.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    c.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard")
    _safety_flags(c, "export")


def _safety_flags(c, verb: str) -> None:
    """The flags both directions share: overwriting DST, non-finite weights, the progress bar."""
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists (never SRC or a directory "
                                                              "holding it: refused)")
    c.add_argument("--allow-nonfinite", action="store_true",
                   help=f"{verb} weights holding NaN/Inf anyway (refused by default, naming the tensor)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import convert
    from ..errors import CheckpointError
    dst = os.path.abspath(os.path.expanduser(args.dst))  # relative paths are the working directory's
    if args.direction == "hf-to-orbax":
        cfg = convert.hf_to_orbax(args.src, args.dst, dtype=args.dtype, include_mtp=not args.no_mtp,
                                  keep_fp8=args.keep_fp8, overwrite=args.overwrite,
                                  progress=False if args.quiet else None, allow_nonfinite=args.allow_nonfinite)
        print(f"wrote {dst} ({cfg.name}: {cfg.num_layers} layers, {cfg.num_mtp_layers} MTP, {args.dtype})")
    else:
        if not (math.isfinite(args.max_shard_size) and args.max_shard_size > 0):
            raise CheckpointError(f"--max-shard-size {args.max_shard_size}: must be a positive number of GiB "
                                  "(fix: use e.g. 5).")
        convert.orbax_to_hf(args.src, args.dst, fp8_weights=args.fp8, include_mtp=not args.no_mtp,
                            max_shard_bytes=max(1, int(args.max_shard_size * 2**30)), overwrite=args.overwrite,
                            progress=False if args.quiet else None, allow_nonfinite=args.allow_nonfinite)
        print(f"wrote {dst} (Hugging Face layout{', FP8 weights' if args.fp8 else ''})")
    return 0
