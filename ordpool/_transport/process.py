"""Local transport: worker processes, their pipes and shared memory, and the threads that
move bytes.

    engine --send(slot, bid, failed, payload)--> [direct, or SimpleQueue -> sender thread]
                                                     |  payload -> task region (shared memory)
                                                     v  header  -> task pipe
                                              worker process
                                                     |  payload -> result region
                                                     v  header  -> result pipe
    engine <--on_result/on_part/on_ready/on_init_error/on_death-- [collector thread]
                                                     ^-- result pipes, process sentinels, wakeup

Why shared memory: a copy into shared memory costs the parent a tenth of a pipe write of the
same bytes (docs/design.md). Each worker has ``TURNS`` (two) task regions
and as many result regions, used in turn. A region is reused ``TURNS`` batches later at the
earliest, and a worker never holds more than ``TURNS`` batches (``max_depth``), so by then the
worker has read the task and the collector has copied the result out. A payload larger than
its region travels in the pipe, and
so does one whose pages ``/dev/shm`` has no room for (:class:`~.worker.Reservation`:
the pages are allocated before they are written, where writing them would raise ``SIGBUS``).

Why a sender thread per worker: a write can block (a full pipe, a large inline payload) until
that worker reads, and the worker reads only after sending its previous results. If the thread
that writes were also the one that reads results, both sides could wait for each other (a
deadlock). Here the collector only ever reads, and a slow worker stalls only
its own sender. A task whose write cannot block (its payload fits a region, and the pipe holds
nothing but headers) skips the sender: the engine's thread copies it and writes its header
directly, which saves a thread wakeup per batch (``_Worker.send``).

Why one collector: a single selector (epoll) over every result pipe, every process sentinel and a
wakeup pipe sees results, crashes and shutdown requests as they happen, at no cost while idle.
When a sentinel fires, the collector first drains that worker's result pipe (results sent just
before dying are real results), then reports the death with the worker's last progress mark.
"""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import struct
import threading
import time
from collections import deque
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from queue import SimpleQueue
from typing import Any

from . import wire as _wire
from .base import TransportEvents
from .worker import CANCEL_ALL, EARLY_SIGNAL, RUNNING, Reservation, worker_main

__all__ = ["REGION_SIZE", "ProcessTransport", "write_frame"]

# Parent-side pipe ends of every live worker in this process. A child forked later inherits
# them and must close them, or a worker would keep another worker's pipe open after the parent
# died, and that worker would never see EOF.
_PARENT_FDS: set[int] = set()
_PIPE_SIZE = 1 << 20
REGION_SIZE = 8 << 20  # bytes per shared-memory region; pages are allocated as they are needed
TURNS = 2  # shared-memory regions each way per worker: the most tasks a worker may hold
_CONTROL_SIZE = 64
_IOV_MAX = 1024  # Linux's IOV_MAX
# Average bytes per part from which a task's parts are written into its region one by one
# rather than joined first: a write call per part costs more than copying a small part twice.
_WRITE_EACH_MIN = 2048
_DIRECT_HEADER_MAX = 4096  # bytes of failed positions and callable in a directly written header
# Result payloads of _SPARE_MIN to _SPARE_MAX bytes are copied into reused buffers, up to
# _SPARES per worker (see _Worker._copy_out).
_SPARE_MIN = 128 << 10
_SPARE_MAX = 4 << 20
_SPARES = 4
_LEN = struct.Struct("!i")
_LEN_LONG = struct.Struct("!iQ")
_Task = tuple[int, tuple[int, ...], _wire.Payload, bytes]  # bid, failed positions, items, call


def write_frame(fd: int, parts: list[Any]) -> None:
    """Write ``parts`` as one ``multiprocessing.connection`` frame, with ``os.writev``.

    The frame reads back with ``Connection.recv_bytes`` (same length prefix), but the parent
    never builds it in one piece: the kernel gathers the buffers.
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


def _buf(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    assert buf is not None  # None only after close()
    return buf


def _small_header(msg: _Task) -> bool:
    """Whether a task's header is small enough to be written directly: the pipe (1 MiB, or
    64 KiB where it cannot be enlarged) holds the headers of the two tasks a worker may hold,
    but a header carries the failed positions and the stream's pickled callable, unbounded."""
    return 4 * len(msg[1]) + len(msg[3]) <= _DIRECT_HEADER_MAX


