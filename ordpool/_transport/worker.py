"""The worker loop: runs in each worker process and owns its end of the protocol.

    start -> ignore SIGINT -> unpickle (fn, init, initargs) -> state = init(*initargs)
          -> READY (or INITERR with the traceback, then exit)
          -> loop: TASK -> run fn over the batch -> RESULT ... until STOP or the parent is gone

The worker writes ``(bid, position)`` of the item it is about to run into a two-slot shared
array before each call. When the process dies, the parent reads it to learn which item was
running (the one to blame, or retry) and which items of the batch never started.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import gc
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from .._core.errors import wrap_exception
from . import wire as _wire
from .ticker import Ticker, new_ticker

# The cancel-request bid that asks every running item to stop (terminate with a grace period).
CANCEL_ALL = -2
# The slot of the shared progress array that says a task is running (1) or not (0): the parent
# reads it to know whether to watch the worker for a slow item.
RUNNING = 4

__all__ = [
    "CANCEL_ALL",
    "EARLY_SIGNAL",
    "RUNNING",
    "EarlyResults",
    "cancelled",
    "invoke",
    "run_batch",
    "run_task",
    "star",
    "stream_call",
    "worker_local",
    "worker_main",
    "worker_spec",
]

_local: dict[str, Any] | None = None  # this process's worker_local() dict, None in the parent
# Shared with the parent: [bid running, position running, bid to cancel, position to cancel].
# The parent writes the last two to cancel a running item (-1: every item of that bid; a cancel
# bid of CANCEL_ALL: everything, the pool is stopping).
_progress: Any = None


def worker_local() -> dict[str, Any]:
    """The dict private to the current worker process, kept for the life of the process.

    Use it from task code to keep caches, decoders or connections between tasks (the executor's
    ``initializer`` can fill it). In a process that is not an ordpool worker it raises
    ``RuntimeError``.

    Examples:
        >>> def task(x):                      # doctest: +SKIP
        ...     cache = ordpool.worker_local().setdefault("cache", {})
        ...     return cache.setdefault(x, expensive(x))
    """
    if _local is None:
        raise RuntimeError("worker_local() is only available inside an ordpool worker process")
    return _local


def cancelled() -> bool:
    """True when the job running in this worker was asked to stop (cooperative cancellation).

    Long jobs should check it now and then and return early: ``Future.cancel()`` on a running
    job, or a keyed pool's ``stop()``, sets it. Outside a worker it is always ``False``.

    Examples:
        >>> def crunch(chunks):                  # doctest: +SKIP
        ...     for chunk in chunks:
        ...         if ordpool.cancelled():
        ...             return None
        ...         work(chunk)
    """
    p = _progress
    if p is None:
        return False
    bid = p[2]
    return bid == CANCEL_ALL or (bid == p[0] and p[3] in (-1, p[1]))


# The signal the parent sends a worker whose item is slow, so that it sends its early results
# (EarlyResults): a real-time signal, which user code is unlikely to use (SIGALRM is: timeouts
# with signal.alarm).
EARLY_SIGNAL = getattr(signal, "SIGRTMIN", signal.SIGUSR2) + (
    3 if hasattr(signal, "SIGRTMIN") else 0
)
# The signal of the worker's own timer, which fires when a task runs much longer than its
# items usually take (EarlyResults.watch); None where there are no real-time signals (the
# parent's watch alone then finds slow items).
TICK_SIGNAL = getattr(signal, "SIGRTMIN", None) and signal.SIGRTMIN + 4
# The timer fires once a task has run OVERRUN times its expected time (its items times their
# mean time in the tasks before), and at least early_after / 10 (0.5 ms for max_delay 5 ms);
# OVERRUN_LONG times for a task expected to run longer than early_after (max_delay). A
# stream's tasks are short (about max_delay / 5 of arrivals): there the tighter factor sends
# the results before a slow item sooner. A backlog's tasks are long (about 40 ms), their time
# varies more with the machine's load, and at 1.5 times the timer cost 4 to 6 % of the
# `decode` throughput (bench/ab.py pairs); at 2 times nothing measurable.
OVERRUN = 1.5
OVERRUN_LONG = 2.0


class EarlyResults:
    """Sends the finished results of a running task ahead of its RESULT, while an item is slow.

    A result normally travels with its whole task. When the item a worker runs has taken
    longer than ``max_delay`` (a slow message: a timeout, a big document), the results finished
    before it are sent at once in a PART frame, so that a slow item holds back only the results
    after it, whatever the batch size. The RESULT that ends the task still holds every
    position; the parent skips those it has already delivered.

    Two things find a slow item. The worker's own timer (:mod:`.ticker`) fires when a task
    has run ``OVERRUN`` (1.5) times as long as its items usually take (``OVERRUN_LONG``, 2,
    for a task expected to take longer than ``max_delay``), and at least
    ``max_delay / 10`` (:data:`TICK_SIGNAL`), then again at that interval until the task ends;
    each time, the results finished so far are sent. A task of items as quick as usual never
    fires it, so a worker pays two system calls per task; in a batch of quick items, the
    results before a slow one leave about 1.5 times the batch's usual time after it started.
    And the parent watches each worker's position in shared memory (``progress``) and signals
    a worker whose position has not moved for ``max_delay`` (:data:`EARLY_SIGNAL`): a slow
    item in a long batch, or where the worker has no timer. The handlers run in the thread
    that makes the results, between two bytecodes of the user's function or during its
    ``sleep`` or blocking I/O, so they read them without a lock; they keep away while that
    thread writes a chunk (``busy``) or the RESULT (``active`` off). A function that holds the
    GIL in C code longer is seen only when that call returns.
    """

    __slots__ = (
        "active",
        "armed",
        "bid",
        "busy",
        "chunk",
        "chunk_base",
        "conn",
        "errors",
        "floor",
        "per_item",
        "prefix",
        "progress",
        "sent",
        "ticker",
        "writer",
    )

    def __init__(self, conn: Connection, progress: Any, early_after: float = 0.0) -> None:
        self.conn = conn
        self.progress = progress
        self.floor = early_after / 10  # the timer never fires sooner: seconds (0.0005)
        self.ticker: Ticker | None = None
        self.armed = False  # the timer runs for the current task
        self.per_item = 0.0  # seconds per item in the tasks so far, smoothed; 0: none yet
        self.active = False  # a task is running: PART frames may be sent
        self.busy = False  # the main thread writes a chunk, or the handler is running
        self.bid = -1  # the running task
        self.sent = 0  # positions [0, sent) of it were sent in PART frames
        # Where the finished values are (set by run_batch as it goes): ``prefix`` holds
        # positions [0, len(prefix)), the chunks ``writer`` dumped hold [0, chunk_base), and
        # ``chunk`` holds [chunk_base, chunk_base + len(chunk)).
        self.prefix: list[Any] = []
        self.errors: dict[int, Any] = {}
        self.writer: _wire.ChunkWriter | None = None
        self.chunk: list[Any] | None = None
        self.chunk_base = 0

    def install(self) -> None:
        """Set the signal handlers and make the timer (main thread, once)."""
        signal.signal(EARLY_SIGNAL, self._send)
        if TICK_SIGNAL and self.floor > 0:
            signal.signal(TICK_SIGNAL, self._send)  # the task overran: send what it finished
            self.ticker = new_ticker(TICK_SIGNAL)

    def begin(self, bid: int) -> None:
        """A task starts (main thread)."""
        self.bid, self.sent = bid, 0
        self.prefix, self.errors, self.writer, self.chunk = [], {}, None, None
        self.busy = False
        self.active = True

    def watch(self, items: int) -> None:
        """The task's items are known (main thread): set the timer to fire if the task
        overruns. Not for a single item (no result before it to send), nor before a first task
        has told how long items take."""
        if self.ticker is not None and items > 1 and self.per_item:
            expected = items * self.per_item
            overrun = OVERRUN if expected <= 10 * self.floor else OVERRUN_LONG
            self.ticker.arm(max(self.floor, overrun * expected))
            self.armed = True

    def learn(self, items: int, seconds: float) -> None:
        """A task of ``items`` took ``seconds`` (main thread): fold it into the time per item.
        One slow item weighs at most 4 times the estimate, as in the parent's batch sizer."""
        if items <= 0:
            return
        cost = seconds / items
        known = self.per_item
        self.per_item = cost if not known else known + 0.5 * (min(cost, 4 * known) - known)

    def end(self) -> None:
        """The task ran (main thread): no PART frame for it from now on."""
        self.active = False
        if self.armed:
            self.ticker.disarm()  # type: ignore[union-attr]
            self.armed = False
        self.prefix, self.errors, self.writer, self.chunk = [], {}, None, None

    def _send(self, signum: int, frame: Any) -> None:
        """The signals' handler (main thread): send the results finished so far."""
        if not self.active or self.busy:
            return
        self.busy = True
        try:
            pos = self.progress[1]
            if pos > self.sent and self.progress[0] == self.bid:
                values = self._values(self.sent, pos)
                part = _wire.part_frame(self.bid, self.sent, pos, values, self.errors)
                self.conn.send_bytes(part)
                self.sent = pos
        except BaseException:  # never into the user's code: the RESULT still carries them all
            self.active = False
        finally:
            self.busy = False

    def _values(self, lo: int, hi: int) -> list[Any]:
        """The finished values of positions ``lo`` to ``hi``."""
        prefix = self.prefix
        out = prefix[lo:hi]
        chunk, writer = self.chunk, self.writer
        if chunk is None or writer is None:
            return out
        base, k = self.chunk_base, writer.chunk_values
        pos = max(lo, len(prefix))
        while pos < min(hi, base):  # in chunks pickled already: load them again
            i = pos // k
            values = pickle.loads(writer.dumped(i))
            out += values[pos - i * k : min(hi, i * k + len(values)) - i * k]
            pos = i * k + len(values)
        if hi > pos:  # the rest is in the chunk being made (pos >= base here)
            out += chunk[pos - base : hi - base]
        return out


