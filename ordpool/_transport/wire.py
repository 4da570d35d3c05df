"""The wire: how batches, results and control messages are framed and encoded.

Every message is one pipe frame (``Connection.send_bytes`` framing) whose first byte names its
kind::

    parent -> worker   TASK    b"T" bid:q nfailed:I region:i nbytes:q ncall:I
                               failed:I*nfailed call:ncall [items]
                       STOP    b"S"
    worker -> parent   READY   b"Y" pid:q
                       INITERR b"E" pickle(exception with traceback)
                       RETIRE  b"Q"   (max_tasks_per_child reached: the next RESULT is the last)
                       RESULT  b"R" bid:q seconds:d region:i nbytes:q nerrors:I
                                                                [pickle((values, errors))]

``call``, when not empty, is the pickled callable of the task's stream (an executor's ``map(fn,
...)``), used instead of the pool's ``fn``; workers keep it unpickled in a small cache.
The payload (``items`` or the pickled results) lies in shared-memory region ``region`` of that
worker when it fits there (a copy into shared memory costs a tenth of a pipe write per byte), or
follows the header in the pipe frame when ``region`` is -1.

``items`` is ``b"B" n:I lengths:q*n data`` when every item is exactly ``bytes`` (the Kafka case:
a table of lengths and the bytes themselves, five times cheaper than pickling a list of bytes),
else ``b"P" pickle(list)``. Results are pickled in chunks of ``k`` values (a list per chunk,
:func:`chunk_length`) as the worker makes them (:func:`.worker.run_batch`); a batch in
which no item gave a result is ``b"P" pickle((values, errors))``::

    b"C" n:I k:I nerr:I ends:q*ceil(n/k) chunk_0 chunk_1 ... errors:nerr

``ends`` are the ends of the chunks, counted from the start of the payload; ``errors``, after
the last chunk, is ``pickle(errors)``, or empty when there are none (the worker writes the
chunks into its region as it makes them, :class:`ChunkWriter`; the errors are known last).
The parent unpickles a chunk only when its consumer reaches it (:func:`iter_values`): a few
values alive at a time, where a whole batch of rebuilt dicts would make the cyclic GC traverse
all of them and fall out of the CPU caches.
Why chunks rather than single values: the values of a chunk share one pickle memo, so the keys
their dicts have in common (one ``str`` object each in the worker, as ``orjson`` makes them)
are written once and rebuilt once, and a call serves several values. A whole batch as one
list unpickles as fast, but costs more per value in the pipeline (GC and caches, above).
docs/design.md ("Results in chunks") has the figures.
Why about 16 KB a chunk for small results, up to 1,024 values: alone, the ``transform``
workload's 5-tuples (47 bytes pickled) unpickle as fast in chunks of 256 to 1,024 as in one
list of 5,000, but in the pool a chunk's values are made, handed out and freed while they are
still in the caches. As one list per batch, they would be freed after the whole batch, while
the parent's other threads copy megabytes of items meanwhile, and the parent's CPU per
message is higher.
Large results (:data:`LARGE_MIN` bytes or more: dicts, documents) go at most
:data:`CHUNK_MAX` to a chunk, so that few rebuilt values are alive at a time.

Why not :mod:`marshal`, which loads plain dicts about 25% faster: it silently turns any buffer
(``bytearray``, ``memoryview``, ``array.array``, a numpy array) into ``bytes``, and a pool must
give back the types it was given.
``failed`` lists positions the worker must not run (the parent already holds their error).
``errors`` is ``None`` or ``{position: exception}``; values at those positions are ``None``.

Items and results are pickled with :mod:`pickle` first (fast, C) and with :mod:`cloudpickle`
only when that fails (lambdas, closures, local classes). An object neither can pickle fails
alone, at its own position: the rest of its batch goes on.
"""

from __future__ import annotations

import gc
import pickle
import struct
from array import array
from collections.abc import Callable
from itertools import accumulate, pairwise, repeat
from operator import countOf
from typing import Any

