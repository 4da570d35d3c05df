"""The floor of ``decode`` (orjson -> full dict) for any process pool, measured in one process.

A pool must decode each message in a worker (``orjson.loads``), pickle the dict there
(``pickle.dumps``), and rebuild it in the parent (``pickle.loads``). Those three costs, measured
here side by side with serial decoding, in rounds, bound every pool from below:

* the parent alone caps throughput at ``1 / pickle.loads``, whatever the number of workers;
* on ``C`` cores shared by the parent and the workers, throughput is at most
  ``C / (orjson.loads + pickle.dumps + pickle.loads)``: the CPU each message needs, at the least;

and each is compared with serial ``orjson.loads`` (issue 3's target: 0.5x serial on 2 cores).
Python overheads (the batch loop, copying messages and results, threads) only add to these.

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

from ordpool._bench import make_messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    messages = make_messages(args.messages)
    dicts = [orjson.loads(m) for m in messages]
    pickles = [pickle.dumps(d, pickle.HIGHEST_PROTOCOL) for d in dicts]
    protocol = pickle.HIGHEST_PROTOCOL
    cases = {
        "orjson.loads (serial decode)": lambda: deque(map(orjson.loads, messages), maxlen=0),
        "pickle.dumps of the dict": lambda: deque(
            (pickle.dumps(d, protocol) for d in dicts), maxlen=0
        ),
        "pickle.loads of the dict": lambda: deque(map(pickle.loads, pickles), maxlen=0),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # rounds: a drift of the machine hits every case alike
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(messages) * 1e6)
    us = {name: statistics.median(v) for name, v in times.items()}
    serial, dumps, loads = us.values()
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