def _mapping(shm: shared_memory.SharedMemory) -> Any:
    """A file-like view of the region (``seek``, ``write``): its ``mmap`` object."""
    mapping = getattr(shm, "_mmap", None)  # where CPython 3.8 and later keep it
    return mapping if mapping is not None else _BufferFile(_buf(shm))


class _BufferFile:
    """``seek`` and ``write`` over a memoryview: the fallback of :func:`_mapping`."""

    __slots__ = ("pos", "view")

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def write(self, data: Any) -> int:
        end = self.pos + len(data)
        self.view[self.pos : end] = data
        self.pos = end
        return len(data)


def _enlarge(conn: Connection) -> None:
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (AttributeError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size works, slower


class _Worker:
    """One worker process and its plumbing."""

    __slots__ = (
        "backlog",
        "closed",
        "inline_bids",
        "lock",
        "poked",
        "process",
        "progress",
        "queue",
        "reader",
        "regions",
        "reservations",
        "result_views",
        "seen",
        "sender",
        "slot",
        "spare",
        "task_maps",
        "task_views",
        "turn",
        "writer",
    )

    def __init__(
        self,
        slot: int,
        ctx: BaseContext,
        spec: bytes,
        early_after: float,
        inherited: tuple[Any, ...],
    ) -> None:
        self.slot = slot
        self.closed = False
        self.spare: list[bytearray] = []  # result payload buffers for reuse (_copy_out)
        # Writing to the worker: ``lock`` guards the task regions, ``turn``, ``backlog``,
        # ``inline_bids``, and the writes made under it: a payload copied into a region and its
        # small header, which the pipe always has room for. ``backlog`` counts the messages in
        # ``queue`` not yet written (STOP and inline tasks are written without the lock).
        # Set first: close() needs it if anything below fails.
        self.lock = threading.Lock()
        task_r, self.writer = ctx.Pipe(duplex=False)  # parent writes TASK/STOP frames
        self.reader, res_w = ctx.Pipe(duplex=False)  # parent reads READY/RESULT frames
        _enlarge(self.writer)
        _enlarge(self.reader)
        # [task 0..TURNS-1, result 0..TURNS-1, control]; created (and unlinked) by the parent.
        # control holds int64s: [bid running, position running, bid to cancel, position to
        # cancel, a task running] (see worker.cancelled and worker.RUNNING).
        self.regions: list[shared_memory.SharedMemory] = []
        self._make_regions(task_r, res_w)
        self.result_views: list[memoryview] = [_buf(r) for r in self.regions[TURNS:-1]]
        self.progress = _buf(self.regions[-1]).cast("q")
        self.progress[0] = self.progress[2] = -1
        self.seen = (-1, -1)  # (bid, position) the collector saw running at its last look
        self.poked = (-1, -1)  # the (bid, position) it last signalled for early results
        self.task_views = [_buf(r) for r in self.regions[:TURNS]]
        self.task_maps = [_mapping(r) for r in self.regions[:TURNS]]
        self.reservations = [
            Reservation(getattr(r, "_fd", None), REGION_SIZE) for r in self.regions[:TURNS]
        ]
        _PARENT_FDS.update((self.writer.fileno(), self.reader.fileno()))
        fds = tuple(_PARENT_FDS) if ctx.get_start_method() == "fork" else ()
        names = tuple(r.name for r in self.regions)
        self.process = ctx.Process(  # type: ignore[attr-defined]  # BaseContext lacks it
            target=worker_main,
            args=(task_r, res_w, spec, os.getpid(), fds, names, early_after, inherited),
            name=f"ordpool-worker-{slot}",
        )
        try:
            self.process.start()
        except BaseException:
            self.close()
            raise
        finally:
            task_r.close()
            res_w.close()
        self.turn = 0
        self.backlog = 0
        self.inline_bids: set[int] = set()  # tasks sent in the pipe, not yet answered
        self.queue: SimpleQueue[Any] = SimpleQueue()  # (bid, failed, parts, call), STOP or None
        self.sender = threading.Thread(
            target=self._send_loop, name=f"ordpool-sender-{slot}", daemon=True
        )

    def _make_regions(self, task_r: Connection, res_w: Connection) -> None:
        """Create the shared-memory regions; on failure release everything made so far."""
        try:
            for size in (REGION_SIZE,) * (2 * TURNS) + (_CONTROL_SIZE,):
                self.regions.append(shared_memory.SharedMemory(create=True, size=size))
        except BaseException:  # /dev/shm full or missing: leave nothing behind
            self._abandon(task_r, res_w)
            raise
        control = self.regions[-1]
        if not Reservation(getattr(control, "_fd", None), _CONTROL_SIZE).fits(_CONTROL_SIZE):
            self._abandon(task_r, res_w)
            raise OSError(errno.ENOSPC, "no room left in /dev/shm for a worker's shared memory")

    def _abandon(self, task_r: Connection, res_w: Connection) -> None:
        """Release what ``__init__`` made before it failed: regions and pipes."""
        for shm in self.regions:
            shm.close()
            shm.unlink()
        for conn in (task_r, self.writer, self.reader, res_w):
            conn.close()

    def send(self, msg: _Task) -> None:
        """Write a task now if that cannot block, else hand it to the sender thread.

        It cannot block when the payload fits a region and the pipe holds nothing but headers:
        nothing queued before it, no task sent in the pipe and still unread. Then the caller
        copies the payload and writes the header itself, saving the sender thread's wakeup
        per batch; the order of tasks is the order of calls either way.
        """
        with self.lock:
            if self.closed:
                return
            if not self.backlog and not self.inline_bids and _small_header(msg):
                size = msg[2].nbytes
                if self.reservations[self.turn].fits(size):
                    try:
                        self._write_in_region(msg, size)
                    except OSError:
                        pass  # the worker died: see _send_loop
                    return
            self.backlog += 1
            self.queue.put(msg)

    def send_stop(self) -> None:
        with self.lock:
            self.backlog += 1
            self.queue.put(_wire.STOP_FRAME)

    def _write_in_region(self, msg: _Task, size: int) -> None:
        """Copy the payload into the next task region and write its header (``lock`` held)."""
        bid, failed, payload, call = msg
        turn = self.turn
        view = self.task_views[turn]
        head, body = payload.head, payload.body
        start = len(head)
        view[:start] = head
        if len(body) == 1:
            view[start:size] = body[0]
        elif size < _WRITE_EACH_MIN * len(body):
            view[start:size] = b"".join(body)  # small items: one copy more is cheaper
        else:
            # Each item copied straight into the region (the file position advances), in C:
            # a join would first copy the whole batch into a new buffer, whose pages the
            # kernel must fault in again for each batch (tweets: 14% of the parent's CPU).
            mapping = self.task_maps[turn]
            mapping.seek(start)
            deque(map(mapping.write, body), maxlen=0)
        write_frame(self.writer.fileno(), [_wire.task_head(bid, failed, turn, size, call)])
        self.turn = (turn + 1) % TURNS

    def _send_loop(self) -> None:
        fd, get = self.writer.fileno(), self.queue.get
        while True:
            msg = get()
            if msg is None:
                return
            try:
                if msg is _wire.STOP_FRAME:
                    write_frame(fd, [msg])
                    continue
                size = msg[2].nbytes
                with self.lock:
                    if self.closed:
                        return
                    if self.reservations[self.turn].fits(size):
                        self._write_in_region(msg, size)
                        continue
                bid, failed, payload, call = msg
                with self.lock:
                    self.inline_bids.add(bid)
                # This write can block until the worker reads: no lock held, and send() keeps
                # off the pipe meanwhile (backlog > 0), so frames never interleave.
                write_frame(fd, [_wire.task_head(bid, failed, -1, size, call), *payload.buffers()])
            except OSError:
                # The worker died; the collector reports it and the engine re-dispatches
                # whatever this worker held, this batch included. Keep draining until told.
                pass
            except ValueError:
                return  # regions released by close(): the worker is gone
            finally:
                with self.lock:
                    self.backlog -= 1

    def result_payload(self, frame: bytes) -> tuple[int, float, Any, int]:
        """``(bid, seconds, payload, nerrors)`` of a RESULT frame, the payload copied out of
        its region."""
        bid, seconds, region, nbytes, nerrors = _wire.parse_result(frame)
        if region >= 0:
            return bid, seconds, self._copy_out(self.result_views[region][:nbytes]), nerrors
        return bid, seconds, memoryview(frame)[_wire.RESULT_HEAD_SIZE :], nerrors

    def _copy_out(self, view: memoryview) -> Any:
        """A copy of a result payload, in a buffer of an earlier payload when nothing refers to
        that one any more (its batch was consumed): a new buffer of a megabyte or more costs a
        page fault per 4 KiB the first time it is written, and glibc gives freed ones back to
        the kernel (decode: 0.14 faults per message). Only the collector thread calls this.

        A buffer is free when it can be resized: a ``bytearray`` refuses while any memoryview
        of it is alive (``BufferError``). Popping its last byte and putting it back is that
        test, without a reallocation (a buffer keeps one byte more than any payload in it).
        """
        nbytes = len(view)
        if nbytes < _SPARE_MIN or nbytes > _SPARE_MAX:
            return bytes(view)
        spare = self.spare
        best = None
        for i, buf in enumerate(spare):
            if len(buf) > nbytes and (best is None or len(buf) < len(spare[best])):
                try:
                    buf.append(buf.pop())  # raises if a view of it is alive
                except BufferError:
                    continue
                best = i
        if best is not None:
            buf = spare[best]
        else:
            buf = bytearray(nbytes + (nbytes >> 2) + 1)
            if len(spare) >= _SPARES:
                del spare[min(range(len(spare)), key=lambda i: len(spare[i]))]
            spare.append(buf)
        buf[:nbytes] = view
        return memoryview(buf)[:nbytes]

    def close(self) -> None:
        """Release pipes and shared memory (the process has exited or been killed)."""
        with self.lock:  # no region write in progress from here on, and none after
            if self.closed:
                return
            self.closed = True
            self.task_views = []
            self.task_maps = []
        for conn in (self.writer, self.reader):
            try:
                _PARENT_FDS.discard(conn.fileno())
            except OSError:
                pass
            conn.close()
        self.result_views = []
        self.progress.release()
        for shm in self.regions:
            try:
                shm.close()
            except BufferError:
                pass  # the sender still holds a view for a moment; unlink frees it anyway
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class ProcessTransport:
    """Starts worker processes and moves frames to and from them."""

    # A worker holds at most this many tasks: one shared-memory region each way per task.
    max_depth: int = TURNS
    # Batches are sized to carry at most this many bytes of items, or of results (the engine's
    # BatchSizer): a payload larger than a region goes through the pipe, several times slower.
    max_payload: int | None = REGION_SIZE * 3 // 4
    batch_target: float | None = None  # the engine's default

    def __init__(
        self,
        ctx: BaseContext,
        spec: bytes,
        events: TransportEvents,
        *,
        early_after: float = 0.0,
        inherited: tuple[Any, ...] = (),
    ) -> None:
        self._ctx = ctx
        self._spec = spec  # cloudpickled (fn, init, initargs)
        self._inherited = inherited  # initargs items passed with the process (process_spec)
        # Seconds an item may run before the results before it are sent early (_look); or 0.
        self._early_after = early_after
        self._next_look = 0.0  # time.monotonic() of the collector's next look
        self._events = events
        self._lock = threading.Lock()  # guards _workers, _closing and _dirty
        self._workers: dict[int, _Worker] = {}  # slot -> live worker ({0: <_Worker>, 1: ...})
        self._closing = False
        self._stopping: list[_Worker] = []  # the workers a stop() in progress is stopping
        self._stopped = threading.Event()  # set when stop() has released everything
        self._dirty = True  # _workers changed: the collector must update its selector
        # The collector's wake-up pipe. It lives as long as the collector: whichever of stop()
        # and the collector ends last closes it (_close_wake), so that the collector never reads
        # a closed descriptor, or one that the process has meanwhile reused.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._wake_open = True  # guarded by _lock
        self._collector = threading.Thread(
            target=self._collect, name="ordpool-collector", daemon=True
        )

    # -- called by the engine ------------------------------------------------------------------

    def start_workers(self, slots: list[int]) -> None:
        """Start the first workers, all of them before any thread of ours.

        Forking a process that runs threads can deadlock the child (a lock held by another
        thread at the fork stays held forever), and Python 3.12+ warns about it. So the initial
        workers are forked first, and only then the sender threads and the collector start.
        A replacement worker, started after a crash, is forked while they run: with ``fork``
        that cannot be avoided (``forkserver`` and ``spawn`` do not fork this process).
        """
        started = []
        try:
            for slot in slots:
                started.append(self._new_worker(slot))
        except BaseException:
            for worker in started:
                worker.process.kill()
                worker.process.join()
                worker.close()
            raise
        with self._lock:
            for worker in started:
                self._workers[worker.slot] = worker
            self._dirty = True
        for worker in started:
            worker.sender.start()
        self._collector.start()

    def _new_worker(self, slot: int) -> _Worker:
        return _Worker(slot, self._ctx, self._spec, self._early_after, self._inherited)

    def start_worker(self, slot: int) -> None:
        """Start the worker of ``slot`` (the slot's previous process has been reported dead);
        READY or INITERR is reported later."""
        worker = self._new_worker(slot)
        worker.sender.start()
        with self._lock:
            if self._closing:
                closing = True
            else:
                closing = False
                self._workers[slot] = worker
                self._dirty = True
        if closing:
            worker.queue.put(None)
            worker.process.kill()
            worker.process.join()
            worker.sender.join(1.0)
            worker.close()
            worker.process.close()
            return
        self._wake()

    def send(
        self,
        slot: int,
        bid: int,
        failed: tuple[int, ...],
        payload: _wire.Payload,
        call: bytes = b"",
    ) -> None:
        """Send a task to the worker of ``slot``; never waits for a worker (see _Worker.send).

        If that worker has just died (the collector removes it before reporting the death),
        the task is dropped here: the engine already counts it as held by that worker and
        re-queues it when the death is reported.
        """
        worker = self._workers.get(slot)
        if worker is not None:
            worker.send((bid, failed, payload, call))

    def processes(self) -> dict[int, Any]:
        """The live worker processes, ``{pid: multiprocessing.Process}``."""
        with self._lock:
            return {w.process.pid: w.process for w in self._workers.values() if w.process.pid}

    def pids(self) -> dict[int, int]:
        with self._lock:
            return {s: w.process.pid for s, w in self._workers.items() if w.process.pid}

    def cancel(self, slot: int, bid: int, position: int) -> None:
        """Ask the running item ``(bid, position)`` of ``slot`` to stop (``cancelled()``)."""
        with self._lock:
            worker = self._workers.get(slot)
        self._request_cancel([worker], bid, position)

    def cancel_all(self) -> None:
        """Ask every worker's running item to stop."""
        with self._lock:
            workers: list[_Worker | None] = list(self._workers.values())
        self._request_cancel(workers, CANCEL_ALL, -1)

    @staticmethod
    def _request_cancel(workers: list[_Worker | None], bid: int, position: int) -> None:
        for w in workers:
            if w is not None and not w.closed:
                w.progress[3] = position
                w.progress[2] = bid

    def kill(self, slot: int) -> None:
        """SIGKILL one worker (tests, stuck jobs); its death is reported as usual."""
        with self._lock:
            worker = self._workers.get(slot)
        if worker is not None:
            worker.process.kill()

    def stop(self, *, graceful: bool, timeout: float = 5.0) -> None:
        """Stop every worker: STOP frames when ``graceful``, else SIGTERM; SIGKILL what is left."""
        with self._lock:
            if self._closing:
                # A stop is under way (e.g. a graceful one in the collector thread): kill if
                # asked to, and in any case return only once it is done, so that nothing of
                # ours is still running when the caller goes on (or the interpreter exits).
                if not graceful:
                    for w in self._stopping:
                        try:
                            w.process.kill()
                        except (ValueError, OSError):
                            pass  # already closed by the stop under way
                if threading.current_thread() is not self._collector:
                    self._stopped.wait(30)
                return
            self._closing = True
            workers = self._stopping = list(self._workers.values())
            self._workers.clear()
        self._wake()
        for w in workers:
            if graceful:
                w.send_stop()
            else:
                w.process.terminate()
            w.queue.put(None)
        for w in workers:
            w.process.join(timeout if graceful else 1.0)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join()
        if threading.current_thread() is not self._collector and self._collector.ident:
            self._collector.join(5.0)
        for w in workers:
            if w.sender.ident:
                w.sender.join(1.0)
            w.close()
            w.process.close()
        if not self._collector.is_alive():
            # Else the collector is still on its way out (this stop runs in it, or it did not
            # end in time): it closes the pipe as it ends.
            self._close_wake()
        self._stopped.set()

    # -- the collector thread ------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            if not self._wake_open:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # full: the collector has a wake-up to read anyway

    def _close_wake(self) -> None:
        with self._lock:
            if not self._wake_open:
                return
            self._wake_open = False
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _collect(self) -> None:
        events = self._events
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        watched: dict[int, _Worker] = {}  # slot -> worker registered in the selector
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    if self._dirty:
                        self._dirty = False
                        current = dict(self._workers)
                        for slot, w in list(watched.items()):
                            if current.get(slot) is not w:
                                self._unwatch(selector, w)
                                del watched[slot]
                        for slot, w in current.items():
                            if slot not in watched:
                                selector.register(w.reader, selectors.EVENT_READ, (w, False))
                                selector.register(
                                    w.process.sentinel, selectors.EVENT_READ, (w, True)
                                )
                                watched[slot] = w
                ready = selector.select(self._look_timeout())
                if self._early_after:
                    self._look(watched)
                dead = []
                for key, _ in ready:
                    if key.data is None:
                        os.read(self._wake_r, 4096)
                        continue
                    worker, is_sentinel = key.data
                    if is_sentinel:
                        dead.append(worker)
                    elif not worker.reader.closed:
                        if self._closing:
                            return
                        if not self._read_one(worker, events):
                            selector.unregister(worker.reader)
                for worker in dead:
                    if self._closing:
                        return
                    self._unwatch(selector, worker)
                    watched.pop(worker.slot, None)
                    self._bury(worker, events)
        finally:
            selector.close()
            if self._closing:
                self._close_wake()

    def _look_timeout(self) -> float | None:
        """How long the collector may wait for a frame: for ever without early results; else
        until ten times ``early_after`` after its last look at the workers. It looks as it
        reads results anyway (see :meth:`_look`); this only bounds the wait when none come,
        every worker being on a long item, at a tenth of a wake-up per ``early_after``."""
        if not self._early_after:
            return None
        return max(0.0, self._next_look - time.monotonic()) + 9 * self._early_after

    def _look(self, watched: dict[int, _Worker]) -> None:
        """At most once per ``early_after``: signal each worker whose item has not moved since
        the last look; it then sends the results finished before that item (early results).
        The collector looks when it wakes anyway, for a frame, so a busy pool pays nothing
        more; a pool whose workers all run long items is looked at every ten ``early_after``.
        """
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + self._early_after
        for w in watched.values():
            try:
                running, at = w.progress[RUNNING], (w.progress[0], w.progress[1])
            except ValueError:  # closed meanwhile: it died or was stopped
                continue
            if not running:
                w.seen = (-1, -1)
                continue
            if at == w.seen and at != w.poked and w.process.pid:
                w.poked = at
                try:
                    os.kill(w.process.pid, EARLY_SIGNAL)
                except OSError:  # it died: its sentinel reports that
                    pass
            w.seen = at

    @staticmethod
    def _unwatch(selector: selectors.BaseSelector, worker: _Worker) -> None:
        for obj in (worker.reader, worker.process.sentinel):
            try:
                selector.unregister(obj)
            except (KeyError, ValueError):
                pass

    def _read_one(self, worker: _Worker, events: TransportEvents) -> bool:
        """Read and dispatch one frame; False when the pipe is finished."""
        try:
            frame = worker.reader.recv_bytes()
        except (EOFError, OSError):
            # EOF, or a frame cut short by the worker's death: the sentinel reports the death.
            return False
        kind = frame[0]
        if kind == _wire.RESULT:
            bid, seconds, payload, nerrors = worker.result_payload(frame)
            if worker.inline_bids:
                with worker.lock:
                    worker.inline_bids.discard(bid)  # the worker has read that task
            events.on_result(worker.slot, bid, seconds, payload, nerrors)
        elif kind == _wire.PART:
            bid, lo, hi, part = _wire.parse_part(frame)
            events.on_part(worker.slot, bid, lo, hi, part)
        elif kind == _wire.READY:
            events.on_ready(worker.slot, worker.process.pid)
        elif kind == _wire.INITERR:
            events.on_init_error(worker.slot, _wire.decode_initerr(frame))
        elif kind == _wire.RETIRE:
            events.on_retire(worker.slot)
        return True

    def _bury(self, worker: _Worker, events: TransportEvents) -> None:
        while True:
            try:
                if not worker.reader.poll(0):
                    break
            except (OSError, ValueError):
                break
            if not self._read_one(worker, events):
                break
        if self._closing:
            # A frame just read ended the pool (its last result let a shutdown finish) and the
            # stop ran here, in this thread: it has joined and closed every process.
            return
        worker.process.join(1.0)
        with self._lock:
            if self._workers.get(worker.slot) is not worker or self._closing:
                return  # shutting down: not a crash
            del self._workers[worker.slot]
        progress = (worker.progress[0], worker.progress[1]) if not worker.closed else (-1, -1)
        worker.queue.put(None)
        pid = worker.process.pid or 0
        exitcode = worker.process.exitcode
        worker.sender.join(1.0)
        worker.close()
        worker.process.close()
        events.on_death(worker.slot, exitcode, pid, progress)
