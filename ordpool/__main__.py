"""The ``ordpool`` command (also ``python -m ordpool``).

Subcommands:

    bench   ordpool against one process and the other pools (see :mod:`ordpool.bench`)

The top-level parser knows each subcommand by name only; a subcommand parses its own options
with the module that implements it, imported when it runs. ``ordpool --help`` and
``ordpool --version`` therefore import none of them, and ``ordpool bench`` without the bench
extra installed says which extra to install instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, Sequence

__all__ = ["build_parser", "main"]

# The modules ``ordpool bench`` cannot run without (the bench extra). mpire and joblib are in
# the extra too, but optional: ``--engines`` skips a peer that is missing.
_BENCH_REQUIRES = ("orjson", "rich")
_BENCH_HINT = "pip install 'ordpool[bench]'"


def build_parser() -> argparse.ArgumentParser:
    """The ``ordpool`` argument parser: one subparser per subcommand, options left to each."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ordpool",
        description="Ordered, CPU-parallel pipelines over worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"ordpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    # add_help=False: ``ordpool bench --help`` reaches the bench's own parser.
    bench = commands.add_parser(
        "bench",
        help="compare ordpool with serial and the other pools on the same input",
        add_help=False,
    )
    bench.set_defaults(run=_bench)
    return parser


def _bench(options: list[str], argv: list[str]) -> int:
    """``ordpool bench OPTIONS``: import the bench (the extra), parse its options, run."""
    try:
        from .bench import cli
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _BENCH_REQUIRES:
            raise
        print(
            f"ordpool bench: {missing} is not installed; install the bench extra: {_BENCH_HINT}",
            file=sys.stderr,
        )
        return 2  # as for bad options: nothing ran
    args = cli.build_parser("ordpool bench").parse_args(options)
    args.command_line = shlex.join(["ordpool", *argv])
    return cli.run_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ordpool`` command line; return the exit status.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.

    Examples:
        >>> main(["--version"])  # doctest: +SKIP
        ordpool 0.1.0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args, options = build_parser().parse_known_args(argv)
    run: Callable[[list[str], list[str]], int] = args.run
    return int(run(options, argv))


if __name__ == "__main__":
    sys.exit(main())
