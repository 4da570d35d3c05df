"""The ``ordpool`` command (also ``python -m ordpool``).

Subcommands:

    bench   ordpool against one process and the stdlib pools (see :mod:`ordpool._bench`)

Each subcommand registers its options with an ``add_arguments(parser)`` function and runs
through a ``run(args) -> int`` function, so a new one is a few lines in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``ordpool`` argument parser, with one subparser per subcommand."""
    from . import __version__, _bench

    parser = argparse.ArgumentParser(
        prog="ordpool",
        description="Ordered, CPU-parallel pipelines over worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"ordpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    bench = commands.add_parser(
        "bench",
        help="compare ordpool with serial and the stdlib pools on the same input",
        description="Run one workload over the same messages with serial (one process), "
        "ordpool, multiprocessing.Pool.imap and ProcessPoolExecutor.map (each at its best "
        "chunksize), and print throughput, CPU per message, peak RSS and what limits each. "
        "With no options: the transform workload, 200,000 generated messages, one worker per "
        "usable core, median of 3 runs.",
    )
    _bench.add_arguments(bench)
    bench.set_defaults(run=_bench.run_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ordpool`` command line; return the exit status.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        ordpool 0.1.0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["ordpool", *argv])
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
