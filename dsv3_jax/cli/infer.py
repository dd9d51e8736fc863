"""``dsv3 score`` (per-token NLL and perplexity) and ``dsv3 generate`` (sampling with the latent
cache, streaming text): the two commands that run a checkpoint."""
from __future__ import annotations

import json
import sys
import time

from .common import add_distributed_args, add_mesh_args, add_overrides, float_arg, int_arg


def register(sub) -> None:
    p = sub.add_parser("score", help="per-token NLL and perplexity of token ids or text under a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (dsv3 convert hf-to-orbax)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token-ids", help="int32 .npy of shape [batch, seq] (seq >= 2; or one sequence [seq])")
    g.add_argument("--text", help="text, tokenized with the checkpoint's tokenizer.json")
    g.add_argument("--text-file", metavar="FILE", help="UTF-8 text file, tokenized with the checkpoint's tokenizer.json")
    p.add_argument("--save-logits", metavar="OUT.npy", help="save float32 logits [batch, seq, vocab]")
    p.add_argument("--save-mtp-logits", metavar="OUT.npy",
                   help="save float32 MTP logits [mtp_depth, batch, seq, vocab]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ema", action="store_true", help="score with the parameters' EMA (a training checkpoint's ema/)")
    add_mesh_args(p)
    add_distributed_args(p)
    add_overrides(p, "runtime config overrides, e.g. compute_dtype=float32 moe_impl=ragged")
    p.set_defaults(func=run_score)

    p = sub.add_parser("generate", help="generate text from a checkpoint (latent KV cache, optional MTP speculation)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (dsv3 convert / dsv3 train)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's tokenizer.json")
    g.add_argument("--prompt-file", metavar="FILE", help="UTF-8 text file holding the prompt")
    g.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3 (for checkpoints without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int_arg(1, "--max-new-tokens 64"), default=64)
    p.add_argument("--temperature", type=float_arg(0, example="--temperature 0.7"), default=0.0,
                   help="0 = greedy (a finite number >= 0)")
    p.add_argument("--top-k", type=int_arg(0, "--top-k 50"), default=0, help="0 = off")
    p.add_argument("--top-p", type=float_arg(0, 1, lo_open=True, example="--top-p 0.9"), default=1.0,
                   help="nucleus mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int_arg(0, "--seed 0"), default=0)
    p.add_argument("--stop-ids", default="", help="comma-separated ids that end generation (default: the tokenizer's EOS)")
    p.add_argument("--speculative", choices=("mtp",), help="draft with the MTP module, verify with the main model")
    p.add_argument("--cache-dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="latent KV cache dtype (attention accumulates in fp32); float32 for an exact cache")
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user turn, wrapped in DeepSeek-V3's chat template (ends with <｜Assistant｜>)")
    p.add_argument("--system", default="", help="with --chat: a system prompt")
    p.add_argument("--jsonl-out", metavar="FILE",
                   help="with --chat: append the conversation (user turn + generated answer) as one JSONL line "
                        "{\"messages\": [...]}, SFT data for sequence-level distillation")
    p.add_argument("--ema", action="store_true", help="generate with the parameters' EMA (a training checkpoint's ema/)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (token_ids, text, steps, acceptance_rate) instead of streaming")
    p.add_argument("--mesh", help="run on a device mesh, e.g. data=2,expert=4 (expert-parallel MoE)")
    p.add_argument("--ep-strategy", choices=("auto", "allgather", "ragged_a2a", "a2a_capacity"),
                   help="expert-parallel strategy on the mesh (default auto: ragged_a2a on a TPU/GPU expert axis "
                        ">= 16, else allgather; same as ep_strategy=...)")
    add_distributed_args(p)
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
    """``--token-ids FILE`` → ``[batch, seq]`` integer ids (a 1-D array is one sequence)."""
    import numpy as np

    from ..errors import DataError, DataNotFoundError
    from ..inference.scoring import as_token_array
    fix = "save an int32 [batch, seq] array with numpy.save(path, ids)"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            kind = "a .npz archive" if magic.startswith(b"PK") else "not a .npy file (no NumPy header)"
            raise DataError(f"--token-ids {path} is {kind} (fix: {fix}).")
        tokens = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataNotFoundError(f"--token-ids {path} does not exist (fix: check the path; {fix}).") from None
    except IsADirectoryError:
        raise DataError(f"--token-ids {path} is a directory, not a .npy file (fix: {fix}).") from None
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:
        what = ("holds Python objects (dtype object)" if "allow_pickle" in str(e)
                else f"cannot be read: {e}")
        raise DataError(f"--token-ids {path} {what} (fix: {fix}).") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"--token-ids {path} holds {tokens.dtype}, expected integer ids (fix: {fix}).")
    return as_token_array(tokens, f"--token-ids {path}")


def _read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file named by ``flag``; ``DataError`` naming the file and the first bad byte."""
    from ..errors import DataError, DataNotFoundError
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise DataNotFoundError(f"{flag} {path} does not exist (fix: check the path).") from None
    except OSError as e:
        raise DataError(f"{flag} {path} cannot be read: {e.strerror or e} (fix: check the path and its "
                        "permissions).") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start}) (fix: save it as "
                        "UTF-8).") from None


def _check_text(text: str, flag: str) -> str:
    """Text from the command line: the shell hands over bytes, which Python keeps as lone surrogates when
    they are not UTF-8; the tokenizer would fail on them, so name the flag and the byte instead."""
    from ..errors import DataError
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{flag} is not UTF-8 text (character {e.start} is an undecodable byte "
                        f"{text[e.start]!r}) (fix: pass UTF-8 text, or put it in a file for "
                        f"{flag}-file).") from None
    return text


def _check_output(path: str | None, flag: str) -> None:
    """Fail before any work when ``path`` (a file to write) cannot be written."""
    import os
    from pathlib import Path

    from ..errors import DataError
    if path is None:
        return
    p = Path(path).expanduser()
    parent = p.resolve().parent
    if p.is_dir():
        raise DataError(f"{flag} {path} is a directory (fix: give a file name, e.g. {Path(path) / 'out.npy'}).")
    if not parent.is_dir():
        raise DataError(f"{flag} {path}: the directory {parent} does not exist (fix: create it, or choose "
                        "another path).")
    if not os.access(parent, os.W_OK):
        raise DataError(f"{flag} {path}: the directory {parent} is not writable (fix: choose another path).")


def _save(path: str, array, flag: str) -> None:
    import numpy as np

    from ..errors import DataError
    try:
        np.save(path, array)
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write it: {e.strerror or e} (fix: free disk space or choose "
                        "another path).") from None


def run_score(args) -> int:
    from ..checkpoint.orbax_io import load_checkpoint
    from ..distributed import initialize_from_args, is_primary
    initialize_from_args(args, lambda m: print(m, file=sys.stderr, flush=True))  # before any JAX backend use
    from ..errors import CheckpointError
    from ..checkpoint.orbax_io import checkpoint_config
    from ..inference.scoring import check_score_tokens, score, tokenize
    _check_output(args.save_logits, "--save-logits")
    _check_output(args.save_mtp_logits, "--save-mtp-logits")
    stored = checkpoint_config(args.checkpoint)   # a checkpoint directory? (reads its marker only)
    if args.token_ids:
        what = f"--token-ids {args.token_ids}"
        tokens = _read_token_ids(args.token_ids)
    else:
        what = "--text" if args.text is not None else f"--text-file {args.text_file}"
        text = _check_text(args.text, "--text") if args.text is not None else _read_text_file(args.text_file,
                                                                                               "--text-file")
        tokens = tokenize(args.checkpoint, text)
        what = f"{what} (encoded)"
    check_score_tokens(tokens, stored, what)   # before loading the weights
    mesh = _mesh(args)
    cfg, model = load_checkpoint(args.checkpoint, mesh=mesh, runtime=_runtime(args), ema=args.ema)
    check_score_tokens(tokens, cfg, what)
    want_mtp = args.save_mtp_logits is not None
    if want_mtp and not cfg.num_mtp_layers:
        raise CheckpointError(f"{args.checkpoint} has no MTP module, so there are no MTP logits to save "
                              "(fix: drop --save-mtp-logits).")
    res = score(model, tokens, mtp=want_mtp)   # on a mesh: padded to its batch shards, padding dropped
    if not is_primary():  # several processes: process 0 writes the outputs
        return 0
    if args.save_logits:
        _save(args.save_logits, res.logits, "--save-logits")
    if want_mtp:
        _save(args.save_mtp_logits, res.mtp_logits, "--save-mtp-logits")
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
    """``1,2,3`` → ``[1, 2, 3]`` ("" → []); any other item (empty, not an integer) is an error."""
    from ..errors import GenerationError
    if not text.strip():
        return []
    items = [t.strip() for t in text.split(",")]
    for i, t in enumerate(items):
        try:
            int(t)
        except ValueError:
            item = "an empty item" if not t else f"{t!r}"
            raise GenerationError(f"{flag} must be comma-separated integers, got {text!r}: item {i + 1} is {item} "
                                  f"(fix: e.g. {flag} 1,2,3).") from None
    return [int(t) for t in items]


def run_generate(args) -> int:
    from ..checkpoint.orbax_io import load_checkpoint
    from ..distributed import initialize_from_args, is_primary
    initialize_from_args(args, lambda m: print(m, file=sys.stderr, flush=True))  # before any JAX backend use
    quiet = not is_primary()  # several processes: process 0 writes the output
    from ..data.tokenizer import load_tokenizer
    import numpy as np

    from ..errors import GenerationError
    from ..inference.generate import Generator
    from ..model import check_tokens

    from ..checkpoint.orbax_io import checkpoint_config
    stored = checkpoint_config(args.checkpoint)   # a checkpoint directory? (reads its marker only)
    stops = _ids(args.stop_ids, "--stop-ids") if args.stop_ids else []
    if args.prompt_ids is not None:
        prompt, what = _ids(args.prompt_ids, "--prompt-ids"), "--prompt-ids"
        if not prompt:
            raise GenerationError("--prompt-ids is empty: every prompt needs at least one token "
                                  "(fix: e.g. --prompt-ids 1,2,3).")
    else:
        text = (_check_text(args.prompt, "--prompt") if args.prompt is not None
                else _read_text_file(args.prompt_file, "--prompt-file"))
        what = "--prompt" if args.prompt is not None else f"--prompt-file {args.prompt_file}"
    tok = load_tokenizer(args.checkpoint, require=(), missing_ok=True)
    if args.prompt_ids is None:
        if tok is None:
            raise GenerationError(f"{args.checkpoint} has no tokenizer.json, so {what.split()[0]} cannot be "
                                  "tokenized (fix: pass --prompt-ids 1,2,3).")
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                       [{"role": "user", "content": text}]
            prompt = tok.encode_chat(messages, add_generation_prompt=True)[0]
        else:
            prompt = tok.encode(text, allow_special=True, add_special_tokens=True)
        if not prompt:
            raise GenerationError(f"{what} encodes to no tokens: every prompt needs at least one "
                                  "(fix: give a non-empty prompt).")
    if (args.chat or args.system or args.jsonl_out) and (args.prompt_ids is not None or not args.chat):
        raise GenerationError("--chat wraps a text prompt in the chat template, and --system / --jsonl-out need it "
                              "(fix: pass --chat with --prompt or --prompt-file).")
    if not stops and tok is not None:
        stops = [tok.eos_id] if tok.eos_id is not None else []
    check_tokens(np.asarray(prompt, np.int64), stored.vocab_size, what)   # before loading the weights
    check_tokens(np.asarray(stops, np.int64), stored.vocab_size, "--stop-ids")
    if len(prompt) + args.max_new_tokens > stored.max_position_embeddings:
        raise GenerationError(f"{what} ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                              f"model's context of {stored.max_position_embeddings} tokens (fix: shorten the prompt "
                              "or lower --max-new-tokens).")
    mesh = _mesh(args)
    _, model = load_checkpoint(args.checkpoint, mesh=mesh, runtime=_runtime(args), ema=args.ema)
    gen = Generator(model, cache_dtype=args.cache_dtype)
    streamed: list[int] = []

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)  # as `tokenizers` decodes by default

    def on_token(_: int, t: int) -> None:
        streamed.append(t)
        if not args.json and not quiet:
            piece = decode(streamed) if tok is not None else None
            prev = decode(streamed[:-1]) if tok is not None else None
            sys.stdout.write(piece[len(prev):] if tok is not None else f"{t} ")
            sys.stdout.flush()

    if not args.json and tok is not None and not quiet:
        sys.stdout.write(text if args.prompt_ids is None and not args.chat else decode(prompt))
    t0 = time.perf_counter()
    res = gen([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_tokens=stops, speculative=args.speculative, on_token=on_token)
    dt = time.perf_counter() - t0
    ids = res.tokens[0]
    if quiet:
        return 0
    if args.jsonl_out:  # sequence-level distillation data (docs/design.md §Post-training)
        answer = decode([t for t in ids if t not in stops])
        with open(args.jsonl_out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"messages": messages + [{"role": "assistant", "content": answer}]},
                               ensure_ascii=False) + "\n")
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
