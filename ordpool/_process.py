"""Local transport: worker processes, their pipes, and the threads that move bytes.

    engine --send(slot, frame)--> SimpleQueue --[sender thread, one per worker]--> task pipe
                                                                                   |
                                                                          worker process
                                                                                   |
    engine <--on_result/on_ready/on_init_error/on_death-- [collector thread] <-- result pipe
                                                                 ^-- process sentinels, wakeup

Why a sender thread per worker: a pipe holds about 1 MiB (64 KiB where it cannot be enlarged);
a batch can be larger. Writing it blocks until that worker reads, and the worker reads only after
sending its previous results. If the thread that writes were also the one that reads results,
both sides would wait for each other (the deadlock described in PERF.md). Here the collector only
ever reads, and a slow worker stalls only its own sender.

Why one collector: a single ``multiprocessing.connection.wait`` over every result pipe, every
process sentinel and a wakeup pipe sees results, crashes and shutdown requests as they happen, at
no cost while idle. When a sentinel fires, the collector first drains that worker's result pipe
(results sent just before dying are real results), then reports the death with the worker's
last progress mark.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from queue import SimpleQueue
from typing import Any, Protocol

from . import _wire
from ._worker import worker_main

__all__ = ["ProcessTransport", "TransportEvents"]

# Parent-side pipe ends of every live worker in this process. A child forked later inherits
# them and must close them, or a worker would keep another worker's pipe open after the parent
# died, and that worker would never see EOF.
_PARENT_FDS: set[int] = set()
_PIPE_SIZE = 1 << 20


class TransportEvents(Protocol):
    """What a transport reports to the engine (called from the transport's own thread)."""

    def on_ready(self, slot: int, pid: int) -> None: ...
    def on_init_error(self, slot: int, exc: BaseException) -> None: ...
    def on_result(self, slot: int, frame: bytes) -> None: ...
    def on_death(self, slot: int, exitcode: int | None, pid: int, progress: tuple[int, int]) -> None: ...


def _enlarge(conn: Connection) -> None:
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size works, slower


_IOV_MAX = 1024  # POSIX minimum for IOV_MAX is 16; Linux has 1024
_LEN = struct.Struct("!i")
_LEN_LONG = struct.Struct("!iQ")


def write_frame(fd: int, parts: list[Any]) -> None:
    """Write ``parts`` as one ``multiprocessing.connection`` frame, with ``os.writev``.

    The frame reads back with ``Connection.recv_bytes`` (same length prefix), but the parent
    never builds it in one piece: the kernel gathers the buffers, messages included.
    """
    size = sum(map(len, parts))
    head = _LEN.pack(size) if size <= 0x7FFFFFFF else _LEN_LONG.pack(-1, size)
    bufs: list[Any] = [head, *parts]
    i, end = 0, len(bufs)
    while i < end:
        chunk = bufs[i : i + _IOV_MAX]
        written = os.writev(fd, chunk)
        if written == sum(map(len, chunk)):
            i += len(chunk)
            continue
        # A partial write (a signal arrived mid-way): resume inside the buffer it stopped in.
        while written >= len(bufs[i]):
            written -= len(bufs[i])
            i += 1
        bufs[i] = memoryview(bufs[i])[written:]


class _Worker:
    """One worker process and its plumbing."""

    __slots__ = ("process", "progress", "queue", "reader", "sender", "slot", "writer")

    def __init__(self, slot: int, ctx: BaseContext, spec: bytes) -> None:
        self.slot = slot
        task_r, self.writer = ctx.Pipe(duplex=False)  # parent writes TASK/STOP frames
        self.reader, res_w = ctx.Pipe(duplex=False)  # parent reads READY/RESULT frames
        _enlarge(self.writer)
        _enlarge(self.reader)
        self.progress = ctx.RawArray("q", 2)  # (bid, position) of the item being run
        self.progress[0] = -1
        _PARENT_FDS.update((self.writer.fileno(), self.reader.fileno()))
        inherited = tuple(_PARENT_FDS) if ctx.get_start_method() == "fork" else ()
        self.process = ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(task_r, res_w, spec, self.progress, os.getpid(), inherited),
            name=f"ordpool-worker-{slot}",
        )
        try:
            self.process.start()
        finally:
            task_r.close()
            res_w.close()
        self.queue: SimpleQueue[list[Any] | None] = SimpleQueue()  # frames for the sender
        self.sender = threading.Thread(
            target=self._send_loop, name=f"ordpool-sender-{slot}", daemon=True
        )
        self.sender.start()

    def _send_loop(self) -> None:
        fd, get = self.writer.fileno(), self.queue.get
        while True:
            parts = get()
            if parts is None:
                return
            try:
                write_frame(fd, parts)
            except OSError:
                # The worker died; the collector reports it and the engine re-dispatches
                # whatever this worker held, this frame included. Keep draining until told.
                pass

    def close_pipes(self) -> None:
        for conn in (self.writer, self.reader):
            try:
                _PARENT_FDS.discard(conn.fileno())
            except OSError:
                pass
            conn.close()


