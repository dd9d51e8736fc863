"""``dsv3 score`` (per-token NLL and perplexity) and ``dsv3 generate`` (sampling with the latent
cache, streaming text): the two commands that run a checkpoint."""
from __future__ import annotations

import json
import sys
import time

from .common import add_mesh_args, add_overrides


def register(sub) -> None:
    p = sub.add_parser("score", help="per-token NLL and perplexity of token ids or text under a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (dsv3 convert hf-to-orbax)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token-ids", help="int32 .npy of shape [batch, seq]")
    g.add_argument("--text", help="text, tokenized with the checkpoint's tokenizer.json")
    p.add_argument("--save-logits", metavar="OUT.npy", help="save float32 logits [batch, seq, vocab]")
    p.add_argument("--save-mtp-logits", metavar="OUT.npy",
                   help="save float32 MTP logits [mtp_depth, batch, seq, vocab]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_mesh_args(p)
    add_overrides(p, "runtime config overrides, e.g. compute_dtype=float32 moe_impl=ragged")
    p.set_defaults(func=run_score)

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
    p.add_argument("--ep-strategy", choices=("allgather", "ragged_a2a", "a2a_capacity"),
                   help="expert-parallel strategy on the mesh (default allgather; same as ep_strategy=...)")
    add_overrides(p, "runtime config overrides, e.g. compute_dtype=float32")
    p.set_defaults(func=run_generate)


def _runtime(args) -> list[str]:
    """The runtime overrides of a command: its ``key=value`` list, then ``--ep-strategy``."""
    return list(args.overrides) + ([f"ep_strategy={args.ep_strategy}"] if args.ep_strategy else [])


def _mesh(args):
    if not args.mesh:
        return None
    from sharding import make_mesh
    return make_mesh(args.mesh)


def _read_token_ids(path: str):
    import numpy as np

    from ..errors import DataError
    try:
        tokens = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read --token-ids {path}: {e} (fix: save an int32 [batch, seq] array with "
                        "numpy.save).") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"--token-ids {path} holds {tokens.dtype}, expected integer ids "
                        "(fix: save an int32 [batch, seq] array).")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise DataError(f"--token-ids {path} has shape {tokens.shape}, expected [batch, seq].")
    return tokens


def run_score(args) -> int:
    import numpy as np

    from sharding import DEFAULT_RULES

    from ..checkpoint.orbax_io import load_checkpoint
    from ..errors import CheckpointError
    from ..inference.scoring import score, tokenize
    tokens = _read_token_ids(args.token_ids) if args.token_ids else tokenize(args.checkpoint, args.text)
    mesh = _mesh(args)
    if mesh is not None:
        DEFAULT_RULES.check_batch(tokens.shape[0], mesh)
    cfg, model = load_checkpoint(args.checkpoint, mesh=mesh, runtime=_runtime(args))
    want_mtp = args.save_mtp_logits is not None
    if want_mtp and not cfg.num_mtp_layers:
        raise CheckpointError(f"{args.checkpoint} has no MTP module, so there are no MTP logits to save "
                              "(fix: drop --save-mtp-logits).")
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


def _ids(text: str, flag: str) -> list[int]:
    from ..errors import GenerationError
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise GenerationError(f"{flag} must be comma-separated integers, got {text!r} "
                              f"(fix: e.g. {flag} 1,2,3).") from None


def run_generate(args) -> int:
    from ..checkpoint.orbax_io import load_checkpoint
    from ..data.tokenizer import load_tokenizer
    from ..errors import GenerationError
    from ..inference.generate import Generator

    tok = load_tokenizer(args.checkpoint, require=(), missing_ok=True)
    if args.prompt is not None:
        if tok is None:
            raise GenerationError(f"{args.checkpoint} has no tokenizer.json, so --prompt cannot be tokenized "
                                  "(fix: pass --prompt-ids 1,2,3).")
        prompt = tok.encode(args.prompt, allow_special=True, add_special_tokens=True)
    else:
        prompt = _ids(args.prompt_ids, "--prompt-ids")
    stops = _ids(args.stop_ids, "--stop-ids") if args.stop_ids else []
    if not stops and tok is not None:
        stops = [tok.eos_id] if tok.eos_id is not None else []
    mesh = _mesh(args)
    _, model = load_checkpoint(args.checkpoint, mesh=mesh, runtime=_runtime(args))
    gen = Generator(model)
    streamed: list[int] = []

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)  # as `tokenizers` decodes by default

    def on_token(_: int, t: int) -> None:
        streamed.append(t)
        if not args.json:
            piece = decode(streamed) if tok is not None else None
            prev = decode(streamed[:-1]) if tok is not None else None
            sys.stdout.write(piece[len(prev):] if tok is not None else f"{t} ")
            sys.stdout.flush()

    if not args.json and tok is not None:
        sys.stdout.write(args.prompt if args.prompt is not None else decode(prompt))
    t0 = time.perf_counter()
    res = gen([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_tokens=stops, speculative=args.speculative, on_token=on_token)
    dt = time.perf_counter() - t0
    ids = res.tokens[0]
    if args.json:
        out = {"token_ids": ids, "text": decode(ids) if tok is not None else None, "steps": res.steps,
               "seconds": dt}
        if args.speculative:
            out["acceptance_rate"] = res.acceptance_rate
            out["tokens_per_step"] = res.tokens_per_step
        print(json.dumps(out))
    else:
        extra = f", MTP acceptance {res.acceptance_rate:.0%}" if args.speculative else ""
        print(f"\n[{len(ids)} tokens in {dt:.1f}s incl. compile{extra}]", file=sys.stderr)
    return 0
