"""``dsv3 tokenizer train``: a byte-level BPE with DeepSeek's pre-tokenizer and special tokens."""
from __future__ import annotations

import itertools
import json

from .common import int_arg


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer; writes DIR/tokenizer.json",
                        description="Train a byte-level BPE tokenizer with DeepSeek's pre-tokenizer and special "
                                    "tokens; writes DIR/tokenizer.json.")
    t.add_argument("--output", required=True, metavar="DIR", help="directory to write tokenizer.json into")
    t.add_argument("--vocab-size", type=int_arg(1, "--vocab-size 4096"), default=4096, metavar="N",
                   help="vocabulary size incl. 256 bytes and 6 special tokens (default 4096)")
    t.add_argument("--data", default="stdlib", metavar="PATH",
                   help="'stdlib' (this Python's standard library sources, default), a text/JSONL file, "
                        "or a directory")
    t.add_argument("--glob", default="**/*", help="file pattern inside a --data directory (default **/*)")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    t.add_argument("--min-frequency", type=int_arg(1, "--min-frequency 2"), default=2, help="minimum pair count for a merge (default 2)")
    t.add_argument("--max-documents", type=int_arg(1, "--max-documents 1000"), default=None, metavar="N",
                   help="train on the first N documents only")
    t.set_defaults(func=run_train)


def _output_dir(output: str):
    """The directory ``--output`` names (its parent for a ``.json`` file name), created now so that a bad
    path fails before training rather than after."""
    import os
    from pathlib import Path

    from ..errors import DataError
    out = Path(output).expanduser()
    d = out.parent if out.suffix == ".json" else out
    if d.exists() and not d.is_dir():
        raise DataError(f"--output {output}: {d} is a file, not a directory (fix: name a directory, e.g. "
                        f"--output {d.with_suffix('')}_tokenizer).")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output {output}: cannot create the directory {d}: {e.strerror or e} "
                        "(fix: choose another --output).") from None
    if not os.access(d, os.W_OK):
        raise DataError(f"--output {output}: the directory {d} is not writable (fix: choose another --output).")


def run_train(args) -> int:
    from ..data.sources import iter_documents, open_source
    from ..data.tokenizer import train_tokenizer
    _output_dir(args.output)
    source = open_source(args.data, glob=args.glob, text_field=args.text_field)
    n = len(source) if args.max_documents is None else min(len(source), args.max_documents)
    docs = itertools.islice(iter_documents(source), n)
    tok = train_tokenizer(docs, args.vocab_size, min_frequency=args.min_frequency, length=n,
                          source=f"--data {args.data}")
    out = tok.save(args.output)
    print(json.dumps({"tokenizer": str(out), "vocab_size": tok.vocab_size, "requested_vocab_size": args.vocab_size,
                      "documents": n, "data": args.data, "special_ids": tok.special_ids}))
    return 0