class ProcessTransport:
    """Starts worker processes and moves frames to and from them."""

    def __init__(self, ctx: BaseContext, spec: bytes, events: TransportEvents) -> None:
        self._ctx = ctx
        self._spec = spec  # cloudpickled (fn, init, initargs)
        self._events = events
        self._lock = threading.Lock()  # guards _workers and _closing
        self._workers: dict[int, _Worker] = {}  # slot -> live worker ({0: <_Worker>, 1: ...})
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._collector = threading.Thread(
            target=self._collect, name="ordpool-collector", daemon=True
        )
        self._collector.start()

    # -- called by the engine ------------------------------------------------------------------

    def start_worker(self, slot: int) -> None:
        """Start (or replace) the worker of ``slot``; READY or INITERR is reported later."""
        worker = _Worker(slot, self._ctx, self._spec)
        with self._lock:
            old = self._workers.get(slot)
            self._workers[slot] = worker
        if old is not None:
            self._retire(old)
        self._wake()

    def send(self, slot: int, parts: list[Any]) -> None:
        """Queue a frame (a list of buffers) for the worker of ``slot``; never blocks."""
        self._workers[slot].queue.put(parts)

    def pids(self) -> dict[int, int]:
        with self._lock:
            return {s: w.process.pid for s, w in self._workers.items() if w.process.pid}

    def kill(self, slot: int) -> None:
        """SIGKILL one worker (tests, stuck jobs); its death is reported as usual."""
        with self._lock:
            worker = self._workers.get(slot)
        if worker is not None:
            worker.process.kill()

    def stop(self, *, graceful: bool, timeout: float = 5.0) -> None:
        """Stop every worker: STOP frames when ``graceful``, else SIGTERM; SIGKILL what is left."""
        with self._lock:
            self._closing = True
            workers = list(self._workers.values())
            self._workers.clear()
        self._wake()
        for w in workers:
            if graceful:
                w.queue.put([_wire.STOP_FRAME])
            else:
                w.process.terminate()
            w.queue.put(None)
        for w in workers:
            w.process.join(timeout if graceful else 1.0)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join()
        if threading.current_thread() is not self._collector:
            self._collector.join(5.0)
        for w in workers:
            w.sender.join(1.0)
            w.close_pipes()
            w.process.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the collector thread ------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _retire(self, worker: _Worker) -> None:
        worker.queue.put(None)
        if worker.process.exitcode is None:
            worker.process.kill()
        worker.process.join(1.0)
        worker.close_pipes()

    def _collect(self) -> None:
        events = self._events
        while True:
            with self._lock:
                if self._closing:
                    return
                workers = list(self._workers.values())
            by_reader = {w.reader: w for w in workers if not w.reader.closed}
            by_sentinel = {w.process.sentinel: w for w in workers}
            try:
                ready = wait([*by_reader, *by_sentinel, self._wake_r])
            except OSError:
                continue  # a pipe was closed under us by a replacement; rebuild the list
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for obj in ready:
                worker = by_reader.get(obj)  # type: ignore[call-overload]
                if worker is not None and worker.process.sentinel not in ready:
                    if self._closing:
                        return
                    self._read_one(worker, events)
            for obj in ready:
                worker = by_sentinel.get(obj)  # type: ignore[call-overload]
                if worker is not None:
                    if self._closing:
                        return
                    self._bury(worker, events)

    def _read_one(self, worker: _Worker, events: TransportEvents) -> bool:
        """Read and dispatch one frame; False when the pipe is finished."""
        try:
            frame = worker.reader.recv_bytes()
        except (EOFError, OSError):
            # EOF, or a frame cut short by the worker's death: the sentinel reports the death.
            worker.reader.close()
            return False
        kind = frame[0]
        if kind == _wire.RESULT:
            events.on_result(worker.slot, frame)
        elif kind == _wire.READY:
            events.on_ready(worker.slot, worker.process.pid)
        elif kind == _wire.INITERR:
            events.on_init_error(worker.slot, _wire.decode_initerr(frame))
        return True

    def _bury(self, worker: _Worker, events: TransportEvents) -> None:
        while not worker.reader.closed:
            try:
                if not worker.reader.poll(0):
                    break
            except OSError:
                break
            if not self._read_one(worker, events):
                break
        worker.process.join(1.0)
        with self._lock:
            if self._workers.get(worker.slot) is not worker or self._closing:
                return  # replaced or shutting down: not a crash
            del self._workers[worker.slot]
        progress = (worker.progress[0], worker.progress[1])
        worker.queue.put(None)
        pid = worker.process.pid or 0
        exitcode = worker.process.exitcode
        worker.close_pipes()
        worker.process.close()
        events.on_death(worker.slot, exitcode, pid, progress)
