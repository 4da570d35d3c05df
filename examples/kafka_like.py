"""A Kafka-like consumer: one partition's messages, decoded in parallel, committed in order.

The example writes a partition-like log to a temporary directory: one message per line,
``offset<TAB>json``, with offsets above 2**32 and gaps (as in a compacted topic), and one
malformed message. Then:

* a producer thread reads the log and hands the messages to ``pool.enqueue_many(offsets,
  raw_bytes)`` in bunches of up to 500, as a broker client's ``consume(500)`` returns them
  (``pool.enqueue(offset, raw)`` per message works too, at more CPU per message; raw
  ``bytes`` travel to the workers without pickling);
* each worker builds its state once, in ``init``: an orjson decoder and a counter (orjson:
  ``pip install orjson``, or the ``bench`` extra);
* a consumer thread iterates ``pool.results()`` and prints ``offset<TAB>value`` in offset
  order, which is what a consumer needs to commit offsets safely;
* the main thread closes the pool once the producer is done, and checks everything: offsets
  strictly increasing, every offset of the log present once, every value equal to a serial
  decode, and the malformed message failing alone, at its own offset.

Run: ``python examples/kafka_like.py [--messages N] [--workers W] [--start-method M]
[--quiet]``. It prints a summary line starting with ``OK:`` and exits 0, or prints ``FAIL:``
lines to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import threading
from typing import Any

import orjson

import ordpool

FIRST_OFFSET = 5_000_000_000  # above 2**32, like a long-lived partition


# -- the log --------------------------------------------------------------------------------------


def write_partition_log(path: str, n: int, seed: int = 11) -> dict[int, bytes]:
    """Write ``n`` messages as ``offset<TAB>json`` lines; return ``{offset: raw message}``."""
    rng = random.Random(seed)
    messages: dict[int, bytes] = {}
    offset = FIRST_OFFSET
    with open(path, "wb") as f:
        for seq in range(n):
            offset += rng.choice((1, 1, 1, 2, 3, 17))  # gaps: compacted or aborted records
            if seq == n // 2:
                raw = b'{"user": "u1", "amount": '  # malformed: cut short
            else:
                msg = {
                    "seq": seq,
                    "user": f"u{rng.randrange(1000)}",
                    "amount": rng.randrange(1, 100_000) / 100,
                    "items": [rng.randrange(50) for _ in range(rng.randrange(1, 6))],
                }
                raw = orjson.dumps(msg)
            f.write(b"%d\t%s\n" % (offset, raw))
            messages[offset] = raw
    return messages


def read_partition_log(path: str):
    """Yield ``(offset, raw message)`` from the log, in log order."""
    with open(path, "rb") as f:
        for line in f:
            offset, _, raw = line.rstrip(b"\n").partition(b"\t")
            yield int(offset), raw


# -- the workers ----------------------------------------------------------------------------------


def make_state() -> dict[str, Any]:
    """Per-worker state, built once per worker process: the decoder and a counter."""
    return {"loads": orjson.loads, "decoded": 0, "pid": os.getpid()}


def summarize(msg: dict[str, Any]) -> str:
    """What the pipeline computes per message (and the check recomputes serially)."""
    return f"{msg['user']}:{round(msg['amount'] * 100)}c:{sum(msg['items'])}"


def handle(state: dict[str, Any], raw: bytes) -> tuple[str, int, int]:
    """Decode and summarize one message; returns ``(summary, pid, decoded so far)``."""
    msg = state["loads"](raw)  # a malformed message raises orjson.JSONDecodeError here
    state["decoded"] += 1
    return summarize(msg), state["pid"], state["decoded"]


# -- the pipeline ---------------------------------------------------------------------------------


def run(n: int, workers: int, start_method: str | None, quiet: bool, directory: str) -> int:
    path = os.path.join(directory, "partition-0.log")
    messages = write_partition_log(path, n)
    failures: list[str] = []
    received: list[ordpool.Result] = []
    producer_error: list[BaseException] = []

    with ordpool.ProcessOrderedPool(
        handle, workers=workers, init=make_state, start_method=start_method
    ) as pool:

        def produce() -> None:
            try:
                offsets: list[int] = []
                raws: list[bytes] = []
                for offset, raw in read_partition_log(path):
                    offsets.append(offset)
                    raws.append(raw)
                    if len(offsets) == 500:
                        pool.enqueue_many(offsets, raws)  # blocks while the window is full
                        offsets, raws = [], []
                pool.enqueue_many(offsets, raws)  # the last bunch (an empty one is fine)
            except BaseException as exc:
                producer_error.append(exc)

        def consume() -> None:
            out = sys.stdout
            for result in pool.results():  # ascending offset order
                received.append(result)
                if not quiet:
                    shown = result.value[0] if result.ok else f"ERROR {type(result.error).__name__}"
                    out.write(f"{result.index}\t{shown}\n")

        producer = threading.Thread(target=produce, name="producer")
        consumer = threading.Thread(target=consume, name="consumer")
        consumer.start()
        producer.start()
        producer.join()
        pool.close()  # no more messages: results() ends after the last one
        consumer.join()

    # -- the checks ------------------------------------------------------------------------------
    if producer_error:
        failures.append(f"the producer failed: {producer_error[0]!r}")
    offsets = [r.index for r in received]
    if any(b <= a for a, b in itertools.pairwise(offsets)):
        failures.append("offsets are not strictly increasing")
    if offsets != sorted(messages):
        missing = set(messages) - set(offsets)
        failures.append(f"{len(missing)} offsets missing, {len(offsets) - len(set(offsets))} dup")
    malformed = []
    decoded_by: dict[int, int] = {}
    for result in received:
        raw = messages.get(result.index)
        try:
            expected = summarize(orjson.loads(raw)) if raw is not None else None
        except orjson.JSONDecodeError:
            malformed.append(result.index)
            if not isinstance(result.error, orjson.JSONDecodeError):
                failures.append(f"offset {result.index}: expected a JSONDecodeError")
            continue
        if not result.ok:
            failures.append(f"offset {result.index}: unexpected error {result.error!r}")
        elif result.value[0] != expected:
            failures.append(f"offset {result.index}: {result.value[0]!r} != {expected!r}")
        else:
            _, pid, count = result.value
            decoded_by[pid] = max(decoded_by.get(pid, 0), count)
    if len(malformed) != 1:
        failures.append(f"expected exactly one malformed message, got {len(malformed)}")
    if sum(decoded_by.values()) != len(received) - len(malformed):
        failures.append(f"the workers' counters {decoded_by} do not add up: state was not kept")

    if failures:
        for line in failures[:20]:
            print(f"FAIL: {line}", file=sys.stderr)
        return 1
    gaps = (offsets[-1] - offsets[0] + 1) - len(offsets)
    per_worker = " / ".join(str(c) for _, c in sorted(decoded_by.items()))
    print(
        f"OK: {len(offsets)} messages, offsets {offsets[0]}..{offsets[-1]} "
        f"({gaps} offsets skipped), in order, 1 malformed at offset {malformed[0]}, "
        f"{len(decoded_by)} workers decoded {per_worker}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None)
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.messages < 4:
        parser.error("--messages must be at least 4")
    with tempfile.TemporaryDirectory(prefix="ordpool-kafka-like-") as directory:
        return run(args.messages, args.workers, args.start_method, args.quiet, directory)


if __name__ == "__main__":
    sys.exit(main())
