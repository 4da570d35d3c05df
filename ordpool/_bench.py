"""``ordpool bench``: ordpool against one process and the stdlib pools, same input, same function.

What one run does, in order::

    parse options -> load --fn/--init (cwd on sys.path and PYTHONPATH, for the workers too)
        -> start multiprocessing's helpers (resource tracker, forkserver)
        -> [fork only: open every pool now, before the data exists]
        -> build the message list once (or read --input)
        -> per worker count: open serial, ordpool, multiprocessing.Pool.imap and
           ProcessPoolExecutor.map once -> warm each (small untimed run; the stdlib pools
           sweep chunksize candidates on a calibration slice and keep the best)
           -> K rounds: one timed run of every engine per round (serial is the speedup base)
           -> [--check: untimed pass of each engine vs serial] -> close
        -> table on stdout, verdict per engine, [--json FILE]

Methodology, and why (numbers in ``PERF.md``):

* **Copy-on-write.** With ``fork``, a pool started after the benchmark data was built shares the
  data's pages with its workers, and every reference count the parent then touches copies a
  page: the parent's CPU per message doubles or triples. Every engine therefore defaults to
  ``forkserver``; with ``--start-method fork`` every pool is opened *before* the data is built.
* **Same input, same function.** The message list is built once and reused by every engine; the
  function is a module-level callable, so the stdlib pools pickle it by reference. Worker state
  (``--init``) reaches the stdlib pools through their ``initializer``, stored in a module global
  read by a top-level wrapper (:func:`_call_with_state`).
* **Warm pools, reused.** Each pool is created once per worker count, warmed with a small
  untimed run, and serves every timed run.
* **Rounds, not blocks.** The repeats run in rounds across the engines (serial, ordpool, Pool,
  executor; then again), with every pool of a worker count open meanwhile: a drift of the
  machine's speed (a virtual machine's neighbours, frequency changes: 30% within minutes on
  the project's machine) then hits every engine alike instead of skewing one engine's ratio.
* **Consuming results costs nothing.** Timed runs drain the iterator with
  ``collections.deque(it, maxlen=0)``: no list, no retention, no GC pressure. ``--check``
  compares every engine's results with serial's in a separate, untimed pass.
* **Fair chunk sizes.** The stdlib pools are slow with their default chunksize (PERF.md: 0.09x
  serial for ``ProcessPoolExecutor.map`` with chunksize 1); each gets the best of a few
  candidates, measured on a calibration slice, and the table says which.
* **What is measured.** Wall time (median of ``--repeat`` runs); the parent's CPU from
  ``getrusage(RUSAGE_SELF)`` (every parent thread); the workers' CPU from ``psutil``
  (``cpu_times`` of each worker process); peak RSS of parent + workers: the sum of each
  process's own peak, which Linux keeps (``VmHWM``, reset before each run), so that nothing
  runs in the parent during a timed run but the engine; elsewhere, sampled every 50 ms by a
  background thread. Shared pages count once per process, so it overstates a little.

The verdict names what limits an engine. Its throughput is at most
``min(cores / (work + worker overhead), 1 / parent cost per message)``: *parent-bound* when the
parent is near one core (the ceiling ``1 / parent cost`` is printed), *worker-bound* when the
workers use nearly all the cores they can have, *input-bound* when neither is busy (the
workers wait: latency, sleeps, or round trips).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import gc
import importlib
import itertools
import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import sys
import threading
import time
import traceback
import zlib
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import orjson
import psutil

__all__ = [
    "WORKLOADS",
    "BenchConfig",
    "BenchEngine",
    "BenchError",
    "Workload",
    "add_arguments",
    "config_from_args",
    "descendants",
    "format_report",
    "load_callable",
    "make_messages",
    "parse_int_list",
    "read_input",
    "run_benchmark",
    "run_command",
    "transform",
]

SCHEMA = "ordpool-bench/1"
_SAMPLE_INTERVAL = 0.05  # seconds between RSS samples
_MB = 1e6


class BenchError(Exception):
    """A problem with the benchmark's options or inputs: reported as one line, exit status 2."""


# -- workloads -----------------------------------------------------------------------------------
# Module-level functions, so that every pool (and pickle) finds them by reference.

_REQUIRED_FIELDS = (
    ("id", int),
    ("ts", float),
    ("user", str),
    ("values", list),
    ("tags", list),
    ("meta", dict),
)


def transform(raw: bytes) -> tuple[int, str, float, int, int]:
    """Decode with stdlib ``json``, validate, compute a few fields: a 5-tuple (about 8 us).

    The shape of a typical stream job: the worker does more than the parent must undo (a small
    tuple is cheap to send back), unlike a plain decode.

    Raises:
        ValueError: a required field is missing or has the wrong type.

    >>> transform(make_messages(1)[0])[:2]
    (0, 'user00000')
    """
    doc = json.loads(raw)
    for key, kind in _REQUIRED_FIELDS:
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"message field {key!r} is missing or not {kind.__name__}")
    values = doc["values"]
    mean = sum(values) / len(values) if values else 0.0
    score = len(doc["tags"]) + (2 if doc["meta"].get("priority") == "high" else 0)
    return doc["id"], doc["user"].lower(), round(mean, 6), score, zlib.crc32(raw)


def sleep_1ms(raw: bytes) -> int:
    """Sleep one millisecond (a latency-bound job: a lookup, a call); return the message size."""
    time.sleep(0.001)
    return len(raw)


