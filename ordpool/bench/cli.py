"""``ordpool bench``: the options, and the run from parsed options to the exit status.

``ordpool/__main__.py`` imports this module only when the ``bench`` subcommand runs, so that
``ordpool`` itself needs none of the bench extra (orjson, rich, mpire, joblib).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import traceback
from typing import Any, Sequence

from ._runtime import usable_cores
from .config import (
    DEFAULT_ENGINES,
    STREAM_ENGINE_KEYS,
    BenchConfig,
    BenchError,
    StreamCheckError,
    StreamConfig,
)
from .engines import PEERS, BenchEngine, installed
from .report import print_report, write_json
from .runner import run_benchmark
from .stream import run_stream
from .workloads import WORKLOADS, Workload, load_callable

__all__ = [
    "DESCRIPTION",
    "add_arguments",
    "build_parser",
    "config_from_args",
    "main",
    "parse_int_list",
    "run_command",
    "stream_config_from_args",
]

DESCRIPTION = (
    "Run one workload over the same messages with serial (one process), ordpool, "
    "multiprocessing.Pool.imap and ProcessPoolExecutor.map (each at its best chunksize), and "
    "print throughput, CPU per message, peak RSS and what limits each. With no options: the "
    "transform workload, 200,000 generated messages, one worker per usable core, median of 3 "
    "runs. With --stream RATE: the latency of each message in an open loop at RATE messages "
    "per second instead."
)


def parse_int_list(text: str) -> list[int]:
    """``"1,2,4"`` or ``"1-4"`` -> positive ints.

    >>> parse_int_list("1,2,4"), parse_int_list("1-3")
    ([1, 2, 4], [1, 2, 3])
    """
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 1,2,4 or 1-4, got {text!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _number(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # rejected below
    if not 0 <= value < math.inf or (value == 0 and not zero_ok):
        what = "non-negative" if zero_ok else "positive"
        raise argparse.ArgumentTypeError(f"expected a {what} number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, zero_ok=False)


def _non_negative_float(text: str) -> float:
    return _number(text, zero_ok=True)


def _batch_size(text: str) -> int | None:
    return None if text == "auto" else _positive_int(text)


def _chunksizes(text: str) -> tuple[int, ...] | None:
    if text == "auto":
        return None
    return tuple(_positive_int(part) for part in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    _add_workload_arguments(parser)
    _add_input_arguments(parser)
    _add_engine_arguments(parser)
    _add_stream_arguments(parser)
    _add_output_arguments(parser)
    _add_kafka_arguments(parser)


def _add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kafka`` (see :mod:`ordpool.bench.kafka`; its module imports confluent-kafka only
    when it runs)."""
    from . import kafka

    kafka.add_arguments(parser)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """What runs: ``--workload``, or ``--fn`` with ``--init``."""
    parser.add_argument(
        "--workload",
        "-w",
        choices=sorted(WORKLOADS),
        default="transform",
        help="built-in workload (default: transform); ignored with --fn",
    )
    parser.add_argument(
        "--fn",
        metavar="MODULE:FUNCTION",
        help="your own function, fn(msg) or fn(state, msg) with --init; the current directory "
        "is importable",
    )
    parser.add_argument(
        "--init",
        metavar="MODULE:FUNCTION",
        help="builds each worker's state, called once per worker with no arguments",
    )


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The messages: ``--input``, or how many to generate and how large."""
    parser.add_argument(
        "--input",
        metavar="FILE",
        help="messages from FILE (one per line, or a JSON array) instead of generated ones",
    )
    parser.add_argument(
        "--messages",
        "-n",
        type=_positive_int,
        metavar="N",
        help="messages to generate (default: 200000; sleep: 1000); with --input, at most N",
    )
    parser.add_argument(
        "--message-size",
        type=_positive_int,
        default=600,
        metavar="BYTES",
        help="size of each generated message (default: 600)",
    )


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Who runs it, how many times, with which pool settings."""
    parser.add_argument(
        "--workers",
        type=parse_int_list,
        metavar="N[,N...]",
        help="worker counts, a row group each: 1,2,4 or 1-4 (default: the usable cores)",
    )
    parser.add_argument(
        "--engines",
        default=None,
        metavar="E[,E...]",
        help="engines besides serial: ordpool, pool (multiprocessing.Pool.imap), executor "
        "(ProcessPoolExecutor.map), mpire (WorkerPool.imap), joblib (Parallel, loky backend); "
        "a peer that is not installed is skipped; default: ordpool,pool,executor. With "
        f"--stream: {', '.join(STREAM_ENGINE_KEYS)} (default: all)",
    )
    parser.add_argument(
        "--repeat",
        "-r",
        type=_positive_int,
        default=3,
        metavar="K",
        help="timed runs per engine; the report shows the median (default: 3; with --stream "
        "the runs go round-robin over the engines)",
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="auto|N",
        help="ordpool's batch size (default: auto)",
    )
    parser.add_argument(
        "--chunksize",
        type=_chunksizes,
        default=None,
        metavar="auto|N[,N...]",
        help="the other pools' chunksize: one value, or candidates to sweep (default: auto: "
        "100,1000,5000; sleep: 1,10,100)",
    )
    parser.add_argument(
        "--start-method",
        choices=("forkserver", "spawn", "fork"),
        default="forkserver",
        help="for every pool (default: forkserver; with fork the pools start before the data)",
    )


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """``--stream``: per-message latency in an open loop, and its work."""
    parser.add_argument(
        "--stream",
        type=_positive_float,
        metavar="RATE",
        help="measure latency instead of throughput: feed RATE messages per second to each "
        "engine in turn (an open loop: message i is due at start + i / RATE) and report "
        "percentiles of the time from each message's due time to its result, in order; "
        "--workers, --engines, --batch-size, --start-method and --json apply",
    )
    parser.add_argument(
        "--max-delay",
        type=_positive_float,
        metavar="SECONDS",
        help="with --stream: ordpool's max_delay, its latency bound (default: the pool's, 0.005)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="with --stream: seconds of feed per engine (default: 10)",
    )
    parser.add_argument(
        "--work-us",
        type=_non_negative_float,
        metavar="US",
        help="with --stream: microseconds of CPU per message in the worker (default: 8)",
    )
    parser.add_argument(
        "--slow-every",
        type=_positive_int,
        metavar="N",
        help="with --stream: every N-th message sleeps --slow-ms instead of working",
    )
    parser.add_argument(
        "--slow-ms",
        type=_positive_float,
        metavar="MS",
        help="with --stream and --slow-every: how long a slow message sleeps",
    )
    parser.add_argument(
        "--spin-us",
        type=_non_negative_float,
        metavar="US",
        help="with --stream: the producer spins the last US microseconds before each due time "
        "instead of sleeping (default: 0); precise feed times, but the spinning thread holds "
        "the GIL and a core that the pools under test need",
    )
    parser.add_argument(
        "--tick-us",
        type=_non_negative_float,
        metavar="US",
        help="with --stream: the producer wakes at most once per US microseconds and feeds "
        "every item due by then (default: 100); waking per item costs the parent a core at "
        "60k msg/s",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """What is checked and reported."""
    parser.add_argument(
        "--check",
        action="store_true",
        help="verify every engine returns serial's results in serial's order (untimed pass)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback when the workload fails"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is off when stderr is not a tty)",
    )