def run_batch(
    call: Callable[[Any], Any],
    items: list[Any],
    failed: set[int],
    progress: Any,
    out: _wire.ChunkWriter | None = None,
    parts: EarlyResults | None = None,
) -> tuple[bytes | None, int]:
    """Run ``call`` over ``items``; returns the encoded results and how many items failed.

    The results are written by ``out`` (a new :class:`~ordpool._transport.wire.ChunkWriter` when
    ``None``) into the region it targets, if any, when they fit there: the encoded results
    are then ``None``, and lie in that region (``out.size`` bytes).

    ``progress[1]`` is set to each position before its call, ``len(items)`` after the last.
    The first result decides the chunk length (:func:`.wire.chunk_length`); the results
    are then made and pickled a chunk at a time, so that each chunk dies at once instead of a
    batch of them waiting, out of the CPU caches, to be pickled and freed; the values of a
    chunk also share a pickle memo (docs/design.md, "Results in chunks"). A batch in which no
    item gave a result is pickled as one list.

    With ``parts``, results finished while a slow item runs may be sent ahead
    (:class:`EarlyResults`); the encoded results still hold every position.
    """
    values: list[Any] = []
    errors: dict[int, Any] = {}
    n = len(items)
    if parts is not None:
        parts.prefix, parts.errors = values, errors
        parts.watch(n)
    append = values.append
    for pos in range(n):  # up to the first result
        _run_range(call, items, failed, progress, pos, pos + 1, append, errors)
        if pos in errors or (failed and pos in failed):
            continue
        try:
            size = len(_wire.dumps(values[-1]))  # (cloudpickle if need be: a local class)
        except BaseException:
            size = 0  # it fails again in its chunk, and becomes that item's error there
        out = out if out is not None else _wire.ChunkWriter()
        return _run_chunks(call, items, failed, progress, values, size, errors, out, parts)
    progress[1] = n
    return _wire.encode_results(values, errors or None), len(errors)