@dataclass(frozen=True)
class Workload:
    """What every engine runs: ``fn(msg)``, or ``fn(state, msg)`` with ``state = init(*initargs)``.

    Attributes:
        name: ``"transform"``, ``"decode"``, ..., or ``"module:function"`` for ``--fn``.
        fn: a module-level callable (the stdlib pools pickle it by reference).
        init: builds a worker's state, or ``None``.
        initargs: arguments for ``init``.
        messages: default number of generated messages.
        chunksizes: chunksize candidates swept for the stdlib pools.
        description: one line for the report.
    """

    name: str
    fn: Callable[..., Any]
    init: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    messages: int = 200_000
    chunksizes: tuple[int, ...] = (100, 1000, 5000)
    description: str = ""

    def serial_callable(self) -> Callable[[Any], Any]:
        """``fn`` ready to call in this process (its state built here, once)."""
        if self.init is None:
            return self.fn
        return functools.partial(self.fn, self.init(*self.initargs))


WORKLOADS: dict[str, Workload] = {
    "transform": Workload(
        "transform",
        transform,
        description="stdlib json.loads + validation + computed fields -> 5-tuple (~8 us/msg)",
    ),
    "decode": Workload("decode", orjson.loads, description="orjson.loads -> dict"),
    "stdlib-json": Workload("stdlib-json", json.loads, description="json.loads -> dict"),
    "sleep": Workload(
        "sleep",
        sleep_1ms,
        messages=1_000,
        chunksizes=(1, 10, 100),
        description="time.sleep(0.001) per message (latency-bound)",
    ),
}

# -- input ---------------------------------------------------------------------------------------

_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
)


def make_messages(n: int, size: int = 600, seed: int = 0) -> list[bytes]:
    """``n`` Kafka-like JSON messages of about ``size`` bytes each (compact, orjson-encoded).

    A nested object: id, timestamp, user, kind, 10 floats, a list of tags, a sub-object, and a
    ``text`` field padded to reach ``size``. Deterministic for a given ``seed``.

    >>> msgs = make_messages(3, size=300)
    >>> [orjson.loads(m)["id"] for m in msgs]
    [0, 1, 2]
    >>> all(280 <= len(m) <= 320 for m in msgs)
    True
    """
    rng = random.Random(seed)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(8192))
    bases = []
    for b in range(min(n, 256)):
        doc: dict[str, Any] = {
            "id": 0,
            "ts": 1.7e9,
            "user": f"User{b:05d}",
            "kind": rng.choice(("click", "view", "buy", "scroll")),
            "values": [round(rng.uniform(-1e3, 1e3), 4) for _ in range(10)],
            "tags": rng.sample(_WORDS, rng.randint(1, 4)),
            "meta": {
                "source": rng.choice(("web", "ios", "android")),
                "priority": rng.choice(("high", "low", "low")),
                "session": f"{rng.getrandbits(128):032x}",
                "version": 3,
            },
            "text": "",
        }
        pad = max(0, size - len(orjson.dumps(doc)) - 12)  # 12: room for the id and ts digits
        start = rng.randrange(len(letters) - min(pad, len(letters) - 1))
        doc["text"] = (letters * (pad // len(letters) + 1))[start : start + pad]
        bases.append(doc)
    out = []
    dumps = orjson.dumps
    for i in range(n):
        doc = bases[i % len(bases)]
        doc["id"] = i
        doc["user"] = f"User{i % 100_000:05d}"
        doc["ts"] = 1.7e9 + i * 0.001
        out.append(bytes(memoryview(dumps(doc))))  # see _compact
    return out


def _compact(data: bytes) -> bytes:
    """A copy of ``data`` that owns just its bytes.

    ``orjson.dumps`` returns bytes that keep its whole output buffer: a 600-byte message holds
    about 8 KB of memory (orjson 3.13). A million of them would be 8 GB, and the benchmark
    would measure page faults and cache misses.
    """
    return bytes(memoryview(data))


def read_input(path: str | os.PathLike[str], limit: int | None = None) -> list[bytes]:
    """Messages from a file: one per line (blank lines skipped), or the items of a JSON array.

    A file that parses as one JSON array gives one message per element, re-encoded compactly
    with orjson, so ``fn`` gets ``bytes`` of one JSON document either way.

    Raises:
        BenchError: the file cannot be read or holds no message.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read --input {str(path)!r}: {exc.strerror or exc}") from exc
    messages: list[bytes] | None = None
    if data.lstrip()[:1] == b"[":
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, list):
            messages = [_compact(orjson.dumps(item)) for item in doc]
    if messages is None:
        messages = [line for line in (raw.strip() for raw in data.splitlines()) if line]
    if limit is not None:
        messages = messages[:limit]
    if not messages:
        raise BenchError(f"--input {str(path)!r} holds no message")
    return messages


def _input_bytes(messages: Sequence[Any]) -> int | None:
    """Total size of the messages, when they are bytes or str (else None)."""
    total = 0
    for m in messages:
        if not isinstance(m, (bytes, bytearray, str)):
            return None
        total += len(m)
    return total


# -- user callables ------------------------------------------------------------------------------


def _make_cwd_importable() -> None:
    """Put the current directory on ``sys.path`` here, and on ``PYTHONPATH`` for the workers.

    Workers started with ``spawn`` get this process's ``sys.path``; the ``forkserver`` (Python
    3.11) does not, but inherits the environment. Call it before the first pool starts.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *parts])


def load_callable(spec: str, option: str = "--fn") -> Callable[..., Any]:
    """Import ``"package.module:function"`` (the current directory is importable).

    Raises:
        BenchError: a malformed spec, a module that cannot be imported, a missing attribute,
            or something that is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BenchError(f"{option} must look like module:function, got {spec!r}")
    _make_cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BenchError(f"{option} {spec}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise BenchError(
            f"{option} {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BenchError(
                f"{option} {spec}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise BenchError(f"{option} {spec}: {type(obj).__name__} object is not callable")
    return obj  # type: ignore[no-any-return]


# Worker state for the stdlib pools: set by their initializer, read by the wrapper.
_STATE: Any = None


def _stdlib_init(init: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
    """``initializer`` of the stdlib pools: build the worker's state once, keep it global."""
    global _STATE
    _STATE = init(*initargs)


