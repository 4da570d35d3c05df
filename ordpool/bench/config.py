"""What one benchmark run is told: :class:`BenchConfig`, and :class:`BenchError` for bad options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .workloads import Workload

__all__ = ["DEFAULT_ENGINES", "BenchConfig", "BenchError"]

DEFAULT_ENGINES = ("ordpool", "pool", "executor")


class BenchError(Exception):
    """A problem with the benchmark's options or inputs: reported as one line, exit status 2."""


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