def build_parser(
    prog: str = "ordpool bench", description: str = DESCRIPTION
) -> argparse.ArgumentParser:
    """An argument parser with the ``bench`` options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return parser


def _workload(args: argparse.Namespace) -> Workload:
    """``--workload``, or a workload of ``--fn`` (and ``--init``), imported here."""
    if args.init and not args.fn:
        raise BenchError("--init needs --fn (the built-in workloads take no state)")
    if not args.fn:
        return WORKLOADS[args.workload]
    fn = load_callable(args.fn, "--fn")
    init = load_callable(args.init, "--init") if args.init else None
    how = f"fn(state, msg), state from {args.init}" if init else "fn(msg)"
    return Workload(args.fn, fn, init, description=how)


def _engines(text: str | None) -> list[str]:
    """The engine keys of ``--engines`` (serial always runs), less the peers not installed:
    each skipped one is a line on stderr."""
    kept = []
    for key in (e.strip() for e in (text or ",".join(DEFAULT_ENGINES)).split(",")):
        if not key or key == "serial":
            continue
        if installed(key):
            kept.append(key)
        else:
            print(
                f"ordpool bench: {key} is not installed: skipped "
                f"(pip install {PEERS[key]}, or pip install 'ordpool[bench]')",
                file=sys.stderr,
            )
    return kept


def config_from_args(args: argparse.Namespace, command_line: str = "") -> BenchConfig:
    """Build a :class:`.config.BenchConfig` from parsed options (imports ``--fn``/``--init``).

    Raises:
        BenchError: bad ``--fn``, ``--init`` or ``--engines``, or an option of ``--stream``
            without it.
    """
    given = [
        option
        for option, value in (
            ("--duration", args.duration),
            ("--work-us", args.work_us),
            ("--slow-every", args.slow_every),
            ("--slow-ms", args.slow_ms),
            ("--spin-us", args.spin_us),
            ("--tick-us", args.tick_us),
            ("--max-delay", args.max_delay),
        )
        if value is not None
    ]
    if given:
        raise BenchError(f"{given[0]} needs --stream")
    return BenchConfig(
        workload=_workload(args),
        workers=args.workers or [usable_cores()],
        engines=_engines(args.engines),
        messages=args.messages,
        message_size=args.message_size,
        input_path=args.input,
        repeat=args.repeat,
        start_method=args.start_method,
        batch_size=args.batch_size,
        chunksizes=args.chunksize,
        check=args.check,
        progress=not args.no_progress,
        command_line=command_line,
    )


def stream_config_from_args(args: argparse.Namespace, command_line: str = "") -> StreamConfig:
    """Build a :class:`.config.StreamConfig` from parsed options (``--stream`` given).

    Raises:
        BenchError: an option that does not apply to ``--stream``, or ``--slow-every``
            without ``--slow-ms`` (or the reverse). :func:`.stream.run_stream` checks the
            engines.
    """
    given = [
        option
        for option, value in (
            ("--fn", args.fn),
            ("--init", args.init),
            ("--input", args.input),
            ("--messages", args.messages),
            ("--chunksize", args.chunksize),
            ("--check", args.check),
        )
        if value
    ]
    if given:
        raise BenchError(
            f"{given[0]} does not apply to --stream (it runs its own work: --work-us, "
            "--slow-every, --slow-ms)"
        )
    if (args.slow_every is None) != (args.slow_ms is None):
        raise BenchError("--slow-every and --slow-ms go together")
    engines = [e.strip() for e in (args.engines or ",".join(STREAM_ENGINE_KEYS)).split(",")]
    return StreamConfig(
        rate=args.stream,
        workers=args.workers or [usable_cores()],
        duration=10.0 if args.duration is None else args.duration,
        work_us=8.0 if args.work_us is None else args.work_us,
        slow_every=args.slow_every,
        slow_ms=args.slow_ms or 0.0,
        spin_us=args.spin_us or 0.0,
        tick_us=100.0 if args.tick_us is None else args.tick_us,
        repeat=args.repeat,
        engines=list(dict.fromkeys(engines)),
        start_method=args.start_method,
        batch_size=args.batch_size,
        max_delay=args.max_delay,
        progress=not args.no_progress,
        command_line=command_line,
    )


def _run(
    args: argparse.Namespace, command_line: str, extra_engines: dict[str, type[BenchEngine]] | None
) -> dict[str, Any]:
    """The report of ``--stream`` or of the throughput comparison."""
    if args.stream is not None:
        return run_stream(stream_config_from_args(args, command_line))
    return run_benchmark(config_from_args(args, command_line), extra_engines)


def run_command(
    args: argparse.Namespace, extra_engines: dict[str, type[BenchEngine]] | None = None
) -> int:
    """``ordpool bench``: run, print the table, write ``--json``; the exit status.

    Returns:
        0; 1 when ``--check`` found a difference, the workload failed, or a ``--stream`` engine
        lost, duplicated or reordered a result; 2 for bad options or input; 130 when
        interrupted (Ctrl-C).
    """
    if getattr(args, "kafka", False):
        from . import kafka

        return kafka.run_command(args)
    command_line = getattr(args, "command_line", "") or shlex.join(["ordpool", *sys.argv[1:]])
    try:
        report = _run(args, command_line, extra_engines)
    except BenchError as exc:
        print(f"ordpool bench: error: {exc}", file=sys.stderr)
        return 2
    except StreamCheckError as exc:
        print(f"ordpool bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ordpool bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            traceback.print_exc()
        print(
            f"ordpool bench: error: the workload failed: {type(exc).__name__}: {exc}"
            + ("" if args.traceback else " (--traceback shows where)"),
            file=sys.stderr,
        )
        return 1
    print_report(report, sys.stdout)
    if args.json:
        write_json(report, args.json)
    return 1 if report.get("check_passed") is False else 0


def main(argv: Sequence[str] | None = None, prog: str = "ordpool bench") -> int:
    """Parse the ``bench`` options in ``argv`` (default ``sys.argv[1:]``) and run.

    Returns:
        The exit status (see :func:`run_command`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    args.command_line = shlex.join([*prog.split(), *argv])
    return run_command(args)