def _call_with_state(fn: Callable[[Any, Any], Any], msg: Any) -> Any:
    """``fn(state, msg)`` with the state the initializer built (used via functools.partial)."""
    return fn(_STATE, msg)


_UNSET: Any = object()
_LAZY_STATE: Any = _UNSET


def _call_with_lazy_state(
    init: Callable[..., Any], initargs: tuple[Any, ...], fn: Callable[[Any, Any], Any], msg: Any
) -> Any:
    """``fn(state, msg)`` for pools without an initializer: the state is built on first use."""
    global _LAZY_STATE
    if _LAZY_STATE is _UNSET:
        _LAZY_STATE = init(*initargs)
    return fn(_LAZY_STATE, msg)


# -- processes -----------------------------------------------------------------------------------

_HELPER_MARKERS = (
    "multiprocessing.forkserver import",
    "multiprocessing.resource_tracker import",
    "loky.backend.resource_tracker",  # joblib's (bench/peers.py)
)


def descendants() -> set[int]:
    """Pids of this process's descendants, without multiprocessing's helper processes.

    Workers started by the forkserver are its children (our grandchildren): they count, the
    forkserver itself and the resource tracker do not.
    """
    me = psutil.Process()
    helpers = set()
    for child in me.children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(marker in cmdline for marker in _HELPER_MARKERS):
            helpers.add(child.pid)
    return {p.pid for p in me.children(recursive=True)} - helpers


def _start_helpers(start_method: str) -> None:
    """Start the resource tracker (and the forkserver) now, so they are not mistaken for workers.

    Also keeps their start out of the first pool's start-up.
    """
    multiprocessing.resource_tracker.ensure_running()
    if start_method == "forkserver":
        multiprocessing.forkserver.ensure_running()


def _cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds used so far by ``procs`` (gone processes count 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _busy_seconds() -> float:
    """CPU seconds spent so far, by anyone, on the cores this process may use."""
    try:
        cpus = psutil.Process().cpu_affinity() or []
    except (AttributeError, psutil.Error):
        cpus = []
    per_cpu = psutil.cpu_times(percpu=True)
    busy = 0.0
    for i, t in enumerate(per_cpu):
        if cpus and i not in cpus:
            continue
        busy += sum(t) - t.idle - getattr(t, "iowait", 0.0)
    return busy


def _parent_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _RssSampler:
    """Background thread: peak RSS of the parent and of the workers, sampled every 50 ms."""

    def __init__(self, workers: Sequence[psutil.Process]) -> None:
        self._me = psutil.Process()
        self._workers = list(workers)
        self._stop = threading.Event()
        self.peak_total = 0
        self.peak_parent = 0
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        parent = self._me.memory_info().rss
        total = parent
        for p in self._workers:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak_parent = max(self.peak_parent, parent)
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL):
            self.sample()

    def __enter__(self) -> _RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class _PeakRss:
    """Peak RSS of the parent and of the workers over a timed run, measured without running
    anything during it where Linux allows.

    There, the kernel keeps each process's high-water mark (``VmHWM`` in ``/proc/PID/status``),
    and writing ``5`` to ``/proc/PID/clear_refs`` resets it: reset before the run, read after.
    A sampling thread would take the GIL 20 times a second in the very process it measures,
    and each time force a switch away from a consumer holding it: on ``decode`` it cost
    ordpool's multi-threaded parent about 5% of its throughput (medians of 5 runs, 416k
    against 396k msg/s). ``peak_total`` is then the sum of each process's own peak, which
    bounds their simultaneous peak from above. Elsewhere (no ``/proc``, or no right to write
    there), :class:`_RssSampler` samples every 50 ms as before.
    """

    def __init__(self, workers: Sequence[psutil.Process]) -> None:
        self._pids = [os.getpid(), *(p.pid for p in workers)]
        self._sampler: _RssSampler | None = None
        self._workers = workers
        self.peak_total = 0
        self.peak_parent = 0

    def __enter__(self) -> _PeakRss:
        try:
            for pid in self._pids:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            if _hwm(self._pids[0]) is None:
                raise OSError("no VmHWM")
        except OSError:
            self._sampler = _RssSampler(self._workers).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            self.peak_total, self.peak_parent = self._sampler.peak_total, self._sampler.peak_parent
            return
        peaks = [_hwm(pid) for pid in self._pids]
        self.peak_parent = peaks[0] or 0
        self.peak_total = sum(p for p in peaks if p is not None)  # a gone worker counts 0


def _hwm(pid: int) -> int | None:
    """The peak RSS of process ``pid`` in bytes (``VmHWM``), or ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- engines -------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything a run needs; built from the command line by :func:`config_from_args`.

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
        chunksizes: candidates swept for the stdlib pools (one value: no sweep).
        check: compare every engine's results with serial's, in an untimed pass.
        progress: draw a progress bar on stderr (only when it is a terminal).
        command_line: for the JSON report.
    """

    workload: Workload
    workers: list[int]
    engines: list[str] = field(default_factory=lambda: ["ordpool", "pool", "executor"])
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