def run_task(
    call: Callable[[Any], Any],
    data: memoryview,
    source: Any,
    failed: set[int],
    progress: Any,
    out: _wire.ChunkWriter,
    parts: EarlyResults | None = None,
) -> tuple[bytes | None, int, int]:
    """The batch step of every worker (a process's loop, a Ray actor): unpickle a task's items
    from ``data`` (``source``: the region's mmap, or ``None``), run them with
    :func:`run_batch`; returns ``(encoded results, items failed, items run)``.

    Items that cannot be unpickled here (a class the worker cannot import) fail the whole
    task: its results are then one error for every position (``wire.WHOLE_TASK``).
    """
    try:
        items = _wire.decode_items(data, source)
    except BaseException as exc:
        error = {_wire.WHOLE_TASK: wrap_exception(exc)}
        return _wire.encode_results([], error), _wire.ALL_FAILED, 0
    payload, nerrors = run_batch(call, items, failed, progress, out, parts)
    return payload, nerrors, len(items)  # (the items are freed as this returns)


def _run_range(
    call: Callable[[Any], Any],
    items: list[Any],
    failed: set[int],
    progress: Any,
    lo: int,
    hi: int,
    append: Callable[[Any], None],
    errors: dict[int, Any],
) -> None:
    """Run ``call`` over positions ``lo`` to ``hi`` of ``items``, appending each result:
    ``None`` for a position not to run or that raised (its error then in ``errors``)."""
    for pos in range(lo, hi):
        progress[1] = pos
        if failed and pos in failed:
            append(None)
            continue
        try:
            append(call(items[pos]))
        except BaseException as exc:  # SystemExit too: it is that item's error, not ours
            errors[pos] = wrap_exception(exc)
            append(None)


