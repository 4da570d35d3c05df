"""Exit and shutdown never hang: each scenario runs in a fresh interpreter, several times per
start method, with a timeout; the interpreter must exit and leave no worker behind.

``ORDPOOL_STRESS_REPS`` sets the repetitions (default 2; a stress run: 50).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import psutil
import pytest
from conftest import wait_until

REPS = int(os.environ.get("ORDPOOL_STRESS_REPS", "2"))
METHODS = ["fork", "spawn", "forkserver"]

_SCRIPT = r"""
import multiprocessing, os, signal, sys, threading, time
import concurrent.futures as cf
import ordpool

def nap(x):
    time.sleep(0.05)
    return x

def later(seconds, fn, *args):
    threading.Timer(seconds, fn, args).start()

if __name__ == "__main__":
    method, scenario = sys.argv[1], sys.argv[2]
    context = multiprocessing.get_context(method)
    executor = ordpool.OrderedProcessPoolExecutor(2, mp_context=context)
    first = executor.submit(nap, 1)
    assert first.result(timeout=60) == 1
    print(" ".join(map(str, executor._processes)), flush=True)
    if scenario == "exit_with_work_pending":
        futures = [executor.submit(nap, i) for i in range(20)]  # no shutdown: exit does it
    elif scenario == "shutdown_nowait_then_exit":
        futures = [executor.submit(nap, i) for i in range(20)]
        executor.shutdown(wait=False)
    elif scenario == "ctrl_c_during_map":
        later(0.2, os.kill, os.getpid(), signal.SIGINT)
        try:
            for _ in executor.map(nap, range(10_000)):
                pass
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            raise AssertionError("the map ran to its end")
    elif scenario == "worker_killed_during_shutdown":
        futures = [executor.submit(nap, i) for i in range(40)]
        victim = next(iter(executor._processes))
        later(0.1, os.kill, victim, signal.SIGKILL)
        executor.shutdown(wait=True)
        for f in futures:
            assert f.done()
            if f.exception() is not None:
                assert isinstance(f.exception(), cf.process.BrokenProcessPool), f.exception()
    elif scenario == "two_live_executors":
        other = ordpool.OrderedProcessPoolExecutor(2, mp_context=context)
        futures = [e.submit(nap, i) for i in range(10) for e in (executor, other)]
        print(" ".join(map(str, other._processes)), flush=True)
    print("end", flush=True)
"""

SCENARIOS = [
    "exit_with_work_pending",
    "shutdown_nowait_then_exit",
    "ctrl_c_during_map",
    "worker_killed_during_shutdown",
    "two_live_executors",
]


@pytest.mark.timeout(120 + 60 * REPS)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("method", METHODS)
def test_the_interpreter_exits_and_leaves_no_worker(
    method: str, scenario: str, tmp_path: pathlib.Path
) -> None:
    script = tmp_path / "scenario.py"
    script.write_text(_SCRIPT)
    for _ in range(REPS):
        proc = subprocess.run(
            [sys.executable, str(script), method, scenario],
            capture_output=True,
            text=True,
            timeout=60,  # a hang fails here
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.split("\n")
        assert lines[-2] == "end", proc.stdout
        if scenario == "ctrl_c_during_map":
            assert "interrupted" in lines
        pids = [int(pid) for line in lines[:-2] if line[:1].isdigit() for pid in line.split()]
        assert len(pids) == (4 if scenario == "two_live_executors" else 2)
        assert wait_until(lambda pids=pids: not any(map(_running, pids)), timeout=30), pids


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
