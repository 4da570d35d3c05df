"""What one benchmark run is told: :class:`BenchConfig` (throughput) or :class:`StreamConfig`
(``--stream``: latency), and the errors that end a run: :class:`BenchError` for bad options,
:class:`StreamCheckError` for a result lost, duplicated or reordered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .workloads import Workload

__all__ = [
    "DEFAULT_ENGINES",
    "STREAM_ENGINE_KEYS",
    "BenchConfig",
    "BenchError",
    "StreamCheckError",
    "StreamConfig",
]

DEFAULT_ENGINES = ("ordpool", "pool", "executor")
# The engines of --stream, in the order they run (all of them by default).
STREAM_ENGINE_KEYS = (
    "ordpool",
    "ordpool-many",
    "ordpool-imap",
    "pool-imap-1",
    "pool-imap-100",
    "executor-submit",
)


class BenchError(Exception):
    """A problem with the benchmark's options or inputs: reported as one line, exit status 2."""


class StreamCheckError(Exception):
    """An engine of a ``--stream`` run lost, duplicated or reordered a result: reported as one
    line, exit status 1."""


@dataclass
class BenchConfig:
    """Everything a run needs; the command line builds it (:func:`.cli.config_from_args`).

    Attributes:
        workload: what to run.
        workers: one row group per worker count (``[1, 2, 4]``).
        engines: pool engines besides serial, by key (``["ordpool", "pool", "executor"]``).
        messages: number of messages (generated), or the most read from ``input_path``.
        message_size: bytes per generated message (about).
        input_path: read messages from this file instead of generating them.
        repeat: timed runs per engine; the report shows their median.
        start_method: for every pool (``"forkserver"``).
        batch_size: ordpool's batch size, ``None`` for auto.
        chunksizes: candidates swept for the chunked pools (one value: no sweep).
        check: compare every engine's results with serial's, in an untimed pass.
        progress: draw a progress bar on stderr (only when it is a terminal).
        command_line: for the JSON report.
    """

    workload: Workload
    workers: list[int]
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    messages: int | None = None
    message_size: int = 600
    input_path: str | None = None
    repeat: int = 3
    start_method: str = "forkserver"
    batch_size: int | None = None
    chunksizes: tuple[int, ...] | None = None
    check: bool = False
    progress: bool = True
    command_line: str = ""


@dataclass
class StreamConfig:
    """An open-loop latency run (``ordpool bench --stream RATE``; see :mod:`.latency`).

    Attributes:
        rate: items per second fed to every engine (``60_000.0``).
        workers: one row group per worker count (``[2]``).
        duration: seconds of feed per engine; ``rate * duration`` items.
        work_us: CPU per item in the workers, microseconds (a calibrated spin).
        slow_every: every N-th item (``i % N == N - 1``) sleeps ``slow_ms`` instead; ``None``:
            no slow items.
        slow_ms: milliseconds a slow item sleeps.
        spin_us: microseconds before each due time that the producer spins instead of
            sleeping (0: it only sleeps).
        tick_us: the producer wakes at most once per this many microseconds and hands out
            every item due by then (a consumer polling a broker gets messages in bursts too).
        repeat: timed runs per engine, round-robin over the engines; a row shows their
            medians and keeps each run (1 here; the command line's ``--repeat`` default is 3).
        engines: keys of :data:`STREAM_ENGINE_KEYS`, run one after another in this order.
        start_method: for every pool (``"forkserver"``).
        batch_size: ordpool's batch size, ``None`` for auto.
        max_delay: ordpool's ``max_delay`` in seconds, ``None`` for its default.
        progress: draw a progress bar on stderr (only when it is a terminal).
        command_line: for the JSON report.
    """

    rate: float
    workers: list[int]
    duration: float = 10.0
    work_us: float = 8.0
    slow_every: int | None = None
    slow_ms: float = 0.0
    spin_us: float = 0.0
    tick_us: float = 100.0
    repeat: int = 1
    engines: list[str] = field(default_factory=lambda: list(STREAM_ENGINE_KEYS))
    start_method: str = "forkserver"
    batch_size: int | None = None
    max_delay: float | None = None
    progress: bool = True
    command_line: str = ""