def _run_chunks(
    call: Callable[[Any], Any],
    items: list[Any],
    failed: set[int],
    progress: Any,
    done: list[Any],
    first_size: int,
    errors: dict[int, Any],
    out: _wire.ChunkWriter,
    parts: EarlyResults | None,
) -> tuple[bytes | None, int]:
    """:func:`run_batch` once the results in ``done`` are made, the last of which pickled to
    ``first_size`` bytes: the rest made and pickled in chunks (``_wire.chunk_length``).
    ``parts`` is told where the finished values are, and kept away while a chunk is written."""
    n = len(items)
    k = _wire.chunk_length(first_size)
    if parts is not None:
        parts.busy = True
    out.begin(n, k, first_size * n)  # an estimate (chunks share keys: usually a little less)
    dump = out.dump
    base = 0
    while len(done) - base > k:  # positions up to the first result: errors, or not run
        dump(done[base : base + k], base, errors)
        base += k
    chunk = done[base:]
    lo = len(done)
    while True:
        if parts is not None:
            parts.writer, parts.chunk_base, parts.chunk, parts.busy = out, base, chunk, False
        _run_range(call, items, failed, progress, lo, min(base + k, n), chunk.append, errors)
        if parts is not None:
            parts.busy = True
        dump(chunk, base, errors)
        base += k
        if base >= n:
            break
        chunk = []
        lo = base
    progress[1] = n
    return out.finish(errors or None), len(errors)


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def invoke(call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any] | None]) -> Any:
    """Run one ``(fn, args, kwargs)`` job (``kwargs`` may be ``None``): the worker function of
    job-style pools (``KeyedPool``, the executor's ``submit``)."""
    fn, args, kwargs = call
    return fn(*args, **kwargs) if kwargs else fn(*args)


def run_initializer(initializer: Callable[..., Any], *initargs: Any) -> None:
    """A pool's ``initializer(*initargs)``, once per worker; its return value is ignored (the
    standard library's contract, which the executor and the keyed pool follow)."""
    initializer(*initargs)


def run_logged_initializer(initializer: Callable[..., Any], *initargs: Any) -> None:
    """:func:`run_initializer` for the executor: an initializer that raises is logged at
    CRITICAL on the ``concurrent.futures`` logger *in the worker*, as the standard library's
    worker does, so that a log handler the initializer set up (a ``QueueHandler`` on a queue
    from ``initargs``) sees it."""
    try:
        initializer(*initargs)
    except BaseException:
        import logging

        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        raise


def invoke_after_init(state: Any, call: tuple[Any, ...]) -> Any:
    """:func:`invoke` for pools whose initializer ran (the engine passes its state first)."""
    return invoke(call)


