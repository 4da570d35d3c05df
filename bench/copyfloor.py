"""The parent's floor for large messages: one copy of each message into shared memory.

Whatever the pool, the parent must hand every message's bytes to another process, so it reads
each message once and writes it once: ordpool copies it into a worker's shared-memory region
(``mmap.write`` per message, as ``_process._Worker._write_in_region`` does for large parts); a
pipe-based pool copies it into a pipe, with a pickle first. This script measures that one copy,
per message, on your messages:

* alone, with nothing else running;
* while ``--processes`` other processes run ``--fn`` over the same messages, as a pool's workers
  do: on a machine whose memory bandwidth is shared (a VM's vCPUs), the copy then costs more,
  and that is the floor a pool's parent meets while its workers run.

A pool's parent CPU per message (``ordpool bench``) also includes unpickling the results,
reading results out of shared memory, and its threads; this is the part no pool can avoid.

Usage: ``python bench/copyfloor.py --input /tmp/tweets.ndjson --fn bench.tweets:project``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections import deque
from multiprocessing import shared_memory
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool.bench import load_callable, read_input

REGION = 8 << 20  # as ordpool's regions


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def copy_cost(messages: list[bytes], rounds: int) -> float:
    """Median CPU microseconds per message to copy every message into a region once."""
    shm = shared_memory.SharedMemory(create=True, size=REGION)
    try:
        mapping = shm._mmap  # type: ignore[attr-defined]
        costs = []
        for _ in range(rounds):
            start = _cpu()
            batch: list[bytes] = []
            size = 0
            for message in messages:  # batches that fit a region, as ordpool's do
                if size + len(message) > REGION:
                    mapping.seek(0)
                    deque(map(mapping.write, batch), maxlen=0)
                    batch, size = [], 0
                batch.append(message)
                size += len(message)
            mapping.seek(0)
            deque(map(mapping.write, batch), maxlen=0)
            costs.append((_cpu() - start) / len(messages) * 1e6)
        return statistics.median(costs)
    finally:
        shm.close()
        shm.unlink()


def _load(fn_name: str, path: str, n: int, ready: mp.Event, stop: mp.Event) -> None:  # type: ignore[type-arg]
    fn = load_callable(fn_name)
    messages = read_input(path, n)
    ready.set()
    while not stop.is_set():
        for message in messages:
            fn(message)
            if stop.is_set():
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="one message per line")
    parser.add_argument("--fn", required=True, help="MODULE:FUNCTION the load processes run")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    messages = read_input(args.input, args.messages)
    size = sum(map(len, messages)) / len(messages)
    alone = copy_cost(messages, args.rounds)
    ctx = mp.get_context("spawn")
    readies = [ctx.Event() for _ in range(args.processes)]
    stop = ctx.Event()
    procs = [
        ctx.Process(target=_load, args=(args.fn, args.input, args.messages, ready, stop))
        for ready in readies
    ]
    for proc in procs:
        proc.start()
    try:
        for ready in readies:
            ready.wait(120)
        time.sleep(0.5)
        loaded = copy_cost(messages, args.rounds)
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    print(f"copy floor: {len(messages):,} messages of {size:.0f} B, medians of {args.rounds}")
    print(f"  one copy into shared memory, alone          {alone:6.2f} us/msg of CPU")
    print(
        f"  the same, {args.processes} processes running {args.fn:<14} {loaded:6.2f} us/msg of CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
