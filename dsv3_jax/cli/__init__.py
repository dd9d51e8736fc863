"""``dsv3`` command line: ``info``, ``plan``, ``convert``, ``score``, ``generate``, ``eval``, ``train``, ``tokenizer train``.

One module per command group registers its subparser (``info.py``, ``convert.py``, ``infer.py`` for
score + generate, ``train.py``, ``tokenizer.py``); each imports what it runs only when it runs. Configs are
``--config NAME|PATH`` plus ``key=value`` overrides, which may stand before, between and after the flags.

Exit codes: 0 success; 2 a user error — every ``dsv3_jax.errors.Dsv3Error`` and every argument error,
printed as one line ``dsv3 <cmd>: <message>``; 1 anything else, which is a bug: the traceback, then a
line asking for a report; 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from ..errors import Dsv3Error
from . import convert, evaluate, infer, info, plan, tokenizer, train
from .common import ArgumentParser, is_override, usage_error

REPORT = ("this is a bug in dsv3-jax, not a problem with your input: please report it at the project's issue "
          "tracker with the command you ran.")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX: inspect, train, convert, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (info, plan, convert, infer, evaluate, train, tokenizer):
        group.register(sub)
    _name_leaves(parser)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list:
    """The parser's subcommand actions (argparse keeps them among its private ``_actions``)."""
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _name_leaves(parser: argparse.ArgumentParser) -> None:
    """Each runnable subparser records its name (``dsv3 convert hf-to-orbax``) for error lines; a missing
    subcommand is reported by its choices (``{hf-to-orbax,orbax-to-hf}``), not by its ``dest``."""
    subs = _subparsers(parser)
    if not subs:
        parser.set_defaults(prog=parser.prog)
    for action in subs:
        action.metavar = action.metavar or "{" + ",".join(action.choices) + "}"
        for child in action.choices.values():
            _name_leaves(child)


def parse_args(argv: Sequence[str], parser: Optional[ArgumentParser] = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides are collected wherever they stand. Raises
    ``SystemExit`` (code 2, one line on stderr) for anything else argparse does not recognise."""
    parser = parser or build_parser()
    argv = list(argv)
    _check_subcommand_first(parser, argv)
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    given = list(args.overrides) + extra if takes_overrides else extra
    stray = [a for a in given if not (takes_overrides and is_override(a))]
    if stray:
        usage_error(args.prog, f"unrecognized arguments: {' '.join(stray)}",
                    "config overrides are key=value, e.g. steps=3" if takes_overrides else "")
    if takes_overrides:
        args.overrides = list(args.overrides) + extra
    return args


def _check_subcommand_first(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``dsv3 eval --checkpoint C ppl``: the flags belong to ``ppl``, so argparse would answer "invalid
    choice: 'C'". Say instead that the subcommand comes first, with the reordered command."""
    i = 0
    while True:
        subs = _subparsers(parser)
        if not subs or i >= len(argv):
            return
        choices = subs[0].choices
        if argv[i] in choices:
            parser, i = choices[argv[i]], i + 1
            continue
        if not argv[i].startswith("-") or argv[i] in ("-h", "--help"):
            return
        later = next((a for a in argv[i + 1:] if a in choices), None)
        if later is not None:
            j = argv.index(later, i + 1)
            fixed = [*argv[:i], later, *argv[i:j], *argv[j + 1:]]
            usage_error(parser.prog, f"{argv[i]} is a flag of `{parser.prog} {later}`, not of `{parser.prog}`",
                        f"name the subcommand first: `{parser.prog.split()[0]} {' '.join(fixed)}`")
        return


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dsv3 ARGV``; returns the exit code (``sys.exit(main())``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error (2, already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except Dsv3Error as e:
        print(f"{args.prog}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        traceback.print_exc()
        print(f"{args.prog}: {type(e).__name__}: {REPORT}", file=sys.stderr)
        return 1


__all__ = ["main", "build_parser", "parse_args", "REPORT"]