def star(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``fn(*args)``: the stream callable of a several-iterable ``map``."""
    return fn(*args)


def stream_call(
    call: bytes, default: Callable[[Any], Any], cache: dict[bytes, Callable[[Any], Any]]
) -> Callable[[Any], Any]:
    """The callable a task runs: its stream's own (unpickled once, cached) or the pool's."""
    if not call:
        return default
    fn = cache.get(call)
    if fn is None:
        if len(cache) >= 64:
            cache.clear()
        fn = cache[call] = pickle.loads(call)
    return fn


def worker_spec(
    fn: Callable[..., Any],
    init: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks: int | None = None,
) -> bytes:
    """What a worker needs to start, cloudpickled (lambdas and closures travel too)."""
    import cloudpickle

    spec: bytes = cloudpickle.dumps((fn, init, tuple(initargs), max_tasks))
    return spec


class Inherited:
    """Stands in the spec for the ``initargs`` item at ``index``, which travels with the worker
    process's own arguments instead (see :func:`process_spec`)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return Inherited, (self.index,)


def process_spec(
    fn: Callable[..., Any],
    init: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks: int | None = None,
) -> tuple[bytes, tuple[Any, ...]]:
    """:func:`worker_spec` for local worker processes: ``(spec, inherited)``.

    ``multiprocessing`` objects that may only reach a child through inheritance (a ``Queue``,
    ``Lock``, ``Event``, ``Value``...: pickling them outside a process start raises
    ``RuntimeError``) cannot be cloudpickled into the spec. Each ``initargs`` item that holds
    one goes to the worker with the process's arguments instead, as the standard library's
    pools pass theirs: inherited under ``fork``, pickled by the process start under ``spawn``
    and ``forkserver``.
    """
    import cloudpickle

    args: list[Any] = []
    inherited: list[Any] = []
    for item in initargs:
        try:
            cloudpickle.dumps(item)
        except RuntimeError:  # "... should only be shared between processes through inheritance"
            args.append(Inherited(len(inherited)))
            inherited.append(item)
        else:
            args.append(item)
    return worker_spec(fn, init, tuple(args), max_tasks), tuple(inherited)


def _with_inherited(initargs: tuple[Any, ...], inherited: tuple[Any, ...]) -> tuple[Any, ...]:
    """``initargs`` with each :class:`Inherited` stand-in replaced by the object it stands for."""
    if not inherited:
        return initargs
    return tuple(inherited[a.index] if isinstance(a, Inherited) else a for a in initargs)


def keep_freed_memory() -> None:
    """Keep the memory of a freed batch for the next one (glibc's malloc; elsewhere a no-op).

    A batch's messages and results are allocated, then all freed; by default glibc hands the
    freed top of the heap back to the kernel each time, and the next batch takes page faults
    to get it again (docs/design.md has the cost). Raising the trim and mmap
    thresholds keeps up to 64 MiB of it (a few batches' worth) in the process instead.
    ``ORDPOOL_KEEP_FREED_MEMORY=0`` in the environment leaves glibc's defaults.
    """
    if os.environ.get("ORDPOOL_KEEP_FREED_MEMORY", "1") == "0":
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 64 << 20)


