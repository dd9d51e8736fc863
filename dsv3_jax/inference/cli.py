"""``dsv3 generate``: sample from a checkpoint, streaming text to the terminal."""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (latent KV cache, optional MTP speculation)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (dsv3 convert / dsv3 train)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's tokenizer.json")
    g.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3 (for checkpoints without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", default="", help="comma-separated ids that end generation (default: the tokenizer's EOS)")
    p.add_argument("--speculative", choices=("mtp",), help="draft with the MTP module, verify with the main model")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (token_ids, text, steps, acceptance_rate) instead of streaming")
    p.add_argument("--mesh", help="run on a device mesh, e.g. data=2,expert=4 (expert-parallel MoE)")
    p.add_argument("--ep-strategy", default="allgather", choices=("allgather", "ragged_a2a", "a2a_capacity"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="runtime config overrides, e.g. compute_dtype=float32")
    p.set_defaults(func=cmd_generate)


def _ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}.") from None


def cmd_generate(args) -> int:
    from pathlib import Path

    from ..checkpoint.orbax_io import load_checkpoint
    from .generate import GenerationError, Generator

    tok = None
    tok_path = Path(args.checkpoint) / "tokenizer.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
    if args.prompt is not None:
        if tok is None:
            raise GenerationError(f"{args.checkpoint} has no tokenizer.json, so --prompt cannot be tokenized "
                                  "(fix: pass --prompt-ids 1,2,3).")
        prompt = tok.encode(args.prompt).ids
    else:
        try:
            prompt = _ids(args.prompt_ids, "--prompt-ids")
        except argparse.ArgumentTypeError as e:
            raise GenerationError(str(e)) from None
    stops = _ids(args.stop_ids, "--stop-ids") if args.stop_ids else []
    if not stops and tok is not None:
        eos = tok.token_to_id("<｜end▁of▁sentence｜>")
        stops = [eos] if eos is not None else []
    mesh = None
    if args.mesh:
        from sharding import make_mesh
        mesh = make_mesh(args.mesh)
    _, model = load_checkpoint(args.checkpoint, mesh=mesh, overrides=args.overrides)
    gen = Generator(model, mesh=mesh, ep_strategy=args.ep_strategy)
    streamed: list[int] = []

    def on_token(_: int, t: int) -> None:
        streamed.append(t)
        if not args.json:
            piece = tok.decode(streamed) if tok is not None else None
            prev = tok.decode(streamed[:-1]) if tok is not None else None
            sys.stdout.write(piece[len(prev):] if tok is not None else f"{t} ")
            sys.stdout.flush()

    if not args.json and tok is not None:
        sys.stdout.write(args.prompt if args.prompt is not None else tok.decode(prompt))
    t0 = time.perf_counter()
    res = gen([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_tokens=stops, speculative=args.speculative, on_token=on_token)
    dt = time.perf_counter() - t0
    ids = res.tokens[0]
    if args.json:
        out = {"token_ids": ids, "text": tok.decode(ids) if tok is not None else None, "steps": res.steps,
               "seconds": dt}
        if args.speculative:
            out["acceptance_rate"] = res.acceptance_rate
            out["tokens_per_step"] = res.tokens_per_step
        print(json.dumps(out))
    else:
        extra = f", MTP acceptance {res.acceptance_rate:.0%}" if args.speculative else ""
        print(f"\n[{len(ids)} tokens in {dt:.1f}s incl. compile{extra}]", file=sys.stderr)
    return 0