import cloudpickle

from .._core.errors import wrap_exception

__all__ = [
    "ALL_FAILED",
    "INITERR",
    "PART",
    "READY",
    "RESULT",
    "RETIRE",
    "STOP",
    "TASK",
    "WHOLE_TASK",
    "ChunkValues",
    "ChunkWriter",
    "Payload",
    "chunk_length",
    "decode_items",
    "decode_results",
    "dump_chunk",
    "dumps",
    "encode_items",
    "encode_results",
    "iter_values",
    "parse_part",
    "parse_result",
    "parse_task",
    "part_frame",
    "result_head",
    "task_head",
]

TASK, STOP, READY, INITERR, RESULT, RETIRE, PART = (
    b"T"[0],
    b"S"[0],
    b"Y"[0],
    b"E"[0],
    b"R"[0],
    b"Q"[0],
    b"p"[0],
)
STOP_FRAME = b"S"
ALL_FAILED = 0xFFFFFFFF  # RESULT nerrors: every item failed (its batch could not be decoded)
# The error position that stands for every position of a task (its items could not be loaded).
WHOLE_TASK = -1
RETIRE_FRAME = b"Q"

_TASK_HEAD = struct.Struct("<BqIiqI")  # kind, bid, nfailed, region, nbytes, ncall
_RESULT_HEAD = struct.Struct("<BqdiqI")  # kind, bid, worker seconds, region, nbytes, nerrors
_READY = struct.Struct("<Bq")  # kind, pid
_PART_HEAD = struct.Struct("<BqII")  # kind, bid, first position, end position; payload follows
RESULT_HEAD_SIZE = _RESULT_HEAD.size
_COUNT = struct.Struct("<I")
_CHUNKS_HEAD = struct.Struct("<BIII")  # b"C", values, values per chunk, bytes of pickled errors
CHUNK_BYTES = 16 << 10  # about this many pickled bytes of results per chunk...
LARGE_MIN = 256  # ...from a first result this large (pickled bytes) on, at most
CHUNK_MAX = 16  # this many values (the gain is in by 8 to 16)...
SMALL_CHUNK_MAX = 1024  # ...else at most this many
PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj: Any) -> bytes:
    """Pickle with the C pickler, falling back to cloudpickle (lambdas, closures)."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        data: bytes = cloudpickle.dumps(obj, PROTOCOL)
        return data


def _no_gc(load: Any, data: Any) -> Any:
    """Load with the cyclic GC paused: it would triple the cost of loading containers."""
    if gc.isenabled():
        gc.disable()
        try:
            return load(data)
        finally:
            gc.enable()
    return load(data)


# -- items: parent -> worker -------------------------------------------------------------------


class Payload:
    """An encoded batch of items: ``head``, then the buffers in ``body``; ``nbytes`` in all.

    For ``bytes`` items, ``body`` is the list of items itself (the batch's own list, not a copy):
    the transport copies them into shared memory (small ones joined first) or hands them to
    ``os.writev``, so the parent copies no message before the wire, and touches no item's
    reference count to build a list of buffers.
    """

    __slots__ = ("body", "head", "nbytes")

    def __init__(self, head: bytes, body: list[Any], nbytes: int) -> None:
        self.head = head
        self.body = body
        self.nbytes = nbytes

    def buffers(self) -> list[Any]:
        """Every buffer, in order: what :func:`ordpool._transport.process.write_frame` takes."""
        return [self.head, *self.body]

    def join(self) -> bytes:
        """The payload in one piece."""
        return b"".join(self.buffers())


def encode_items(items: list[Any]) -> tuple[Payload, dict[int, BaseException]]:
    """Encode a batch of items; returns ``(payload, failed)``.

    ``failed`` maps the position of every item that cannot be pickled to the exception that says
    why; those positions travel as ``None`` and the worker skips them.
    """
    if items and countOf(map(type, items), bytes) == len(items):  # in C, no set
        # A list of lengths packed by struct: half the cost of array("q", map(len, items)),
        # which parses each length with PyArg_Parse.
        lengths = list(map(len, items))
        n = len(items)
        head = b"B" + _COUNT.pack(n) + struct.pack(f"={n}q", *lengths)  # native, as array
        return Payload(head, items, len(head) + sum(lengths)), {}
    try:
        return _pickled(dumps(items)), {}
    except Exception:
        pass
    failed: dict[int, BaseException] = {}
    clean = list(items)
    for pos, item in enumerate(items):
        try:
            dumps(item)
        except Exception as exc:
            err = pickle.PicklingError(f"cannot pickle item of type {type(item).__qualname__}")
            err.__cause__ = exc
            failed[pos] = err
            clean[pos] = None
    return _pickled(dumps(clean)), failed


def _pickled(data: bytes) -> Payload:
    return Payload(b"P", [data], 1 + len(data))


def decode_items(data: memoryview, source: Any = None) -> list[Any]:
    """Inverse of :func:`encode_items` (worker side).

    ``source``, when given, holds the same bytes as ``data`` at the same offsets and slices to
    ``bytes`` (a region's ``mmap``): each ``bytes`` item is then copied straight out of it,
    once, where otherwise the payload would be copied whole first.
    """
    if data[0] == b"B"[0]:
        (n,) = _COUNT.unpack_from(data, 1)
        start = 1 + _COUNT.size + 8 * n
        lengths = array("q")
        lengths.frombytes(data[1 + _COUNT.size : start])
        if source is not None:
            return [source[a:b] for a, b in pairwise(accumulate(lengths, initial=start))]
        raw = bytes(data[start:])
        return [raw[a:b] for a, b in pairwise(accumulate(lengths, initial=0))]
    return pickle.loads(data[1:])  # type: ignore[no-any-return]  # unpickled


def task_head(bid: int, failed: Any, region: int, nbytes: int, call: bytes = b"") -> bytes:
    """The TASK header (failed positions, stream callable) that goes before a batch's items."""
    head = _TASK_HEAD.pack(TASK, bid, len(failed), region, nbytes, len(call))
    if failed:
        head += array("I", sorted(failed)).tobytes()
    return head + call if call else head


def parse_task(frame: bytes) -> tuple[int, set[int], int, int, bytes, memoryview]:
    """Split a TASK frame: ``(bid, failed positions, region, nbytes, call, inline payload)``."""
    _, bid, nfailed, region, nbytes, ncall = _TASK_HEAD.unpack_from(frame)
    start = _TASK_HEAD.size
    failed: set[int] = set()
    if nfailed:
        positions = array("I")
        positions.frombytes(frame[start : start + 4 * nfailed])
        failed = set(positions)
        start += 4 * nfailed
    call = frame[start : start + ncall]
    return bid, failed, region, nbytes, call, memoryview(frame)[start + ncall :]


# -- results: worker -> parent -----------------------------------------------------------------


def encode_results(values: list[Any], errors: dict[int, Any] | None) -> bytes:
    """Encode a batch's results as one pickle (``b"P"``). A value that cannot be pickled
    becomes that item's error."""
    try:
        return b"P" + dumps((values, errors))
    except BaseException:  # SystemExit too: a value's __reduce__ may raise anything
        pass
    errors = dict(errors or {})
    _drop_unpicklable(values, 0, errors)
    return b"P" + dumps((values, errors))


def _drop_unpicklable(values: list[Any], base: int, errors: dict[int, Any]) -> None:
    """Replace each value that cannot be pickled by ``None``, and record its error at
    ``base + position`` (failed positions already hold ``None``)."""
    for i, value in enumerate(values):
        if value is None:
            continue
        try:
            dumps(value)
        except BaseException as exc:
            errors[base + i] = result_pickling_error(value, exc)
            values[i] = None


def result_pickling_error(value: Any, exc: BaseException) -> Any:
    """The error of a result that cannot be pickled, ready to travel: a ``PicklingError``
    that names the result's type, or the exception itself when it is not an ``Exception``
    (``SystemExit`` raised by a ``__reduce__``), as the standard library's worker reports it."""
    if not isinstance(exc, Exception):
        return wrap_exception(exc)
    kind = type(value).__qualname__
    err = pickle.PicklingError(f"cannot pickle the result of type {kind}: {exc}")
    return wrap_exception(err)


def chunk_length(first_size: int) -> int:
    """Values per chunk for results whose first one pickled to ``first_size`` bytes."""
    most = CHUNK_MAX if first_size >= LARGE_MIN else SMALL_CHUNK_MAX
    return max(1, min(most, CHUNK_BYTES // max(first_size, 1)))


def dump_chunk(values: list[Any], base: int, errors: dict[int, Any]) -> bytes:
    """Pickle a chunk of results (the values of positions ``base`` on). A value that cannot be
    pickled becomes that position's error in ``errors``, and ``None`` in the chunk."""
    try:
        return dumps(values)  # cloudpickle when a value needs it: once a chunk, not a value
    except BaseException:
        pass
    _drop_unpicklable(values, base, errors)
    try:
        return dumps(values)  # cloudpickle when a value needs it (a lambda, a local class)
    except BaseException as exc:  # each pickles alone, not together: each value's error, then
        for i, value in enumerate(values):
            if value is not None:
                errors[base + i] = result_pickling_error(value, exc)
        return pickle.dumps([None] * len(values), PROTOCOL)


class ChunkWriter:
    """Writes a batch's results as a ``b"C"`` payload, a chunk at a time, into a
    shared-memory region (a worker's result region), or into memory when they will not fit
    there, or when there is no region (Ray, tests).

    One pickler, made once, pickles every chunk it is given, and each chunk's pickle is
    copied into the region once, as it is made: no pickler, memo table and output buffer
    grown by copies per chunk, and no join and copy of the whole payload afterwards.

    The region is written only where ``fits`` has said it may be (its pages are allocated,
    ``_worker.Reservation``): a page of a full tmpfs touched otherwise, even read, kills the
    worker with ``SIGBUS``. A payload that would not fit is kept out of the region from the
    start, so that it does not take the region's pages only to travel in the pipe.

    Use: :meth:`target` (the region, if any), :meth:`begin`, :meth:`dump` per chunk, then
    :meth:`finish`, which returns the payload, or ``None`` when it lies in the region
    (:attr:`size` bytes from its start).
    """

    __slots__ = ("_ends", "_fits", "_k", "_n", "_pickler", "_spill", "_start", "_view", "size")

    def __init__(self) -> None:
        self._pickler = pickle.Pickler(self, PROTOCOL)  # writes through self.write
        self._view: Any = _NO_REGION
        self._fits: Callable[[int], bool] | None = None
        self._spill: bytearray | None = None
        self._ends = array("q")
        self._n = self._k = self._start = self.size = 0

    def target(self, view: Any, fits: Callable[[int], bool] | None) -> None:
        """Write the next payload into ``view`` where ``fits(nbytes)`` says its first
        ``nbytes`` may be written (``None``: all of it)."""
        self._view, self._fits = view, fits

    def begin(self, n: int, k: int, estimate: int) -> None:
        """Start a payload of ``n`` values in chunks of ``k``, about ``estimate`` bytes."""
        self._n, self._k = n, k
        # The head and the table of ends are written last, in the room kept for them here.
        self._start = self.size = start = _CHUNKS_HEAD.size + 8 * -(-n // k)
        self._ends = array("q")
        want = start + estimate
        fits = self._fits
        if want <= len(self._view) and (fits is None or fits(want)):
            self._spill = None
        else:
            self._spill = bytearray(start)  # in memory from the start: it travels in the pipe

    def write(self, data: Any) -> int:
        """The pickler's file: append ``data`` to the payload."""
        if type(data) is pickle.PickleBuffer:  # a large out-of-band-capable buffer, in band
            data = data.raw()  # its bytes, in memory order (len() of a PickleBuffer fails)
        pos = self.size
        end = pos + len(data)
        spill = self._spill
        if spill is None:
            fits = self._fits
            if end <= len(self._view) and (fits is None or fits(end)):
                self._view[pos:end] = data
                self.size = end
                return end - pos
            # More than estimated: the payload goes on in memory, with what this batch wrote
            # in the region (pages that fits() allowed; the room for the head is not read).
            spill = self._spill = bytearray(self._start)
            spill += self._view[self._start : pos]
        spill += data
        self.size = end
        return end - pos

    def dump(self, values: list[Any], base: int, errors: dict[int, Any]) -> None:
        """Append the chunk of the values of positions ``base`` on. A value that cannot be
        pickled becomes that position's error in ``errors``, and ``None`` in the chunk."""
        pos = self.size
        try:
            self._pickler.dump(values)
        except BaseException:
            # Undo what the failed dump wrote (a large chunk is written in frames as it goes).
            self.size = pos
            if self._spill is not None:
                del self._spill[pos:]
            self.write(dump_chunk(values, base, errors))
        finally:
            self._pickler.clear_memo()  # chunks unpickle alone; and no value is kept alive
        self._ends.append(self.size)

    def dumped(self, i: int) -> bytes:
        """The pickled bytes of chunk ``i``, dumped already (a copy)."""
        first = self._ends[i - 1] if i else self._start
        buf = self._spill if self._spill is not None else self._view
        return bytes(buf[first : self._ends[i]])

    @property
    def chunk_values(self) -> int:
        """Values per chunk of the payload being written."""
        return self._k

    def finish(self, errors: dict[int, Any] | None) -> bytes | None:
        """End the payload: ``None`` when it lies in the region (``size`` bytes), else it."""
        pickled_errors = dumps(errors) if errors else b""
        if pickled_errors:
            self.write(pickled_errors)
        head = _CHUNKS_HEAD.pack(b"C"[0], self._n, self._k, len(pickled_errors))
        head += self._ends.tobytes()
        spill, self._spill = self._spill, None
        view, self._view = self._view, _NO_REGION  # the region is targeted again per batch
        self._fits = None
        if spill is None:
            view[: self._start] = head
            return None
        spill[: self._start] = head
        return bytes(spill)


_NO_REGION = memoryview(b"")


def result_head(bid: int, seconds: float, region: int, nbytes: int, nerrors: int) -> bytes:
    """The RESULT header; ``nerrors`` lets the parent count failures without unpickling."""
    return _RESULT_HEAD.pack(RESULT, bid, seconds, region, nbytes, nerrors)


def parse_result(frame: bytes) -> tuple[int, float, int, int, int]:
    """``(bid, seconds, region, nbytes, nerrors)`` of a RESULT frame; inline payload follows."""
    _, bid, seconds, region, nbytes, nerrors = _RESULT_HEAD.unpack_from(frame)
    return bid, seconds, region, nbytes, nerrors


def part_frame(bid: int, lo: int, hi: int, values: list[Any], errors: dict[int, Any]) -> bytes:
    """A PART frame: the results of positions ``lo`` to ``hi`` of a task that is still running
    (``errors`` by position in the task), sent ahead of its RESULT."""
    local = {pos - lo: err for pos, err in errors.items() if lo <= pos < hi}
    return _PART_HEAD.pack(PART, bid, lo, hi) + encode_results(values, local or None)


def parse_part(frame: bytes) -> tuple[int, int, int, memoryview]:
    """``(bid, first position, end position, payload)`` of a PART frame."""
    _, bid, lo, hi = _PART_HEAD.unpack_from(frame)
    return bid, lo, hi, memoryview(frame)[_PART_HEAD.size :]


def decode_results(payload: Any) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Decode a batch's ``(values, errors)`` (parent side, cyclic GC paused).

    A chunk of values (``b"C"``) that cannot be unpickled here becomes the error of each of its
    values; a batch pickled as a whole fails as a whole (the caller handles the exception).
    """
    if payload[0] != b"C"[0]:
        return _no_gc(pickle.loads, memoryview(payload)[1:])  # type: ignore[no-any-return]  # unpickled
    return _no_gc(_load_chunks, payload)  # type: ignore[no-any-return]  # unpickled


def _load_chunks(payload: Any) -> tuple[list[Any], dict[int, BaseException] | None]:
    data, n, k, ends, start, errors = _split_chunks(payload)
    values: list[Any] = []
    for first, end in zip(range(0, n, k), ends):
        last = min(first + k, n)
        try:
            chunk = _load_chunk(data[start:end], last - first)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            errors = errors or {}
            err = unpickling_error(exc)
            for pos in range(first, last):
                errors.setdefault(pos, err)  # an error the worker reported stays
            chunk = [None] * (last - first)
        values += chunk
        start = end
    return values, errors


def _load_chunk(data: memoryview, count: int) -> list[Any]:
    chunk = _loads(data)
    if type(chunk) is not list or len(chunk) != count:
        raise ValueError(f"a chunk of {count} results decoded to {type(chunk).__name__}")
    return chunk


def _split_chunks(
    payload: Any,
) -> tuple[memoryview, int, int, array[int], int, dict[int, Any] | None]:
    """``(data, n, k, ends, start of the first chunk, errors)`` of a ``b"C"`` payload."""
    data = memoryview(payload)
    _, n, k, nerr = _CHUNKS_HEAD.unpack_from(data)
    start = _CHUNKS_HEAD.size + 8 * -(-n // k)
    ends = array("q")
    ends.frombytes(data[_CHUNKS_HEAD.size : start])
    errors = pickle.loads(data[ends[-1] : ends[-1] + nerr]) if nerr else None
    return data, n, k, ends, start, errors


def iter_values(
    payload: Any,
    on_error: Callable[[int, BaseException], Any] | None,
    indices: Any = None,
    result: type | None = None,
) -> ChunkValues | None:
    """The values of a ``b"C"`` payload with no errors, unpickled a chunk at a time as they are
    reached.

    ``None`` for any other payload (the caller decodes it with :func:`decode_results`).
    The values of a chunk that cannot be unpickled are each replaced by
    ``on_error(position, error)``, which may return a stand-in, return :data:`SKIP` to leave the
    value out, or raise (which ends the iteration). With ``indices`` and ``result`` (a 3-tuple
    type), the iterator yields ``result((index, value, error))`` instead, the error in its slot.
    """
    if payload[0] != b"C"[0] or _CHUNKS_HEAD.unpack_from(payload)[3]:
        return None
    data, n, k, ends, start, _ = _split_chunks(payload)
    return ChunkValues(data, n, k, ends, start, on_error, indices, result)


SKIP = object()  # on_error's answer for "leave this value out"


class ChunkValues:
    """The iterator of :func:`iter_values`: a chunk at a time (:meth:`next_chunk`), or a value
    at a time.

    An object rather than a generator so that a ``KeyboardInterrupt`` while a chunk unpickles
    leaves it where it was: asking again retries that chunk, and nothing of the batch is lost.
    A generator would be finished by it, and the consumer would go on with the next batch.
    Consumers take whole chunks (``chain`` then hands their values out in C, cheaper than a
    Python ``__next__`` each); a value
    at a time serves what a consumer left mid-batch. Values of a chunk being handed out one by
    one wait, reversed, in a list: a ``pop()`` each.
    """

    __slots__ = (
        "_chunk",
        "_data",
        "_ends",
        "_indices",
        "_k",
        "_n",
        "_on_error",
        "_ready",
        "_result",
        "_start",
    )

    def __init__(
        self,
        data: memoryview,
        n: int,
        k: int,
        ends: array[int],
        start: int,
        on_error: Callable[[int, BaseException], Any] | None,
        indices: Any,
        result: type | None,
    ) -> None:
        self._data, self._n, self._k, self._ends, self._start = data, n, k, ends, start
        self._chunk = 0
        self._ready: list[Any] = []
        self._on_error, self._indices, self._result = on_error, indices, result

    def __iter__(self) -> ChunkValues:
        return self

    def __next__(self) -> Any:
        try:
            return self._ready.pop()
        except IndexError:
            pass
        while True:
            loaded = self._load()
            if loaded is None:
                raise StopIteration
            values, c, end = loaded
            values.reverse()
            # The chunk is handed over in one statement, only once all of it is ready: a
            # KeyboardInterrupt before this point leaves the chunk to be loaded again.
            self._ready, self._chunk, self._start = values, c, end
            if values:
                return values.pop()

    def next_chunk(self) -> list[Any] | None:
        """The values of the next chunk (or what stands for them), ``None`` after the last.
        Call it only once the values handed out one by one are all taken."""
        while True:
            loaded = self._load()
            if loaded is None:
                return None
            values, c, end = loaded
            self._chunk, self._start = c, end  # one statement: see __next__
            if values:
                return values

    def _load(self) -> tuple[list[Any], int, int] | None:
        """``(values, next chunk, its start)`` of the current chunk, the iterator unchanged
        (a ``KeyboardInterrupt`` leaves it to be loaded again); ``None`` after the last."""
        c = self._chunk
        try:
            end = self._ends[c]
        except IndexError:
            return None
        first = c * self._k
        last = min(first + self._k, self._n)
        try:
            values = _load_chunk(self._data[self._start : end], last - first)
        except KeyboardInterrupt:
            raise  # not the chunk's fault: asking again retries it
        except BaseException as exc:  # SystemExit too: the chunk's error, as in a worker
            values = self._failed(first, last, unpickling_error(exc))
        else:
            if self._result is not None:
                values = list(
                    map(
                        tuple.__new__,
                        repeat(self._result),
                        zip(self._indices[first:last], values, repeat(None)),
                    )
                )
        return values, c + 1, end

    def _failed(self, first: int, last: int, err: BaseException) -> list[Any]:
        """What stands for positions ``first`` to ``last``, whose chunk failed to unpickle.
        ``on_error`` raising ends the iteration (a ``KeyboardInterrupt`` does not: iterating
        again retries the chunk)."""
        if self._result is not None:
            new, result, indices = tuple.__new__, self._result, self._indices
            return [new(result, (indices[p], None, err)) for p in range(first, last)]
        assert self._on_error is not None  # iter_values gets one of the two
        out = []
        for pos in range(first, last):
            try:
                value = self._on_error(pos, err)
            except KeyboardInterrupt:
                raise
            except BaseException:
                self._chunk = len(self._ends)  # on_error raising ends the iteration
                raise
            if value is not SKIP:
                out.append(value)
        return out


_loads = pickle.loads


class UnpicklingResultError(RuntimeError):
    """A result the parent could not unpickle: an error of the pool, not of the item's call
    (the executor breaks on it, as the standard library's does)."""


def unpickling_error(exc: BaseException) -> RuntimeError:
    """The error of a result the parent could not unpickle (each value of the chunk gets it)."""
    err = UnpicklingResultError(f"could not unpickle this result, or one pickled with it: {exc!r}")
    err.__cause__ = exc
    return err


def ready_frame(pid: int) -> bytes:
    return _READY.pack(READY, pid)


def initerr_frame(exc: BaseException) -> bytes:
    return bytes([INITERR]) + dumps(wrap_exception(exc))


def decode_initerr(frame: bytes) -> BaseException:
    exc = pickle.loads(memoryview(frame)[1:])
    assert isinstance(exc, BaseException)
    return exc
