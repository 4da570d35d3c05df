"""Per-user sessions with worker-local state, results in global order.

A stream of click events for many users goes through ``imap_keyed``: every event of a user runs
on the same worker, one at a time, in stream order, so that worker can keep the user's session
(event count, running total, last page) in its state without locks or a shared store. Results
come back in the global stream order.

Run: ``python examples/keyed_sessions.py [n_events]``. It checks itself against a serial
computation and exits non-zero on any mismatch.
"""

from __future__ import annotations

import os
import random
import sys

import ordpool


def new_sessions() -> dict:
    """Worker state: user -> session. Built once per worker process."""
    return {}


def track(sessions: dict, event: tuple[str, str, int]) -> tuple[str, int, int, str]:
    """Update the user's session with one event; return (user, events so far, total, pid)."""
    user, page, amount = event
    session = sessions.setdefault(user, {"events": 0, "total": 0, "last": None})
    session["events"] += 1
    session["total"] += amount
    session["last"] = page
    return user, session["events"], session["total"], str(os.getpid())


def make_events(n: int, users: int = 500, seed: int = 7) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [
        (f"user-{rng.randrange(users)}", f"/page/{rng.randrange(20)}", rng.randrange(100))
        for _ in range(n)
    ]


def main(n: int = 50_000) -> int:
    events = make_events(n)
    with ordpool.ProcessOrderedPool(track, workers=2, init=new_sessions) as pool:
        results = list(pool.imap_keyed((event[0], event) for event in events))

    # The same computation, serially, must give the same answers in the same order.
    expected, serial = [], {}
    for event in events:
        user, n_events, total, _ = track(serial, event)
        expected.append((user, n_events, total))
    got = [(user, n_events, total) for user, n_events, total, _ in results]
    workers_per_user: dict[str, set[str]] = {}
    for user, _, _, pid in results:
        workers_per_user.setdefault(user, set()).add(pid)

    ok = got == expected and all(len(pids) == 1 for pids in workers_per_user.values())
    users = len(workers_per_user)
    pids = len(set().union(*workers_per_user.values()))
    print(f"{len(results)} events, {users} users on {pids} workers, in order: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
