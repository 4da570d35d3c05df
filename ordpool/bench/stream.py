"""``ordpool bench --stream RATE``: the latency of each message in an open loop (see
:func:`run_stream`; the arithmetic is in :mod:`.latency`, the moving parts in :mod:`.openloop`).

What one run does, in order::

    start multiprocessing's helpers (resource tracker, forkserver)
        -> per worker count: open every engine's pool
           -> per engine, one after another, the others idle:
                warm-up: a short untimed open loop at the same rate (every worker calibrates
                its spin and the pool settles its batch size)
                -> the timed open loop: rate x duration items, each due at start + i / rate,
                   fed at its due time, its latency taken when its result reaches the
                   consumer, in order; the parent's CPU (getrusage) over the run
                -> its summary: percentiles, the rate it sustained, parent CPU per message
           -> close the pools
        -> the report: a dict, printed as a table by the command line, [--json FILE]

Each engine gets the same rate, duration and work, and a fresh schedule (its own ``start``);
every result is checked to come back in order, once, and none to be missing
(:class:`.openloop.Recorder`): a run that loses one fails with :class:`.config.StreamCheckError`.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from .config import STREAM_ENGINE_KEYS, BenchError, StreamConfig
from .latency import Schedule, summarize_latencies
from .measure import parent_cpu_seconds, start_helpers
from .openloop import Items, Pacer, Recorder
from .progress import Progress
from .report import STREAM_SCHEMA, machine_info
from .stream_engines import STREAM_ENGINES, StreamEngine

__all__ = ["LEAD", "StreamResult", "run_stream", "warm_items"]

LEAD = 0.02  # seconds from setting up a run to its first due time (threads started by then)

# The fields of PoolStats that say how long results waited in the reorder buffer, read with
# getattr: a pool without them reports None.
_HOLD_FIELDS = ("hold_seconds", "max_hold_seconds", "held_bytes")


@dataclass
class StreamResult:
    """One engine's open loop at one worker count. Times in ms unless named ``_s``.

    Attributes:
        engine, label, workers, params: which engine, as in the table, and its settings.
        rate: items per second it was fed.
        items_due: items in the run (``rate * duration``).
        items_done: results received, in order (equal to ``items_due``, or the run failed).
        wall_s: from the first due time to the last result.
        msgs_per_s: the rate it sustained, ``items_done / wall_s``.
        parent_cpu_s: the parent's CPU (every thread) over the run.
        parent_cpu_us_per_msg: ``parent_cpu_s`` per item, microseconds.
        p50_ms, p99_ms, p999_ms, max_ms, mean_ms: latency over every item, from its due time.
        slow_items, slow_p50_ms, before_slow_p50_ms, other_p50_ms: with ``--slow-every``, the
            slow items, the 5 items just before each, and the rest (see
            :class:`.latency.LatencySummary`).
        feed_lag_mean_ms, feed_lag_max_ms: how late the producer handed out the oldest item
            of a batch, on average over the batches and at worst: the pacing's own error, plus
            the time a pool pushing back held the producer (the latency includes both).
        hold_seconds: time results waited in ordpool's reorder buffer for a predecessor, over
            the run (``None`` where the pool's stats do not say).
        max_hold_seconds, held_bytes: from ordpool's stats after the run, where they exist.
    """

    engine: str
    label: str
    workers: int
    params: dict[str, Any]
    rate: float
    items_due: int
    items_done: int
    wall_s: float
    msgs_per_s: float
    parent_cpu_s: float
    parent_cpu_us_per_msg: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    slow_items: int
    slow_p50_ms: float | None
    before_slow_p50_ms: float | None
    other_p50_ms: float | None
    feed_lag_mean_ms: float
    feed_lag_max_ms: float
    hold_seconds: float | None = None
    max_hold_seconds: float | None = None
    held_bytes: int | None = None


# The fields of a row that are the median of its runs; the others are the same in every run
# (or, for params and held_bytes, as read after the last one).
_MEDIAN_FIELDS = (
    "wall_s",
    "msgs_per_s",
    "parent_cpu_s",
    "parent_cpu_us_per_msg",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "mean_ms",
    "slow_p50_ms",
    "before_slow_p50_ms",
    "other_p50_ms",
    "feed_lag_mean_ms",
    "feed_lag_max_ms",
    "hold_seconds",
    "max_hold_seconds",
)
# Each run's own figures, kept in the row's "runs" list.
_RUN_FIELDS = ("msgs_per_s", "parent_cpu_us_per_msg", "p50_ms", "p99_ms", "p999_ms", "max_ms")


def median_row(runs: list[StreamResult]) -> dict[str, Any]:
    """One engine's row from its runs: the median of each measured field, each run's own
    figures in ``runs``, and ``repeat``, the number of runs.

    >>> r = StreamResult("e", "e", 2, {}, 10.0, 5, 5, 0.5, 10.0, 0.1, 20.0, 1.0, 2.0, 3.0,
    ...                  4.0, 1.5, 0, None, None, None, 0.1, 0.2)
    >>> from dataclasses import replace
    >>> row = median_row([r, replace(r, p99_ms=9.0), replace(r, p99_ms=5.0)])
    >>> row["p99_ms"], row["repeat"], [run["p99_ms"] for run in row["runs"]]
    (5.0, 3, [2.0, 9.0, 5.0])
    """
    rows = [asdict(run) for run in runs]
    row = dict(rows[-1])
    for field in _MEDIAN_FIELDS:
        values = [r[field] for r in rows if r[field] is not None]
        row[field] = statistics.median(values) if values else None
    row["items_done"] = min(r["items_done"] for r in rows)  # (every run must be complete)
    row["repeat"] = len(rows)
    row["runs"] = [{field: r[field] for field in _RUN_FIELDS} for r in rows]
    return row


def warm_items(rate: float, duration: float) -> int:
    """Items in an engine's untimed warm-up: half a second's worth (a fifth of the duration
    if that is less), from 100 to 10,000.

    >>> warm_items(60_000, 5), warm_items(2_000, 1), warm_items(50, 10)
    (10000, 400, 100)
    """
    return int(min(10_000, max(100, rate * min(0.5, duration / 5))))


def run_stream(config: StreamConfig) -> dict[str, Any]:
    """Run every engine of ``config`` in an open loop; return the report.

    Returns:
        ``schema``, ``machine``, ``config`` and ``rows`` (one :class:`StreamResult` as a dict
        per engine and worker count); the fields are in ``bench/README.md``.

    Raises:
        BenchError: an unknown engine.
        StreamCheckError: an engine lost, duplicated or reordered a result.

    Example:
        >>> config = StreamConfig(rate=2000, workers=[2], duration=1, engines=["ordpool"],
        ...                       progress=False)
        >>> [row["engine"] for row in run_stream(config)["rows"]]  # doctest: +SKIP
        ['ordpool']
    """
    unknown = [key for key in config.engines if key not in STREAM_ENGINES]
    if unknown:
        raise BenchError(
            f"unknown engine {unknown[0]!r} for --stream (choose from "
            f"{', '.join(STREAM_ENGINE_KEYS)})"
        )
    info = machine_info(config.command_line)
    start_helpers(config.start_method)
    bench = _StreamBench(config)
    failed = True
    try:
        rows = [row for workers in config.workers for row in bench.run_group(workers)]
        failed = False
    finally:
        bench.close(abort=failed)
    return {"schema": STREAM_SCHEMA, "machine": info, "config": _config(config), "rows": rows}


def _config(config: StreamConfig) -> dict[str, Any]:
    """The report's ``config``."""
    schedule = Schedule.for_duration(config.rate, config.duration)
    return {
        "rate": config.rate,
        "duration_s": config.duration,
        "repeat": config.repeat,
        "items_per_run": schedule.total,
        "warmup_items": warm_items(config.rate, config.duration),
        "work_us": config.work_us,
        "slow_every": config.slow_every,
        "slow_ms": config.slow_ms if config.slow_every else None,
        "workers": config.workers,
        "engines": config.engines,
        "start_method": config.start_method,
        "batch_size": config.batch_size or "auto",
        "max_delay": config.max_delay,
        "spin_us": config.spin_us,
        "tick_us": config.tick_us,
    }


class _StreamBench:
    """The pools of one ``--stream`` run, the order they run in, and the progress bar."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.open: list[StreamEngine] = []  # every pool open now, to close on the way out
        # open, then warm and run per repeat
        steps = (1 + 2 * config.repeat) * len(config.engines) * len(config.workers)
        self.progress = Progress(steps, enabled=config.progress)

    def run_group(self, workers: int) -> list[dict[str, Any]]:
        """One worker count: open every pool, then warm and time each in turn, ``repeat``
        rounds of every engine (round-robin: a noisy spell of the machine falls on every
        engine alike, not on one); close them. A row holds each run and their medians."""
        engines = [STREAM_ENGINES[key](workers, self.config) for key in self.config.engines]
        for engine in engines:
            self.progress.step(f"{engine.label()}, {workers} workers: starting")
            self.open.append(engine)
            engine.open()
            self.progress.advance()
        runs: list[list[StreamResult]] = [[] for _ in engines]
        for _ in range(self.config.repeat):
            for engine, done in zip(engines, runs):
                done.append(self._measure(engine))
        for engine in engines:
            self.open.remove(engine)
            engine.close()
        return [median_row(done) for done in runs]

    def _measure(self, engine: StreamEngine) -> StreamResult:
        config = self.config
        self.progress.step(f"{engine.label()}: warm-up")
        open_loop(engine, config, warm_items(config.rate, config.duration) / config.rate)
        self.progress.advance()
        self.progress.step(f"{engine.label()}: {config.rate:,.0f} msg/s for {config.duration} s")
        before = engine.pool_stats()
        run = open_loop(engine, config, config.duration)
        result = run.result(engine, config, before, engine.pool_stats())
        self.progress.advance()
        return result

    def close(self, abort: bool) -> None:
        """Stop the progress bar and every pool still open (``abort``: kill them)."""
        self.progress.close()
        for engine in self.open:
            engine.close(abort=abort)
        self.open.clear()


@dataclass
class OpenLoopRun:
    """What one open loop leaves: its schedule, the consumer's record, the producer's pacer,
    and the parent's CPU seconds over it."""

    schedule: Schedule
    recorder: Recorder
    pacer: Pacer
    parent_cpu_s: float

    def result(
        self, engine: StreamEngine, config: StreamConfig, before: Any, after: Any
    ) -> StreamResult:
        """The run's :class:`StreamResult`; ``before``/``after`` are the pool's stats."""
        schedule, recorder = self.schedule, self.recorder
        summary = summarize_latencies(schedule.latencies(recorder.received), config.slow_every)
        wall = recorder.received[-1] - schedule.start
        return StreamResult(
            engine=engine.key,
            label=engine.label(),
            workers=engine.workers,
            params=engine.params(),
            rate=config.rate,
            items_due=schedule.total,
            items_done=recorder.count,
            wall_s=wall,
            msgs_per_s=recorder.count / wall,
            parent_cpu_s=self.parent_cpu_s,
            parent_cpu_us_per_msg=self.parent_cpu_s / recorder.count * 1e6,
            **asdict(summary),
            feed_lag_mean_ms=self.pacer.mean_lag * 1e3,
            feed_lag_max_ms=self.pacer.max_lag * 1e3,
            **_hold(before, after),
        )


def open_loop(engine: StreamEngine, config: StreamConfig, duration: float) -> OpenLoopRun:
    """Feed ``engine`` ``config.rate`` items per second for ``duration`` seconds, consume every
    result in order; the parent's CPU over it.

    Raises:
        StreamCheckError: a result lost, duplicated or out of order.
    """
    items = Items(config.work_us, config.slow_every, config.slow_ms)
    gc.collect()
    schedule = Schedule.for_duration(config.rate, duration, time.perf_counter() + LEAD)
    pacer = Pacer(schedule, items, spin=config.spin_us / 1e6, tick=config.tick_us / 1e6)
    recorder = Recorder(schedule.total, engine.label())
    cpu0 = parent_cpu_seconds()
    engine.run(pacer, recorder)
    cpu = parent_cpu_seconds() - cpu0
    recorder.finish()
    return OpenLoopRun(schedule, recorder, pacer, cpu)


def _hold(before: Any, after: Any) -> dict[str, Any]:
    """The reorder-buffer fields of ordpool's stats: ``hold_seconds`` over the run (after -
    before), the others as read after it; ``None`` where the stats lack them."""
    hold = {name: getattr(after, name, None) for name in _HOLD_FIELDS}
    start = getattr(before, "hold_seconds", None)
    if hold["hold_seconds"] is not None and start is not None:
        hold["hold_seconds"] -= start
    return hold
