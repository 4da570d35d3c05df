"""The benchmark lab: ``ordpool bench`` and the parts the scripts in ``bench/`` share.

Needs the ``bench`` extra (``pip install 'ordpool[bench]'``: orjson, rich, and the optional
peers mpire and joblib); ``import ordpool`` never imports this package.

Modules, by role::

    workloads   the built-in workloads, the messages (generated or read), --fn/--init
    engines     serial, ordpool, mp.Pool, ProcessPoolExecutor, mpire, joblib: one class each
    measure     one timed run: wall time, CPU of parent and workers, peak RSS
    runner      one benchmark run: pools opened once, warmed, timed in rounds, checked
    report      medians and verdicts, the tables (rich), the JSON report
    progress    the progress bar on stderr
    cli         the options of ``ordpool bench`` and its exit status

and for ``--stream`` (latency per message in an open loop)::

    latency         the due-time schedule, percentiles, the summary of a run (pure)
    openloop        pacing, the producer thread, the consumer's in-order record
    stream_engines  ordpool enqueue/results and imap, mp.Pool.imap, ProcessPoolExecutor.submit
    stream          one --stream run: pools opened, warmed and timed in turn, the report
"""

from __future__ import annotations

from ._runtime import PICKLE_PROTOCOL, result_chunk_length, usable_cores
from .cli import add_arguments, build_parser, config_from_args, main, parse_int_list, run_command
from .config import BenchConfig, BenchError, StreamCheckError, StreamConfig
from .engines import ENGINES, PEERS, BenchEngine, ChunkedEngine, SerialEngine, installed
from .latency import LatencySummary, Schedule, percentile, summarize_latencies
from .measure import PeakRss, RssSampler, RunStats, descendants, timed_run
from .progress import Progress
from .report import EngineResult, format_report, print_report, summarize, verdict_for, write_json
from .runner import check_engine, run_benchmark
from .stream import StreamResult, run_stream
from .stream_engines import STREAM_ENGINES, StreamEngine
from .workloads import (
    WORKLOADS,
    Workload,
    load_callable,
    make_messages,
    read_input,
    stream_work,
    transform,
)

__all__ = [
    "ENGINES",
    "PEERS",
    "PICKLE_PROTOCOL",
    "STREAM_ENGINES",
    "WORKLOADS",
    "BenchConfig",
    "BenchEngine",
    "BenchError",
    "ChunkedEngine",
    "EngineResult",
    "LatencySummary",
    "PeakRss",
    "Progress",
    "RssSampler",
    "RunStats",
    "Schedule",
    "SerialEngine",
    "StreamCheckError",
    "StreamConfig",
    "StreamEngine",
    "StreamResult",
    "Workload",
    "add_arguments",
    "build_parser",
    "check_engine",
    "config_from_args",
    "descendants",
    "format_report",
    "installed",
    "load_callable",
    "main",
    "make_messages",
    "parse_int_list",
    "percentile",
    "print_report",
    "read_input",
    "result_chunk_length",
    "run_benchmark",
    "run_command",
    "run_stream",
    "stream_work",
    "summarize",
    "summarize_latencies",
    "timed_run",
    "transform",
    "usable_cores",
    "verdict_for",
    "write_json",
]
