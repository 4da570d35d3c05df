"""The floor of ``decode`` (orjson -> full dict) for any process pool, measured in one process.

A pool must decode each message in a worker (``orjson.loads``), pickle the dict there, and
rebuild it in the parent by unpickling. Those costs, measured here side by side with serial
decoding, in rounds, bound every pool from below:

* the parent alone caps throughput at ``1 / unpickling``, whatever the number of workers;
* on ``C`` cores shared by the parent and the workers, throughput is at most
  ``C / (orjson.loads + pickling + unpickling)``: the CPU each message needs, at the least;

and each is compared with serial ``orjson.loads`` (issue 3's target: 0.5x serial on 2 cores).
Pickling is measured two ways: one dict per pickle (``ProcessPoolExecutor`` at chunksize 1,
ordpool before chunks), and in chunks of ``k`` dicts per pickle as ordpool sends large results
(``ordpool.bench.result_chunk_length``), where the dicts' common keys are pickled and rebuilt
once. The caps use the cheaper of the two. Python overheads (the batch loop, copying messages and
results, threads) only add to these.

Usage: ``python bench/floor.py [--messages 2000] [--rounds 30] [--cores 2]``
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool.bench import PICKLE_PROTOCOL, make_messages, result_chunk_length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    messages = make_messages(args.messages)
    dicts = [orjson.loads(m) for m in messages]
    protocol = PICKLE_PROTOCOL
    k = result_chunk_length(len(pickle.dumps(dicts[0], protocol)))
    starts = range(0, len(dicts), k)
    pickles = [pickle.dumps(d, protocol) for d in dicts]
    chunks = [pickle.dumps(dicts[i : i + k], protocol) for i in starts]
    cases = {
        "orjson.loads (serial decode)": lambda: deque(map(orjson.loads, messages), maxlen=0),
        "pickle.dumps, one dict": lambda: deque(
            (pickle.dumps(d, protocol) for d in dicts), maxlen=0
        ),
        "pickle.loads, one dict": lambda: deque(map(pickle.loads, pickles), maxlen=0),
        f"pickle.dumps, chunks of {k}": lambda: deque(
            (pickle.dumps(dicts[i : i + k], protocol) for i in starts), maxlen=0
        ),
        f"pickle.loads, chunks of {k}": lambda: deque(map(pickle.loads, chunks), maxlen=0),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # rounds: a drift of the machine hits every case alike
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(messages) * 1e6)
    us = {name: statistics.median(v) for name, v in times.items()}
    serial, dumps1, loads1, dumps_k, loads_k = us.values()
    dumps, loads = min(dumps1, dumps_k), min(loads1, loads_k)
    size = sum(map(len, messages)) / len(messages)
    print(f"decode floor: {len(messages):,} messages of {size:.0f} B, medians of {args.rounds}")
    for name, value in us.items():
        print(f"  {name:<30} {value:6.2f} us/msg")
    caps = {
        "parent alone, any core count": 1 / loads,
        f"{args.cores} cores, parent + workers": args.cores / (serial + dumps + loads),
    }
    for name, cap in caps.items():
        print(f"  {name:<30} <= {cap:5.2f}M msg/s = {cap * serial:.2f}x serial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