class Reservation:
    """The bytes of a shared-memory region whose pages are allocated, grown on demand.

    A region is a file in ``/dev/shm`` (tmpfs), created at full size but with no pages: writing
    a page that tmpfs has no room for kills the writer with ``SIGBUS`` (Docker gives containers a
    64 MiB ``/dev/shm`` by default; a few workers' regions exceed that). So the writer first
    allocates the pages it is about to write with ``posix_fallocate``, which fails cleanly
    (``ENOSPC``) instead: that payload then travels in the pipe, and the pool goes on.
    Allocation grows a quarter beyond what is asked (at least 256 KiB), so it costs a call only
    while a region's high-water mark grows. After a refusal, sizes as large are sent in the pipe
    without asking again for the next :data:`RETRY_AFTER` calls (the room may come back).
    Where ``posix_fallocate`` does not exist or is not supported, nothing is allocated ahead.
    """

    RETRY_AFTER = 64

    __slots__ = ("capacity", "fd", "refused", "reserved", "skips")

    def __init__(self, fd: int | None, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self.reserved = capacity if fd is None or _fallocate is None else 0
        self.refused = capacity + 1  # the smallest size refused lately
        self.skips = 0  # calls left before asking for ``refused`` or more again

    def fits(self, size: int) -> bool:
        """Whether ``size`` bytes can be written at the start of the region."""
        if size <= self.reserved:
            return True
        if size > self.capacity:
            return False
        fallocate = _fallocate
        if fallocate is None or self.fd is None:
            self.reserved = self.capacity
            return True
        if size >= self.refused:
            if self.skips > 0:
                self.skips -= 1
                return False
            self.refused = self.capacity + 1
        want = min(self.capacity, max(size + (size >> 2), 256 << 10))
        for length in (want, size) if want > size else (size,):
            try:
                fallocate(self.fd, 0, length)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    self.reserved = self.capacity  # not supported here: write as before
                    return True
                continue  # ENOSPC (or EINTR): try the exact size, then give up
            self.reserved = length
            return True
        self.refused, self.skips = size, self.RETRY_AFTER
        return False


_fallocate = getattr(os, "posix_fallocate", None)  # patched by tests to simulate a full tmpfs


def attach_regions(names: tuple[str, ...]) -> list[Any]:
    """Attach the parent's shared-memory regions (the parent creates and unlinks them)."""
    from multiprocessing import shared_memory

    regions = []
    for name in names:
        try:
            shm = shared_memory.SharedMemory(name, track=False)  # type: ignore[call-arg]  # 3.13+
        except TypeError:  # Python < 3.13: registering again with the tracker is harmless
            shm = shared_memory.SharedMemory(name)
        regions.append(shm)
    return regions


def worker_main(
    task_conn: Connection,
    result_conn: Connection,
    spec: bytes,
    parent_pid: int,
    inherited_fds: tuple[int, ...],
    region_names: tuple[str, ...],
    early_after: float = 0.0,
    inherited: tuple[Any, ...] = (),
) -> None:
    """Entry point of a worker process (see the module docstring). With ``early_after``, the
    results finished before an item that runs longer than that are sent ahead
    (:class:`EarlyResults`). ``inherited``: the ``initargs`` items that came with the process's
    arguments (:func:`process_spec`)."""
    global _local, _progress
    # Ctrl-C goes to the whole foreground process group; the parent handles it and tears the
    # workers down. Workers printing their own KeyboardInterrupt tracebacks would be spam.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Under fork we inherit the parent's ends of other workers' pipes; holding them would keep
    # those workers from seeing EOF when the parent dies.
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _local = {}
    keep_freed_memory()
    try:
        regions = attach_regions(region_names)
    except OSError:
        os._exit(4)  # the parent is gone already, or /dev/shm is not usable
    progress = _progress = regions[-1].buf.cast("q")
    try:
        fn, init, initargs, max_tasks = pickle.loads(spec)
        if init is not None:
            state = init(*_with_inherited(initargs, inherited))
            call = functools.partial(fn, state)
        else:
            call = fn
    except BaseException as exc:
        _report_init_failure(result_conn, exc)  # and exit
    try:
        result_conn.send_bytes(_wire.ready_frame(os.getpid()))
        parts = None
        if early_after > 0:
            parts = EarlyResults(result_conn, progress, early_after)
            parts.install()
        _loop(call, task_conn, result_conn, progress, parent_pid, regions, max_tasks, parts)
    except (EOFError, OSError):
        pass  # the parent went away: nothing to report to, exit quietly
    finally:
        _progress = None
        progress.release()
        for shm in regions:
            try:
                shm.close()
            except BufferError:
                pass  # a task kept a view of its input alive; the exit unmaps it anyway


def _report_init_failure(result_conn: Connection, exc: BaseException) -> None:
    """Tell the parent that ``init`` raised ``exc``, and exit."""
    frame = _wire.initerr_frame(exc)
    # Flushed before the report: once the parent has it, it may stop this process.
    _run_exit_finalizers()
    try:
        result_conn.send_bytes(frame)
    except OSError:
        pass
    os._exit(3)


def _run_exit_finalizers() -> None:
    """Run multiprocessing's exit finalizers, for up to a few seconds, before an ``os._exit``:
    a ``multiprocessing.Queue`` from ``initargs`` sends what it buffered (an initializer's
    log records) only from its feeder thread, which a bare ``os._exit`` would kill."""
    from multiprocessing import util

    try:
        flusher = threading.Thread(target=util._exit_function, daemon=True)  # type: ignore[attr-defined]
        flusher.start()
        flusher.join(5.0)
    except Exception:
        pass  # the init error is reported all the same


def _send_result(
    conn: Connection,
    bid: int,
    seconds: float,
    payload: bytes | None,
    nerrors: int,
    written: int,
    turn: int,
    regions: list[tuple[Any, Reservation]],
) -> bool:
    """Send a task's RESULT frame: its payload in the result region of ``turn`` when it fits
    there (``payload`` is ``None`` when the ChunkWriter already wrote ``written`` bytes
    there), else in the pipe after the header. True when the region was used."""
    buf, reservation = regions[turn]
    if payload is None:  # written in the result region of this turn already
        size, in_region = written, True
    else:
        size = len(payload)
        in_region = reservation.fits(size)
        if in_region:
            buf[:size] = payload
    if in_region:
        conn.send_bytes(_wire.result_head(bid, seconds, turn, size, nerrors))
        return True
    assert payload is not None  # (None means: in the region)
    conn.send_bytes(_wire.result_head(bid, seconds, -1, size, nerrors) + payload)
    return False


def _run_gc_paused(
    call: Callable[[Any], Any],
    bid: int,
    data: memoryview,
    source: Any,
    failed: set[int],
    progress: Any,
    out: _wire.ChunkWriter,
    parts: EarlyResults | None,
) -> tuple[bytes | None, int, int]:
    """:func:`run_task` for the task ``bid``, with the cyclic GC paused.

    Building a list of thousands of results (dicts, lists) would otherwise trigger collections
    that traverse that growing list again and again, several times the cost of the work
    itself. The pause is bounded by one batch (about 40 ms of work); garbage cycles made
    meanwhile are collected after.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    progress[0] = bid
    progress[1] = 0
    progress[RUNNING] = 1
    if parts is not None:
        parts.begin(bid)
    try:
        return run_task(call, data, source, failed, progress, out, parts)
    finally:
        progress[RUNNING] = 0
        if parts is not None:
            parts.end()
        if gc_was_enabled:
            gc.enable()


def _loop(
    call: Callable[[Any], Any],
    task_conn: Connection,
    result_conn: Connection,
    progress: memoryview,
    parent_pid: int,
    regions: list[Any],
    max_tasks: int | None = None,
    parts: EarlyResults | None = None,
) -> None:
    """Receive TASK frames, run them, answer with RESULT frames, until STOP.

    ``regions`` are ``[task 0, task 1, result 0, result 1, control]``. Result regions alternate; the
    parent copies a result out before it sends the task that could produce the next result for
    the same region, because it never lets a worker hold more than two batches.
    """
    perf_counter = time.perf_counter
    turns = (len(regions) - 1) // 2  # regions each way
    task_bufs = [r.buf for r in regions[:turns]]
    # The regions' mmaps, which slice straight to bytes (None where a Python keeps none).
    task_maps = [getattr(r, "_mmap", None) for r in regions[:turns]]
    result_bufs = [r.buf for r in regions[turns:-1]]
    reservations = [Reservation(getattr(r, "_fd", None), len(r.buf)) for r in regions[turns:-1]]
    regions_out = list(zip(result_bufs, reservations))
    turn = 0
    out = _wire.ChunkWriter()  # writes results straight into the result region
    done = 0  # items run by this process (max_tasks_per_child)
    calls: dict[bytes, Callable[[Any], Any]] = {}  # pickled stream callable -> callable
    while True:
        while not task_conn.poll(1.0):
            if not _parent_alive(parent_pid):
                return
        frame = task_conn.recv_bytes()
        if frame[0] == _wire.STOP:
            return
        bid, failed, region, nbytes, call_bytes, inline = _wire.parse_task(frame)
        start = perf_counter()
        if region >= 0:
            data, source = task_bufs[region][:nbytes], task_maps[region]
        else:
            data, source = inline, None
        out.target(result_bufs[turn], reservations[turn].fits)
        fn = stream_call(call_bytes, call, calls)
        payload, nerrors, ran = _run_gc_paused(fn, bid, data, source, failed, progress, out, parts)
        done += ran
        seconds = perf_counter() - start
        if parts is not None:
            parts.learn(ran, seconds)
        retire = max_tasks is not None and done >= max_tasks
        if retire:
            # Said before the result, so the parent sends nothing more to this process.
            result_conn.send_bytes(_wire.RETIRE_FRAME)
        if _send_result(result_conn, bid, seconds, payload, nerrors, out.size, turn, regions_out):
            turn = (turn + 1) % turns
        if retire:
            return