class BenchEngine:
    """One way of running the workload, with its pool opened once per worker count.

    Subclasses set ``key``/``name`` and implement :meth:`open`, :meth:`imap`, :meth:`close`;
    :meth:`prepare` warms the pool (and may calibrate). Worker pids default to the processes
    that appeared while :meth:`open` ran (psutil), which suits any pool that starts its
    workers eagerly.
    """

    key = ""  # "ordpool"
    name = ""  # "ordpool" in the table, with params() appended

    def __init__(self, workload: Workload, workers: int, config: BenchConfig) -> None:
        self.workload = workload
        self.workers = workers
        self.config = config
        self._pids: list[int] = []

    def label(self) -> str:
        """Name and parameters, for the table (``"mp.Pool.imap (chunk 1000)"``)."""
        return self.name

    def params(self) -> dict[str, Any]:
        """The engine's parameters, for the JSON report."""
        return {}

    def open(self) -> None:
        """Start the pool and its workers."""

    def prepare(self, messages: Sequence[Any]) -> None:
        """Warm the pool with a small untimed run (and calibrate, for the stdlib pools)."""
        collections.deque(self.imap(messages[: _warm_count(len(messages))]), maxlen=0)

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        """The results, lazily, in input order."""
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (empty for serial)."""
        return list(self._pids)

    def close(self, abort: bool = False) -> None:
        """Stop the pool (``abort``: kill it, an error is propagating).

        This default fits pools with ``close``/``terminate``/``join`` in ``self._pool``
        (ordpool, ``multiprocessing.Pool``); others override it.
        """
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        if abort:
            pool.terminate()
        else:
            pool.close()
        pool.join()

    def _track_workers(self, start: Callable[[], None]) -> None:
        """Run ``start``; the processes that appeared meanwhile are (more of) the workers.

        A pool that starts its workers on first use wraps its warm-up in this too.
        """
        before = descendants()
        start()
        self._pids = sorted(set(self._pids) | (descendants() - before))


def _warm_count(n: int) -> int:
    return max(1, min(2000, n // 10))


class SerialEngine(BenchEngine):
    """The same function in this process: the reference for speedup and ``--check``."""

    key = name = "serial"

    def open(self) -> None:
        self.call = self.workload.serial_callable()

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        return map(self.call, messages)


class OrdpoolEngine(BenchEngine):
    """``ordpool.ProcessOrderedPool(...).imap(messages)``."""

    key = name = "ordpool"

    def label(self) -> str:
        size = self.config.batch_size
        return f"ordpool (batch {'auto' if size is None else size})"

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"batch_size": self.config.batch_size or "auto"}
        pool = getattr(self, "_pool", None)
        if pool is not None and pool.state == "running":
            params["batch_size_now"] = pool.stats().batch_size  # what "auto" settled on
        return params

    def open(self) -> None:
        from ._pool import ProcessOrderedPool

        self._pool = ProcessOrderedPool(
            self.workload.fn,
            self.workers,
            init=self.workload.init,
            initargs=self.workload.initargs,
            batch_size=self.config.batch_size,
            start_method=self.config.start_method,
            init_timeout=120,
        )

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        return self._pool.imap(messages)

    def worker_pids(self) -> list[int]:
        return self._pool.worker_pids()


class ChunkedEngine(BenchEngine):
    """A pool with a ``chunksize``: the best of a few candidates is found by :meth:`prepare`."""

    def __init__(self, workload: Workload, workers: int, config: BenchConfig) -> None:
        super().__init__(workload, workers, config)
        self.candidates = config.chunksizes or workload.chunksizes
        self.chunksize = self.candidates[0]
        self.sweep: dict[int, float] = {}  # chunksize -> calibration seconds
        self.calibration_messages = 0

    def label(self) -> str:
        return f"{self.name} (chunk {self.chunksize})"

    def sweep_text(self) -> str:
        """How the chunksize was chosen, for the report."""
        if not self.sweep:
            return f"chunksize {self.chunksize} (fixed)"
        if len(self.sweep) == 1:
            return (
                f"chunksize {self.chunksize}: the only candidate small enough for "
                f"{self.calibration_messages:,} messages"
            )
        tried = ", ".join(
            f"{c}: {self.calibration_messages / t / 1e3:.1f}k/s" for c, t in self.sweep.items()
        )
        return (
            f"chunksize {self.chunksize}: the fastest on a "
            f"{self.calibration_messages:,}-message slice ({tried})"
        )

    def params(self) -> dict[str, Any]:
        return {
            "chunksize": self.chunksize,
            "chunksize_sweep_s": {str(k): round(v, 6) for k, v in self.sweep.items()},
            "calibration_messages": self.calibration_messages,
            "chunksize_choice": self.sweep_text(),
        }

    def fn(self) -> Callable[[Any], Any]:
        """The picklable callable for the pool: ``fn``, or the state wrapper around it."""
        if self.workload.init is None:
            return self.workload.fn
        return functools.partial(_call_with_state, self.workload.fn)

    def initializer(self) -> tuple[Callable[..., Any] | None, tuple[Any, ...]]:
        """``(initializer, initargs)`` for the pool."""
        if self.workload.init is None:
            return None, ()
        return _stdlib_init, (self.workload.init, self.workload.initargs)

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        """The pool's map with this chunksize."""
        raise NotImplementedError

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        return self.map_chunked(messages, self.chunksize)

    def prepare(self, messages: Sequence[Any]) -> None:
        n = len(messages)
        warm = messages[: _warm_count(n)]
        collections.deque(self.map_chunked(warm, max(1, len(warm) // (4 * self.workers))), 0)
        if len(self.candidates) == 1:
            return
        # A fifth of the messages (at least 2,000); candidates too large to give each worker
        # two chunks of the slice are left out (the smallest always runs).
        sample = messages[: min(n, max(n // 5, 2000))]
        fits = [c for c in self.candidates if c * 2 * self.workers <= len(sample)]
        for chunksize in fits or self.candidates[:1]:
            start = time.perf_counter()
            collections.deque(self.map_chunked(sample, chunksize), maxlen=0)
            self.sweep[chunksize] = time.perf_counter() - start
        self.chunksize = min(self.sweep, key=self.sweep.__getitem__)
        self.calibration_messages = len(sample)


class MpPoolEngine(ChunkedEngine):
    """``multiprocessing.Pool.imap(fn, messages, chunksize)``."""

    key = "pool"
    name = "mp.Pool.imap"

    def open(self) -> None:
        ctx = multiprocessing.get_context(self.config.start_method)
        initializer, initargs = self.initializer()

        def start() -> None:
            self._pool = ctx.Pool(self.workers, initializer=initializer, initargs=initargs)

        self._track_workers(start)

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        return self._pool.imap(self.fn(), messages, chunksize=chunksize)


class ExecutorEngine(ChunkedEngine):
    """``concurrent.futures.ProcessPoolExecutor.map(fn, messages, chunksize=...)``."""

    key = "executor"
    name = "ProcessPoolExecutor.map"

    def open(self) -> None:
        ctx = multiprocessing.get_context(self.config.start_method)
        initializer, initargs = self.initializer()

        def start() -> None:
            self._ex = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=initializer, initargs=initargs
            )
            # The executor starts its processes on first use (one per submit under fork):
            # overlapping sleeps make it start all of them now.
            wait([self._ex.submit(time.sleep, 0.05) for _ in range(self.workers)])

        self._track_workers(start)

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        return self._ex.map(self.fn(), messages, chunksize=chunksize)

    def close(self, abort: bool = False) -> None:
        ex = getattr(self, "_ex", None)
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=abort)


ENGINES: dict[str, type[BenchEngine]] = {
    "ordpool": OrdpoolEngine,
    "pool": MpPoolEngine,
    "executor": ExecutorEngine,
}

# -- measuring -----------------------------------------------------------------------------------


@dataclass
class RunStats:
    """One timed run of one engine.

    Attributes:
        wall_s: seconds from the first message in to the last result out.
        parent_cpu_s: user + system CPU of the parent process (all threads).
        worker_cpu_s: user + system CPU of the worker processes (``None`` for serial).
        peak_rss_bytes: peak RSS of parent + workers (see :class:`_PeakRss`).
        peak_parent_rss_bytes: peak RSS of the parent alone.
        other_cpu_s: CPU used meanwhile on the usable cores by every other process (the
            machine's noise: other jobs take cores from the workers).
    """

    wall_s: float
    parent_cpu_s: float
    worker_cpu_s: float | None
    peak_rss_bytes: int
    peak_parent_rss_bytes: int
    other_cpu_s: float = 0.0


def timed_run(engine: BenchEngine, messages: Sequence[Any]) -> RunStats:
    """Run ``engine`` over ``messages`` once; results are drained, never kept."""
    workers = []
    for pid in engine.worker_pids():
        try:
            workers.append(psutil.Process(pid))
        except psutil.Error:
            pass  # gone (a crashed worker): its replacement is not counted
    gc.collect()
    with _PeakRss(workers) as rss:
        busy0 = _busy_seconds()
        worker_cpu0 = _cpu_seconds(workers)
        cpu0 = _parent_cpu_seconds()
        t0 = time.perf_counter()
        collections.deque(engine.imap(messages), maxlen=0)
        wall = time.perf_counter() - t0
        cpu = _parent_cpu_seconds() - cpu0
        worker_cpu = _cpu_seconds(workers) - worker_cpu0
        busy = _busy_seconds() - busy0
    return RunStats(
        wall_s=wall,
        parent_cpu_s=cpu,
        worker_cpu_s=worker_cpu if workers else None,
        peak_rss_bytes=rss.peak_total,
        peak_parent_rss_bytes=rss.peak_parent,
        other_cpu_s=max(0.0, busy - cpu - worker_cpu),
    )


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


@dataclass
class EngineResult:
    """One engine at one worker count: the median of its timed runs, and what limits it.

    Attributes:
        engine: key (``"serial"``, ``"ordpool"``, ``"pool"``, ``"executor"``, or a peer's).
        label: as shown in the table.
        workers: worker processes (``0`` for serial).
        params: the engine's parameters (chunksize and its sweep; batch size).
        runs: every timed run.
        wall_s: median wall time.
        msgs_per_s: messages / median wall time.
        mb_per_s: input megabytes (10**6) / median wall time; ``None`` for non-bytes input.
        speedup: serial's median wall time / this engine's.
        parent_cpu_us_per_msg: median parent CPU per message, microseconds.
        worker_cpu_us_per_msg: median CPU of all workers per message (``None`` for serial).
        parent_cores: median parent CPU / wall time (1.0 = one core busy).
        worker_cores: median worker CPU / wall time.
        other_cores: median CPU of every other process on the usable cores / wall time (noise:
            above 0.1 the numbers are unreliable; the verdict says so).
        peak_rss_mb: highest parent + workers RSS seen in any run (MB = 10**6 bytes).
        peak_parent_rss_mb: highest parent RSS.
        verdict: ``"parent-bound"``, ``"worker-bound"`` or ``"input-bound"``.
        verdict_text: the verdict with the numbers behind it.
        ceiling_msgs_per_s: ``1 / parent CPU per message`` (what the parent allows).
        check: ``"ok"``, ``"reference"`` (serial), a ``"MISMATCH..."`` line, or ``None``.
    """

    engine: str
    label: str
    workers: int
    params: dict[str, Any]
    runs: list[RunStats]
    wall_s: float
    msgs_per_s: float
    mb_per_s: float | None
    speedup: float | None
    parent_cpu_us_per_msg: float
    worker_cpu_us_per_msg: float | None
    parent_cores: float
    worker_cores: float | None
    other_cores: float
    peak_rss_mb: float
    peak_parent_rss_mb: float
    verdict: str
    verdict_text: str
    ceiling_msgs_per_s: float | None
    check: str | None = None


def summarize(
    engine: BenchEngine,
    runs: list[RunStats],
    n: int,
    nbytes: int | None,
    serial_wall: float | None,
    cores: int,
) -> EngineResult:
    """Medians of ``runs``, throughput, speedup and verdict."""
    wall = statistics.median(r.wall_s for r in runs)
    parent = statistics.median(r.parent_cpu_s for r in runs)
    worker = (
        None
        if runs[0].worker_cpu_s is None
        else statistics.median(r.worker_cpu_s or 0.0 for r in runs)
    )
    other = statistics.median(r.other_cpu_s for r in runs)
    workers = 0 if isinstance(engine, SerialEngine) else engine.workers
    verdict, text, ceiling = verdict_for(workers, cores, wall, parent, worker, n, other)
    return EngineResult(
        engine=engine.key,
        label=engine.label(),
        workers=workers,
        params=engine.params(),
        runs=runs,
        wall_s=wall,
        msgs_per_s=n / wall,
        mb_per_s=None if nbytes is None else nbytes / _MB / wall,
        speedup=None if serial_wall is None else serial_wall / wall,
        parent_cpu_us_per_msg=parent / n * 1e6,
        worker_cpu_us_per_msg=None if worker is None else worker / n * 1e6,
        parent_cores=parent / wall,
        worker_cores=None if worker is None else worker / wall,
        other_cores=other / wall,
        peak_rss_mb=max(r.peak_rss_bytes for r in runs) / _MB,
        peak_parent_rss_mb=max(r.peak_parent_rss_bytes for r in runs) / _MB,
        verdict=verdict,
        verdict_text=text,
        ceiling_msgs_per_s=ceiling,
    )


def verdict_for(
    workers: int,
    cores: int,
    wall: float,
    parent_cpu: float,
    worker_cpu: float | None,
    n: int,
    other_cpu: float = 0.0,
) -> tuple[str, str, float | None]:
    """What limits an engine: ``(verdict, one line with the numbers, parent ceiling msg/s)``.

    ``workers`` is 0 for serial (everything runs in the parent). The workers' budget is what
    the machine leaves them: ``min(workers, cores - parent - other processes)``, in cores.

    >>> verdict_for(2, 2, 1.0, 0.95, 0.9, 100_000)[0]
    'parent-bound'
    >>> verdict_for(2, 2, 1.0, 0.2, 1.7, 100_000)[0]
    'worker-bound'
    >>> verdict_for(2, 2, 1.0, 0.05, 0.1, 1_000)[0]
    'input-bound'
    >>> verdict_for(2, 2, 1.0, 0.1, 0.7, 100_000, other_cpu=1.1)[1]  # doctest: +ELLIPSIS
    'worker-bound: workers at 0.70 of the 0.80 cores left to them ... busy: ...'
    """
    parent_cores = parent_cpu / wall if wall > 0 else 0.0
    others = other_cpu / wall if wall > 0 else 0.0
    ceiling = n / parent_cpu if parent_cpu > 0 else None
    us = parent_cpu / n * 1e6
    noise = (
        f"; machine busy: other processes took {others:.2f} core, numbers unreliable"
        if others >= 0.1
        else ""
    )
    if parent_cores >= 0.8:
        where = "one process" if workers == 0 else "parent"
        limit = f"ceiling {_rate(ceiling)} msg/s" if ceiling else "no ceiling"
        return (
            "parent-bound",
            f"parent-bound: {where} at {parent_cores:.2f} core, {us:.2f} us/msg -> {limit}{noise}",
            ceiling,
        )
    if not workers or worker_cpu is None:
        return (
            "input-bound",
            f"input-bound: one process at {parent_cores:.2f} core: it waits (latency, sleeps, "
            f"input){noise}",
            ceiling,
        )
    budget = min(float(workers), max(cores - parent_cores - others, 0.25))
    used = worker_cpu / wall if wall > 0 else 0.0
    if used >= 0.75 * budget:
        return (
            "worker-bound",
            f"worker-bound: workers at {used:.2f} of the {budget:.2f} cores left to them "
            f"({workers} worker{'s' * (workers > 1)}, {cores} cores, parent "
            f"{parent_cores:.2f}){noise}",
            ceiling,
        )
    return (
        "input-bound",
        f"input-bound: parent {parent_cores:.2f} core, workers {used:.2f} of {budget:.2f} "
        f"cores: they wait (latency, sleeps, round trips or input){noise}",
        ceiling,
    )


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


# -- progress ------------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr, drawn by a thread after the first second; silent off a tty.

    The thread draws when a step starts or ends, and otherwise every few seconds (the elapsed
    time): a thread that wakes often takes the GIL from the parent being measured.
    """

    def __init__(self, total: int, enabled: bool = True, delay: float = 1.0) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = max(1, total)
        self.done = 0
        self.what = ""
        self._delay = delay
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._drawn = False
        self._width = 110
        self._thread = threading.Thread(target=self._run, name="bench-progress", daemon=True)
        if self.enabled:
            self._thread.start()

    def step(self, what: str) -> None:
        """A step is starting (``what`` names it); the previous one is done."""
        self.what = what
        self._changed.set()

    def advance(self) -> None:
        """One step finished."""
        self.done = min(self.total, self.done + 1)
        self._changed.set()

    def _run(self) -> None:
        if self._stop.wait(self._delay):
            return
        while not self._stop.is_set():
            self._changed.clear()
            self._draw()
            self._changed.wait(3.0)

    def _draw(self) -> None:
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.monotonic() - self._t0
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.1f}s  {self.what}"
        self._width = min(110, shutil.get_terminal_size().columns - 1)
        sys.stderr.write("\r" + line[: self._width].ljust(self._width))
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        """Stop drawing and clear the line."""
        self._stop.set()
        self._changed.set()
        if self.enabled:
            self._thread.join()
            if self._drawn:
                sys.stderr.write("\r" + " " * self._width + "\r")
                sys.stderr.flush()


# -- the run -------------------------------------------------------------------------------------


def machine_info(command_line: str = "") -> dict[str, Any]:
    """The machine and the software, for the JSON report."""
    import ordpool

    from ._core.defaults import usable_cores

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line,
        "ordpool": ordpool.__version__,
        "orjson": orjson.__version__,
        "psutil": psutil.__version__,
        "loadavg_at_start": load,
    }


def run_benchmark(
    config: BenchConfig, extra_engines: dict[str, type[BenchEngine]] | None = None
) -> dict[str, Any]:
    """Run the comparison described by ``config``; return the report (see ``bench/README.md``).

    Args:
        config: what to run.
        extra_engines: more engine classes by key (``bench/peers.py`` adds mpire and joblib);
            ``config.engines`` picks among these and the built-in ones.

    Raises:
        BenchError: bad options or input.
        Exception: whatever the workload raised (in the serial warm-up, usually).
    """
    from ._core.defaults import usable_cores

    registry = {**ENGINES, **(extra_engines or {})}
    unknown = [key for key in config.engines if key not in registry]
    if unknown:
        raise BenchError(f"unknown engine {unknown[0]!r} (choose from {', '.join(registry)})")
    workload = config.workload
    cores = usable_cores()
    info = machine_info(config.command_line)
    _start_helpers(config.start_method)

    def make(workers: int) -> list[BenchEngine]:
        return [registry[key](workload, workers, config) for key in config.engines]

    # With fork, every pool starts before the data exists (copy-on-write: see the docstring).
    opened: dict[int, list[BenchEngine]] = {}
    every: list[BenchEngine] = []
    steps = 1 + len(config.workers) * (
        (len(config.engines) + 1) * (config.repeat + 1) + len(config.engines) * config.check
    )
    progress = Progress(steps, enabled=config.progress)
    failed = True
    try:
        if config.start_method == "fork":
            for workers in config.workers:
                progress.step(f"starting pools, {workers} workers")
                opened[workers] = make(workers)
                for engine in opened[workers]:
                    every.append(engine)
                    engine.open()
        progress.step("building messages")
        if config.input_path is not None:
            messages = read_input(config.input_path, config.messages)
        else:
            messages = make_messages(config.messages or workload.messages, config.message_size)
        n = len(messages)
        nbytes = _input_bytes(messages)

        # Repeats run in rounds (serial, ordpool, Pool, PPE, serial, ordpool, ...), so that a
        # drift of the machine's speed (a VM's neighbours, frequency changes) hits every engine
        # alike instead of skewing the ratios of whichever engine ran during it.
        groups: list[dict[str, Any]] = []
        reference = None
        for workers in config.workers:
            serial = SerialEngine(workload, 1, config)
            serial.open()
            engines: list[BenchEngine] = [serial]
            try:
                for engine in opened.get(workers) or make(workers):
                    if engine not in every:
                        progress.step(f"{engine.name}, {workers} workers: starting")
                        every.append(engine)
                        engine.open()
                    engines.append(engine)
                for engine in engines:
                    calibrate = isinstance(engine, ChunkedEngine) and len(engine.candidates) > 1
                    progress.step(f"{engine.name}: warm-up" + ", chunksize sweep" * calibrate)
                    engine.prepare(messages)
                    progress.advance()
                runs: dict[int, list[Any]] = {id(e): [] for e in engines}
                for r in range(config.repeat):
                    for engine in engines:
                        progress.step(f"round {r + 1}/{config.repeat}: {engine.name}")
                        runs[id(engine)].append(timed_run(engine, messages))
                        progress.advance()
                serial_result = summarize(serial, runs[id(serial)], n, nbytes, None, cores)
                serial_result.speedup = 1.0
                results = [serial_result]
                if config.check:
                    serial_result.check = "reference"
                    reference = serial.call
                for engine in engines[1:]:
                    result = summarize(
                        engine, runs[id(engine)], n, nbytes, serial_result.wall_s, cores
                    )
                    if config.check and reference is not None:
                        progress.step(f"{engine.name}, {workers} workers: checking results")
                        result.check = check_engine(engine, reference, messages)
                        progress.advance()
                    results.append(result)
            except BaseException:
                for engine in engines[1:]:
                    if engine in every:
                        every.remove(engine)
                        engine.close(abort=True)
                raise
            if config.start_method != "fork":
                for engine in engines[1:]:
                    every.remove(engine)
                    engine.close()
            groups.append({"workers": workers, "engines": [asdict(r) for r in results]})
        failed = False
    finally:
        progress.close()
        for engine in every:
            engine.close(abort=failed)

    return {
        "schema": SCHEMA,
        "machine": info,
        "config": {
            "workload": workload.name,
            "description": workload.description,
            "fn": _qualname(workload.fn),
            "init": None if workload.init is None else _qualname(workload.init),
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


def _qualname(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"


# -- the report ----------------------------------------------------------------------------------

COLUMNS = (
    "engine",
    "k msg/s",
    "MB/s",
    "x serial",
    "parent us/msg",
    "worker us/msg",
    "peak RSS MB",
    "check",
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    """First cell left-aligned, the numbers right-aligned."""
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def format_report(report: dict[str, Any]) -> str:
    """The report as text: a header, then per worker count a table and a verdict per engine."""
    cfg, machine = report["config"], report["machine"]
    size = cfg["avg_message_bytes"]
    source = f"from {cfg['input']}" if cfg["input"] else "generated"
    lines = [
        f"ordpool bench: {cfg['workload']}"
        + (f" ({cfg['description']})" * bool(cfg["description"])),
        f"{cfg['messages']:,} messages {source}"
        + ("" if size is None else f", {size:,.0f} B avg ({cfg['input_bytes'] / _MB:,.1f} MB)")
        + f"; median of {cfg['repeat']} run{'s' * (cfg['repeat'] > 1)}; "
        f"start method {cfg['start_method']}; {machine['usable_cores']} usable cores; "
        f"Python {machine['python']}",
    ]
    show_check = cfg["check"]
    columns = COLUMNS if show_check else COLUMNS[:-1]
    for group in report["groups"]:
        rows = []
        for e in group["engines"]:
            row = [
                e["label"],
                _num(e["msgs_per_s"] / 1e3, ",.1f"),
                _num(e["mb_per_s"], ",.1f"),
                _num(e["speedup"], ".2f"),
                _num(e["parent_cpu_us_per_msg"], ".2f"),
                _num(e["worker_cpu_us_per_msg"], ".2f"),
                _num(e["peak_rss_mb"], ",.0f"),
            ]
            if show_check:
                row.append(
                    "ok" if e["check"] == "ok" else "ref" if e["check"] == "reference" else "FAIL"
                )
            rows.append(row)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines.append("")
        lines.append(f"workers={group['workers']}")
        lines.append(_aligned(columns, widths))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(_aligned(row, widths) for row in rows)
        lines.append("verdicts:")
        for e in group["engines"]:
            lines.append(f"  {e['label']}: {e['verdict_text']}")
            if "chunksize_choice" in e["params"]:
                lines.append(f"    {e['params']['chunksize_choice']}")
            if e["check"] and e["check"].startswith("MISMATCH"):
                lines.append(f"    check: {e['check']}")
    if report["check_passed"] is not None:
        lines.append("")
        lines.append(
            "check: every engine returned serial's results in serial's order"
            if report["check_passed"]
            else "check: FAILED (see above)"
        )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


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


def _batch_size(text: str) -> int | None:
    return None if text == "auto" else _positive_int(text)


def _chunksizes(text: str) -> tuple[int, ...] | None:
    if text == "auto":
        return None
    return tuple(_positive_int(part) for part in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
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
    parser.add_argument(
        "--input",
        metavar="FILE",
        help="messages from FILE (one per line, or a JSON array) instead of generated ones",
    )
    parser.add_argument(
        "--workers",
        type=parse_int_list,
        metavar="N[,N...]",
        help="worker counts, a row group each: 1,2,4 or 1-4 (default: the usable cores)",
    )
    parser.add_argument(
        "--engines",
        default="ordpool,pool,executor",
        metavar="E[,E...]",
        help="engines besides serial: ordpool, pool (multiprocessing.Pool.imap), executor "
        "(ProcessPoolExecutor.map); default: all three",
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
    parser.add_argument(
        "--repeat",
        "-r",
        type=_positive_int,
        default=3,
        metavar="K",
        help="timed runs per engine; the report shows the median (default: 3)",
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
        help="stdlib pools' chunksize: one value, or candidates to sweep (default: auto: "
        "100,1000,5000; sleep: 1,10,100)",
    )
    parser.add_argument(
        "--start-method",
        choices=("forkserver", "spawn", "fork"),
        default="forkserver",
        help="for every pool (default: forkserver; with fork the pools start before the data)",
    )
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


def config_from_args(args: argparse.Namespace, command_line: str = "") -> BenchConfig:
    """Build a :class:`BenchConfig` from parsed options (imports ``--fn``/``--init``).

    Raises:
        BenchError: bad ``--fn``, ``--init`` or ``--engines``.
    """
    from ._core.defaults import usable_cores

    if args.init and not args.fn:
        raise BenchError("--init needs --fn (the built-in workloads take no state)")
    if args.fn:
        fn = load_callable(args.fn, "--fn")
        init = load_callable(args.init, "--init") if args.init else None
        how = f"fn(state, msg), state from {args.init}" if init else "fn(msg)"
        workload = Workload(args.fn, fn, init, description=how)
    else:
        workload = WORKLOADS[args.workload]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    return BenchConfig(
        workload=workload,
        workers=args.workers or [usable_cores()],
        engines=[e for e in engines if e != "serial"],
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


def write_json(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path`` (indented JSON)."""
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def run_command(
    args: argparse.Namespace, extra_engines: dict[str, type[BenchEngine]] | None = None
) -> int:
    """``ordpool bench``: run, print the table, write ``--json``; the exit status.

    Returns:
        0; 1 when ``--check`` found a difference or the workload failed; 2 for bad options or
        input; 130 when interrupted (Ctrl-C).
    """
    command_line = getattr(args, "command_line", "") or shlex.join(["ordpool", *sys.argv[1:]])
    try:
        config = config_from_args(args, command_line)
        report = run_benchmark(config, extra_engines)
    except BenchError as exc:
        print(f"ordpool bench: error: {exc}", file=sys.stderr)
        return 2
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
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 1 if report["check_passed"] is False else 0
