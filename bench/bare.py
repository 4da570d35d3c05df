"""The fastest bare ordered pool we could write for one workload, side by side with ordpool.

A floor that counts what one-process measurements (``floor.py``) leave out: three processes
sharing two cores, caches that the workers and the parent share, wake-ups, the transport. The
bare pool does only what any ordered process pool must, with the cheapest means we know and
none of ordpool's features (no threads, no error handling, no keys, no backpressure logic):

* the parent cuts the input into batches of ``--batch`` messages and hands them round-robin to
  the workers, two batches per worker: a table of lengths and the bytes, copied into a shared-
  memory region (``multiprocessing.shared_memory``), and a 8-byte header in a pipe;
* a worker slices the messages out of the region, runs the function, pickles the results
  straight into a result region with one pickler kept for the process, in chunks of about
  16 KB as ordpool sends them (up to 16 large results, up to 1,024 small ones), and answers
  with a header of chunk ends;
* the parent, in one thread, waits for the next batch in order, unpickles it in place (no copy
  out of the region), hands the values on, and only then sends that worker its next batch.

``--codec marshal`` swaps pickle for :mod:`marshal`: faster, but it turns every buffer
(``bytearray``, ``memoryview``, numpy arrays) into ``bytes`` and refuses subclasses, so no
general-purpose pool can use it; it shows what the codec, not the pool, costs.

Each round runs every engine once over the same messages (serial, the bare pool(s), ordpool,
``ProcessPoolExecutor.map`` and ``multiprocessing.Pool.imap`` at each of the ``--chunksize``
candidates), all pools started before the data is built, with ``forkserver``. The report gives
medians over the rounds of throughput, of ratios to serial and to the best stdlib run of the
same round (either pool, at its best chunksize there, as ``ordpool bench`` picks them), and of
CPU per message of the parent and of the workers.

Usage: ``python bench/bare.py [--workload decode|transform] [--rounds 7] [--messages 200000]
[--codec pickle,marshal] [--chunksize 100,1000,5000]``
"""

from __future__ import annotations

import argparse
import collections
import gc
import marshal
import multiprocessing as mp
import pickle
import resource
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import accumulate, pairwise
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool import ProcessOrderedPool
from ordpool.bench import WORKLOADS, make_messages

REGION = 16 << 20  # bytes per region: two task and two result regions per worker
CHUNK_BYTES = 16 << 10  # pickled bytes of results per chunk, about, as ordpool sends them:
CHUNK = 16  # at most this many large results...
SMALL_CHUNK = 1024  # ...or this many small ones
LARGE = 256  # pickled bytes of the first result from which results count as large


class _RegionFile:
    """The pickler's file: appends to a result region."""

    def __init__(self) -> None:
        self.view: Any = None
        self.pos = 0

    def write(self, data: Any) -> None:
        end = self.pos + len(data)
        self.view[self.pos : end] = data
        self.pos = end


