"""One benchmark run, from the options to the report (see :func:`run_benchmark`).

What one run does, in order::

    [--fn/--init loaded by the command line: cwd on sys.path and PYTHONPATH, for the workers too]
    start multiprocessing's helpers (resource tracker, forkserver)
        -> [fork only: open every pool now, before the data exists]
        -> build the message list once (or read --input)
        -> per worker count: open serial and each engine's pool once -> warm each (small
           untimed run; the chunked pools sweep chunksize candidates on a calibration slice
           and keep the best)
           -> K rounds: one timed run of every engine per round (serial is the speedup base)
           -> [--check: untimed pass of each engine vs serial] -> close
        -> the report: a dict, printed as tables by the command line, [--json FILE]

Methodology, and why:

* **Copy-on-write.** With ``fork``, a pool started after the benchmark data was built shares the
  data's pages with its workers, and every reference count the parent then touches copies a
  page: the parent's CPU per message doubles or triples. Every engine therefore defaults to
  ``forkserver``; with ``--start-method fork`` every pool is opened *before* the data is built.
* **Same input, same function.** The message list is built once and reused by every engine; the
  function is a module-level callable, so the stdlib pools pickle it by reference. Worker state
  (``--init``) reaches the other pools through their ``initializer``, stored in a module global
  read by a top-level wrapper (:func:`.workloads.call_with_state`).
* **Warm pools, reused.** Each pool is created once per worker count, warmed with a small
  untimed run, and serves every timed run.
* **Rounds, not blocks.** The repeats run in rounds across the engines (serial, ordpool, Pool,
  executor; then again), with every pool of a worker count open meanwhile: a drift of the
  machine's speed (a virtual machine's neighbours, frequency changes: 30% within minutes on
  the project's machine) then hits every engine alike instead of skewing one engine's ratio.
* **Consuming results costs nothing.** Timed runs drain the iterator with
  ``collections.deque(it, maxlen=0)``: no list, no retention, no GC pressure. ``--check``
  compares every engine's results with serial's in a separate, untimed pass.
* **Fair chunk sizes.** The chunked pools are slow with their default chunksize
  (``ProcessPoolExecutor.map`` with chunksize 1 runs at 0.09x serial); each gets the best of a
  few candidates, measured on a calibration slice, and the table says which.
* **What is measured**: see :mod:`.measure`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any, Callable, Sequence

from ._runtime import usable_cores
from .config import BenchConfig, BenchError
from .engines import ENGINES, BenchEngine, ChunkedEngine, SerialEngine
from .measure import RunStats, start_helpers, timed_run
from .progress import Progress
from .report import SCHEMA, EngineResult, machine_info, qualname, summarize
from .workloads import input_bytes, make_messages, read_input

__all__ = ["check_engine", "run_benchmark"]


def run_benchmark(
    config: BenchConfig, extra_engines: dict[str, type[BenchEngine]] | None = None
) -> dict[str, Any]:
    """Run the comparison described by ``config``; return the report (see ``bench/README.md``).

    Args:
        config: what to run.
        extra_engines: more engine classes by key; ``config.engines`` picks among these and
            the built-in ones (:data:`.engines.ENGINES`).

    Returns:
        The report: ``schema``, ``machine``, ``config``, ``groups`` (per worker count, each
        engine's :class:`.report.EngineResult` as a dict) and ``check_passed``.

    Raises:
        BenchError: bad options or input.
        Exception: whatever the workload raised (in the serial warm-up, usually).

    Example:
        >>> from ordpool.bench import WORKLOADS
        >>> config = BenchConfig(WORKLOADS["transform"], [1], ["ordpool"], messages=500,
        ...                      repeat=1, progress=False)
        >>> report = run_benchmark(config)  # doctest: +SKIP
        >>> [e["engine"] for e in report["groups"][0]["engines"]]  # doctest: +SKIP
        ['serial', 'ordpool']
    """
    registry = _registry(config.engines, extra_engines)
    bench = _Benchmark(config, registry, usable_cores())
    info = machine_info(config.command_line)
    start_helpers(config.start_method)
    failed = True
    try:
        bench.open_before_data()
        messages = bench.load_messages()
        groups = [bench.run_group(workers, messages) for workers in config.workers]
        failed = False
    finally:
        bench.close(abort=failed)
    return _report(config, info, len(messages), bench.nbytes, groups)


def _registry(
    keys: Sequence[str], extra_engines: dict[str, type[BenchEngine]] | None
) -> dict[str, type[BenchEngine]]:
    registry = {**ENGINES, **(extra_engines or {})}
    unknown = [key for key in keys if key not in registry]
    if unknown:
        raise BenchError(f"unknown engine {unknown[0]!r} (choose from {', '.join(registry)})")
    return registry


class _Benchmark:
    """The pools of one run, the order they run in, and the progress bar.

    Repeats run in rounds (serial, ordpool, Pool, PPE, serial, ordpool, ...), so that a drift
    of the machine's speed (a VM's neighbours, frequency changes) hits every engine alike
    instead of skewing the ratios of whichever engine ran during it.
    """

    def __init__(
        self, config: BenchConfig, registry: dict[str, type[BenchEngine]], cores: int
    ) -> None:
        self.config = config
        self.registry = registry
        self.cores = cores  # usable cores, for the verdicts: 2
        # Every pool open now, to close on the way out: [OrdpoolEngine, MpPoolEngine, ...]
        self.open: list[BenchEngine] = []
        # With fork, the pools opened before the data, by worker count: {2: [...]}
        self.opened: dict[int, list[BenchEngine]] = {}
        self.nbytes: int | None = None  # the input's size, when it is bytes: 120_000_000
        engines, groups = len(config.engines), len(config.workers)
        steps = (engines + 1) * (config.repeat + 1) + engines * config.check
        self.progress = Progress(1 + groups * steps, enabled=config.progress)

    def make(self, workers: int) -> list[BenchEngine]:
        """A new engine of each key in ``config.engines``, not opened yet."""
        return [
            self.registry[key](self.config.workload, workers, self.config)
            for key in self.config.engines
        ]

    def open_before_data(self) -> None:
        """With fork, every pool starts before the data exists (copy-on-write: see the module
        docstring); otherwise nothing."""
        if self.config.start_method != "fork":
            return
        for workers in self.config.workers:
            self.progress.step(f"starting pools, {workers} workers")
            self.opened[workers] = self.make(workers)
            for engine in self.opened[workers]:
                self.open.append(engine)
                engine.open()

    def load_messages(self) -> list[Any]:
        """The messages every engine gets: read from ``--input``, or generated."""
        config = self.config
        self.progress.step("building messages")
        if config.input_path is not None:
            messages = read_input(config.input_path, config.messages)
        else:
            messages = make_messages(
                config.messages or config.workload.messages, config.message_size
            )
        self.nbytes = input_bytes(messages)
        return messages

    def run_group(self, workers: int, messages: Sequence[Any]) -> dict[str, Any]:
        """One worker count: open, warm, the timed rounds, the results (the pools closed
        after, except with fork)."""
        serial = SerialEngine(self.config.workload, 1, self.config)
        serial.open()
        engines: list[BenchEngine] = [serial]
        try:
            engines += self._open_group(workers)
            self._warm(engines, messages)
            runs = self._rounds(engines, messages)
            results = self._results(serial, engines, runs, messages)
        except BaseException:
            for engine in engines[1:]:
                self._close(engine, abort=True)
            raise
        if self.config.start_method != "fork":
            for engine in engines[1:]:
                self._close(engine)
        return {"workers": workers, "engines": [asdict(r) for r in results]}

    def _open_group(self, workers: int) -> list[BenchEngine]:
        group = self.opened.get(workers) or self.make(workers)
        for engine in group:
            if engine not in self.open:
                self.progress.step(f"{engine.name}, {workers} workers: starting")
                self.open.append(engine)
                engine.open()
        return group

    def _warm(self, engines: list[BenchEngine], messages: Sequence[Any]) -> None:
        for engine in engines:
            calibrate = isinstance(engine, ChunkedEngine) and len(engine.candidates) > 1
            self.progress.step(f"{engine.name}: warm-up" + ", chunksize sweep" * calibrate)
            engine.prepare(messages)
            self.progress.advance()

    def _rounds(self, engines: list[BenchEngine], messages: Sequence[Any]) -> list[list[RunStats]]:
        """``config.repeat`` timed runs of each engine, one of each per round."""
        runs: list[list[RunStats]] = [[] for _ in engines]
        repeat = self.config.repeat
        for r in range(repeat):
            for engine, engine_runs in zip(engines, runs):
                self.progress.step(f"round {r + 1}/{repeat}: {engine.name}")
                engine_runs.append(timed_run(engine, messages))
                self.progress.advance()
        return runs

    def _results(
        self,
        serial: SerialEngine,
        engines: list[BenchEngine],
        runs: list[list[RunStats]],
        messages: Sequence[Any],
    ) -> list[EngineResult]:
        """Each engine's medians and verdict (serial first), checked against serial's results
        with ``--check``."""
        n, nbytes, cores, check = len(messages), self.nbytes, self.cores, self.config.check
        serial_result = summarize(serial, runs[0], n, nbytes, None, cores)
        serial_result.speedup = 1.0
        serial_result.check = "reference" if check else None
        results = [serial_result]
        for engine, engine_runs in zip(engines[1:], runs[1:]):
            result = summarize(engine, engine_runs, n, nbytes, serial_result.wall_s, cores)
            if check:
                self.progress.step(f"{engine.name}, {engine.workers} workers: checking results")
                result.check = check_engine(engine, serial.call, messages)
                self.progress.advance()
            results.append(result)
        return results

    def _close(self, engine: BenchEngine, abort: bool = False) -> None:
        if engine in self.open:
            self.open.remove(engine)
            engine.close(abort=abort)

    def close(self, abort: bool) -> None:
        """Stop the progress bar and every pool still open (``abort``: kill them)."""
        self.progress.close()
        for engine in self.open:
            engine.close(abort=abort)
        self.open.clear()


def _report(
    config: BenchConfig,
    info: dict[str, Any],
    n: int,
    nbytes: int | None,
    groups: list[dict[str, Any]],
) -> dict[str, Any]:
    """The report's top level (its fields: ``bench/README.md``)."""
    workload = config.workload
    return {
        "schema": SCHEMA,
        "machine": info,
        "config": {
            "workload": workload.name,
            "description": workload.description,
            "fn": qualname(workload.fn),
            "init": None if workload.init is None else qualname(workload.init),
            "input": config.input_path,
            "messages": n,
            "input_bytes": nbytes,
            "avg_message_bytes": None if nbytes is None else nbytes / n,
            "repeat": config.repeat,
            "workers": config.workers,
            "engines": ["serial", *config.engines],
            "start_method": config.start_method,
            "batch_size": config.batch_size or "auto",
            "chunksizes": list(config.chunksizes or workload.chunksizes),
            "check": config.check,
        },
        "groups": groups,
        "check_passed": None
        if not config.check
        else all(e["check"] in ("ok", "reference") for g in groups for e in g["engines"]),
    }


_MISSING = object()


def check_engine(
    engine: BenchEngine, reference: Callable[[Any], Any], messages: Sequence[Any]
) -> str:
    """Compare ``engine``'s results with ``map(reference, messages)``, streaming, untimed.

    Returns:
        ``"ok"``, or a description of the first difference.
    """
    pairs = itertools.zip_longest(
        map(reference, messages), engine.imap(messages), fillvalue=_MISSING
    )
    for index, (want, got) in enumerate(pairs):
        if want is _MISSING:
            return f"MISMATCH: more results than messages ({index + 1} or more)"
        if got is _MISSING:
            return f"MISMATCH: only {index} results for {len(messages)} messages"
        if want != got:
            return f"MISMATCH at message {index}: serial gave {_short(want)}, got {_short(got)}"
    return "ok"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
