"""Pieces the ``dsv3`` subcommands share: the parser class (argparse errors as one line), the
``--config`` + ``key=value`` and ``--mesh`` arguments."""
from __future__ import annotations

import argparse
import math
import sys

from ..config import list_configs


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, ``<prog>: <message> (see <prog> --help)``, exit code 2
    (the code of every user error, see ``dsv3_jax.cli``)."""

    def error(self, message: str):
        usage_error(self.prog, message)


def usage_error(prog: str, message: str, fix: str = ""):
    """Print ``<prog>: <message> (fix: <fix>; see `<prog> --help`)`` and exit with code 2."""
    print(f"{prog}: {message} ({'fix: ' + fix + '; ' if fix else ''}see `{prog} --help`)", file=sys.stderr)
    raise SystemExit(2)


def is_override(arg: str) -> bool:
    """``key=value`` (the form of config overrides), as opposed to a flag or a stray word."""
    key = arg.split("=", 1)[0]
    return "=" in arg and bool(key.strip()) and not arg.startswith("-")


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """``key=value`` overrides; they may stand before, between and after the flags (``dsv3_jax.cli``
    collects the ones argparse leaves over)."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=help)


def int_arg(lo: int, example: str):
    """An argparse ``type``: an integer ``>= lo``; a bad value is one line naming the flag and the fix."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (fix: e.g. {example})") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo} (fix: e.g. {example})")
        return value
    parse.__name__ = "int"
    return parse


def float_arg(lo: float, hi: float = math.inf, *, lo_open: bool = False, example: str):
    """An argparse ``type``: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (fix: e.g. {example})") from None
        low_ok = value > lo if lo_open else value >= lo
        if not math.isfinite(value) or not low_ok or value > hi:
            where = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if math.isfinite(hi)
                     else f"{'>' if lo_open else '>='} {lo:g}")
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {where} (fix: e.g. {example})")
        return value
    parse.__name__ = "float"
    return parse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny",
                   help=f"config NAME from configs/ ({', '.join(list_configs())}) or a path to a YAML file")
    add_overrides(p, "override config fields, e.g. n_routed_experts=32 rope_scaling.factor=8")


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="run on a device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; "
                                  "one may be -1). On CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    p.add_argument("--ep-strategy", choices=("auto", "allgather", "ragged_a2a", "a2a_capacity"),
                   help="expert-parallel strategy on the mesh (default auto: ragged_a2a on a TPU/GPU expert axis "
                        ">= 16, else allgather; same as ep_strategy=...)")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """``--coordinator-address/--num-processes/--process-id`` (as ``jax.distributed.initialize`` names
    them) and the timeouts; ``dsv3_jax.distributed.initialize_from_args`` joins the run with them."""
    g = p.add_argument_group("multi-process runs", "one process per host, all started with the same command but "
                             "their own --process-id; none of these under SLURM, Open MPI or on a Cloud TPU pod "
                             "slice, where the run is joined automatically (see README, Multi-process runs)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="process 0's host and a free port there, reachable from every process")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1")
    g.add_argument("--heartbeat-timeout", type=int, metavar="S",
                   help="a process silent this long is declared dead and the run stops (default 30; "
                        "env DSV3_HEARTBEAT_TIMEOUT)")
    g.add_argument("--init-timeout", type=int, metavar="S",
                   help="how long to wait for the coordinator and every process to join (default 300; "
                        "env DSV3_INIT_TIMEOUT)")