def _worker(
    tasks: Any, results: Any, names: list[str], workload: str, codec: str
) -> None:  # pragma: no cover - runs in the worker
    fn = WORKLOADS[workload].fn
    regions = [shared_memory.SharedMemory(name) for name in names]
    task_views = [r.buf for r in regions[:2]]
    task_maps = [r._mmap for r in regions[:2]]  # type: ignore[attr-defined]
    result_views = [r.buf for r in regions[2:]]
    out = _RegionFile()
    pickler = pickle.Pickler(out, pickle.HIGHEST_PROTOCOL)
    while True:
        head = tasks.recv_bytes()
        if not head:
            return
        turn, n = struct.unpack("<ii", head)
        start = 8 * n
        lengths = task_views[turn][:start].cast("q")
        bounds = list(accumulate(lengths, initial=start))
        lengths.release()
        mapping = task_maps[turn]
        items = [mapping[a:b] for a, b in pairwise(bounds)]
        out.view, out.pos = result_views[turn], 0
        # Results are made and pickled a chunk at a time, while still in the caches.
        size = len(pickle.dumps(fn(items[0]), pickle.HIGHEST_PROTOCOL))
        step = max(1, min(CHUNK if size >= LARGE else SMALL_CHUNK, CHUNK_BYTES // size))
        ends = []
        for c in range(0, n, step):
            values = list(map(fn, items[c : c + step]))
            if codec == "marshal":
                out.write(marshal.dumps(values))
            else:
                pickler.dump(values)
                pickler.clear_memo()
            ends.append(out.pos)
        del items, values
        results.send_bytes(struct.pack(f"<{len(ends)}q", *ends))


class BarePool:
    """The bare ordered pool (see the module docstring)."""

    def __init__(self, workers: int, workload: str, codec: str, ctx: Any) -> None:
        self.codec = codec
        self.workers: list[dict[str, Any]] = []
        for _ in range(workers):
            regions = [shared_memory.SharedMemory(create=True, size=REGION) for _ in range(4)]
            task_r, task_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_worker,
                args=(task_r, result_w, [r.name for r in regions], workload, codec),
                daemon=True,
            )
            process.start()
            self.workers.append(
                {"process": process, "send": task_w, "recv": result_r, "regions": regions}
            )

    def pids(self) -> list[int]:
        return [w["process"].pid for w in self.workers]

    @staticmethod
    def _send(worker: dict[str, Any], turn: int, batch: Sequence[bytes]) -> None:
        n = len(batch)
        head = struct.pack(f"={n}q", *map(len, batch))
        view = worker["regions"][turn].buf
        view[: len(head)] = head
        body = b"".join(batch)
        view[len(head) : len(head) + len(body)] = body
        worker["send"].send_bytes(struct.pack("<ii", turn, n))

    def imap(self, messages: Sequence[bytes], batch: int) -> Iterator[Any]:
        batches = [messages[i : i + batch] for i in range(0, len(messages), batch)]
        w = len(self.workers)
        for i in range(min(len(batches), 2 * w)):
            self._send(self.workers[i % w], (i // w) % 2, batches[i])
        loads = marshal.loads if self.codec == "marshal" else pickle.loads
        for i in range(len(batches)):
            worker, turn = self.workers[i % w], (i // w) % 2
            head = worker["recv"].recv_bytes()
            view = worker["regions"][2 + turn].buf
            start = 0
            gc.disable()  # (ordpool pauses it for whole batches only: no difference per chunk)
            try:
                for end in struct.unpack(f"<{len(head) // 8}q", head):
                    yield from loads(view[start:end])
                    start = end
            finally:
                gc.enable()
            if i + 2 * w < len(batches):
                self._send(worker, turn, batches[i + 2 * w])

    def close(self) -> None:
        for worker in self.workers:
            worker["send"].send_bytes(b"")
            worker["process"].join(5)
            for region in worker["regions"]:
                region.close()
                region.unlink()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workers_cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="decode", choices=["decode", "transform"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1000, help="bare pool's batch size")
    parser.add_argument(
        "--chunksize", default="100,1000,5000", help="the stdlib pools' chunksizes to run"
    )
    parser.add_argument("--codec", default="pickle,marshal", help="bare pool codecs to run")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    chunksizes = [int(c) for c in args.chunksize.split(",")]
    ctx = mp.get_context("forkserver")
    # Every pool starts before the data exists (PERF.md: copy-on-write otherwise).
    bare = {c: BarePool(args.workers, args.workload, c, ctx) for c in args.codec.split(",")}
    pool = ProcessOrderedPool(workload.fn, workers=args.workers, start_method="forkserver")
    executor = ProcessPoolExecutor(args.workers, mp_context=ctx)
    mp_pool = ctx.Pool(args.workers)
    try:
        messages = make_messages(args.messages)
        warm = messages[:5000]
        expected = list(map(workload.fn, warm))
        for codec, b in bare.items():
            assert list(b.imap(warm, args.batch)) == expected, codec
        assert list(pool.imap(warm)) == expected
        for chunksize in chunksizes:
            assert list(executor.map(workload.fn, warm, chunksize=chunksize)) == expected
            assert list(mp_pool.imap(workload.fn, warm, chunksize)) == expected
        engines: dict[str, tuple[Callable[[], Iterator[Any]], list[int]]] = {
            "serial": (lambda: map(workload.fn, messages), []),
        }
        for codec, b in bare.items():
            engines[f"bare pool ({codec})"] = (
                lambda b=b: b.imap(messages, args.batch),
                b.pids(),
            )
        engines["ordpool"] = (lambda: pool.imap(messages), pool.worker_pids())
        for chunksize in chunksizes:
            engines[f"ProcessPoolExecutor.map ({chunksize})"] = (
                lambda c=chunksize: executor.map(workload.fn, messages, chunksize=c),
                [p.pid for p in executor._processes.values()],  # type: ignore[union-attr]
            )
            engines[f"multiprocessing.Pool.imap ({chunksize})"] = (
                lambda c=chunksize: mp_pool.imap(workload.fn, messages, c),
                [p.pid for p in mp_pool._pool],  # type: ignore[attr-defined]
            )
        rows: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)
        for _ in range(args.rounds):  # rounds: a drift of the machine hits every engine alike
            for name, (run, pids) in engines.items():
                cpu, wcpu, start = _cpu(), _workers_cpu(pids), time.perf_counter()
                collections.deque(run(), maxlen=0)
                wall = time.perf_counter() - start
                n = len(messages)
                rows[name].append(
                    (n / wall, (_cpu() - cpu) / n * 1e6, (_workers_cpu(pids) - wcpu) / n * 1e6)
                )
    finally:
        for b in bare.values():
            b.close()
        pool.close()
        pool.join()
        executor.shutdown()
        mp_pool.close()
        mp_pool.join()
    serial = rows["serial"]
    stdlib = [name for name in rows if "Pool" in name]
    # The best stdlib run of each round (either pool, any chunksize): the base of "x stdlib".
    best = [max(rows[name][i][0] for name in stdlib) for i in range(args.rounds)]
    print(
        f"{args.workload}, {args.workers} workers, {args.messages:,} messages, "
        f"medians of {args.rounds} rounds (ratios taken within each round)"
    )
    print(
        f"{'engine':<34} {'k msg/s':>8} {'x serial':>9} {'x stdlib':>9} "
        f"{'parent us':>10} {'worker us':>10}"
    )
    for name, runs in rows.items():
        ratio = statistics.median(r[0] / s[0] for r, s in zip(runs, serial))
        vs_best = statistics.median(r[0] / b for r, b in zip(runs, best))
        rate, parent, worker = (statistics.median(r[i] for r in runs) for i in range(3))
        print(
            f"{name:<34} {rate / 1e3:8.1f} {ratio:9.2f} {vs_best:9.2f} "
            f"{parent:10.2f} {worker:10.2f}"
        )
    print("x stdlib: against the best stdlib run (either pool, any chunksize) of the same round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
