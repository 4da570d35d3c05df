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
"""

from __future__ import annotations

from ._runtime import PICKLE_PROTOCOL, result_chunk_length, usable_cores
from .cli import add_arguments, build_parser, config_from_args, main, parse_int_list, run_command
from .config import BenchConfig, BenchError
from .engines import ENGINES, PEERS, BenchEngine, ChunkedEngine, SerialEngine, installed
from .measure import PeakRss, RssSampler, RunStats, descendants, timed_run
from .progress import Progress
from .report import EngineResult, format_report, print_report, summarize, verdict_for, write_json
from .runner import check_engine, run_benchmark
from .workloads import WORKLOADS, Workload, load_callable, make_messages, read_input, transform

__all__ = [
    "ENGINES",
    "PEERS",
    "PICKLE_PROTOCOL",
    "WORKLOADS",
    "BenchConfig",
    "BenchEngine",
    "BenchError",
    "ChunkedEngine",
    "EngineResult",
    "PeakRss",
    "Progress",
    "RssSampler",
    "RunStats",
    "SerialEngine",
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
    "print_report",
    "read_input",
    "result_chunk_length",
    "run_benchmark",
    "run_command",
    "summarize",
    "timed_run",
    "transform",
    "usable_cores",
    "verdict_for",
    "write_json",
]
