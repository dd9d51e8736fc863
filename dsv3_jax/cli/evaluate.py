"""``dsv3 eval {ppl,needle,fim} --checkpoint C``: held-out perplexity, Needle in a Haystack and FIM exact
match of a checkpoint (dsv3_jax/eval; docs/design.md §Evaluation). With ``--json`` the last line is one
object: ``ppl`` → ``{"ppl", "tokens"}``, ``needle`` → ``{"lengths", "depths", "accuracy"}``, ``fim`` →
``{"exact_match", "n"}``."""
from __future__ import annotations

import json
import sys

from .common import add_distributed_args, add_mesh_args, add_overrides, int_arg


def _int_list(text: str) -> list[int]:
    import argparse
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers (fix: e.g. 256,1024)") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 0 (fix: e.g. 256,1024)")
    return vals


def _common(p) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (dsv3 train / dsv3 convert)")
    p.add_argument("--ema", action="store_true", help="evaluate the parameters' EMA (ema/) instead of the weights")
    p.add_argument("--data", help="corpus whose validation split is evaluated (default: the run's data.path, or stdlib)")
    p.add_argument("--val-fraction", type=float, help="held-out fraction (default: the run's data.val_fraction)")
    p.add_argument("--batch-size", type=int_arg(1, "--batch-size 8"), default=8, help="sequences per forward")
    p.add_argument("--seed", type=int_arg(0, "--seed 0"), default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON line (see dsv3 eval --help)")
    add_mesh_args(p)
    add_distributed_args(p)
    add_overrides(p, "runtime config overrides, e.g. compute_dtype=float32")


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out perplexity, Needle in a Haystack, FIM exact match of a checkpoint")
    tasks = p.add_subparsers(dest="task", required=True)
    q = tasks.add_parser("ppl", help="perplexity of the held-out documents")
    _common(q)
    q.add_argument("--seq-len", type=int_arg(2, "--seq-len 1024"), help="window length (default: the model's context, "
                                                                        "at most 4096)")
    q.add_argument("--max-tokens", type=int_arg(0, "--max-tokens 100000"), default=0, help="stop after N scored tokens")
    q.add_argument("--plot", metavar="OUT.png", help="mean NLL against position")
    q.set_defaults(func=run)
    q = tasks.add_parser("needle", help="Needle in a Haystack: accuracy grid over context lengths and depths")
    _common(q)
    q.add_argument("--lengths", type=_int_list, help="context lengths in tokens (default: 256 up to the context, x4)")
    q.add_argument("--depths", type=_int_list, default=list(range(0, 101, 10)), help="needle depths in %% "
                                                                                     "(default 0,10,...,100)")
    q.add_argument("--trials", type=int_arg(1, "--trials 4"), default=4, help="random needles per cell")
    q.add_argument("--plot", metavar="OUT.png", help="accuracy heatmap (length x depth)")
    q.set_defaults(func=run)
    q = tasks.add_parser("fim", help="fill-in-the-middle exact match on held-out functions")
    _common(q)
    q.add_argument("--n", type=int_arg(1, "--n 64"), default=64, help="number of functions")
    q.set_defaults(func=run)


def _default_lengths(ctx: int) -> list[int]:
    out, L = [], 256
    while L + 16 <= ctx:
        out.append(L)
        L *= 4
    return out or [max(64, ctx - 16)]


def run(args) -> int:
    from ..distributed import initialize_from_args, is_primary
    initialize_from_args(args, lambda m: print(m, file=sys.stderr, flush=True))  # before any JAX backend use
    from pathlib import Path

    from sharding import make_mesh

    from ..checkpoint.orbax_io import checkpoint_config, load_checkpoint
    from ..data.tokenizer import load_tokenizer
    from ..errors import DataError
    from ..eval import fim_eval, heldout_documents, needle_eval, perplexity, plot_needle, plot_nll_by_position
    from .infer import _check_output
    plot = getattr(args, "plot", None)
    _check_output(plot, "--plot")
    if plot and Path(plot).suffix.lower() != ".png":
        raise DataError(f"--plot {plot}: the figure is written as PNG (fix: name it OUT.png).")
    stored = checkpoint_config(args.checkpoint)   # a checkpoint? (its marker only)
    tok = load_tokenizer(args.checkpoint, require=("bos", "eos", "fim_begin", "fim_hole", "fim_end"),
                         fix="evaluate a checkpoint that has tokenizer.json (dsv3 train writes one)")
    src, ids, what = heldout_documents(args.checkpoint, args.data, args.val_fraction)
    texts = [src[i] for i in ids]
    if args.task == "needle":
        lengths = args.lengths or _default_lengths(stored.max_position_embeddings)
        bad = [L for L in lengths if L + 16 > stored.max_position_embeddings]
        if bad:   # before the weights are read
            raise DataError(f"--lengths {bad} do not fit the model's context of {stored.max_position_embeddings} "
                            f"tokens with the answer (fix: lengths up to {stored.max_position_embeddings - 16}).")
    if args.task == "ppl" and args.seq_len and args.seq_len > stored.max_position_embeddings:
        raise DataError(f"--seq-len {args.seq_len} exceeds the model's context of {stored.max_position_embeddings} "
                        f"tokens (fix: --seq-len {stored.max_position_embeddings} or less).")
    mesh = make_mesh(args.mesh) if args.mesh else None
    runtime = list(args.overrides) + ([f"ep_strategy={args.ep_strategy}"] if args.ep_strategy else [])
    cfg, model = load_checkpoint(args.checkpoint, mesh=mesh, runtime=runtime, ema=args.ema)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if is_primary() else (lambda m: None)  # noqa: E731
    say(f"{args.task}: {what}{' (EMA weights)' if args.ema else ''}")
    if args.task == "ppl":
        seq = args.seq_len or min(cfg.max_position_embeddings, 4096)
        res = perplexity(model, tok, texts, seq_len=seq, batch_size=args.batch_size, max_tokens=args.max_tokens)
        if plot and is_primary():
            plot_nll_by_position(res, plot)
        text = f"held-out perplexity {res.ppl:.4f} over {res.tokens} tokens (windows of {seq})"
    elif args.task == "needle":
        res = needle_eval(model, tok, texts, lengths=lengths, depths=args.depths, trials=args.trials,
                          seed=args.seed, batch_size=args.batch_size)
        if plot and is_primary():
            plot_needle(res, plot)
        rows = [f"  {'depth %':>8} " + " ".join(f"{L:>7}" for L in res.lengths)]
        for j, d in enumerate(res.depths):
            rows.append(f"  {d:>8g} " + " ".join(f"{res.accuracy[i][j]:>7.2f}" for i in range(len(res.lengths))))
        text = f"needle accuracy ({res.trials} trials per cell), lengths across:\n" + "\n".join(rows)
    else:
        res = fim_eval(model, tok, texts, n=args.n, seed=args.seed, batch_size=args.batch_size)
        text = f"FIM exact match {res.exact_match:.3f} over {res.n} held-out functions"
    if not is_primary():
        return 0
    print(text)
    if plot:
        print(f"plot: {plot}")
    if args.json:
        print(json.dumps(res.to_json()))
    return 0
