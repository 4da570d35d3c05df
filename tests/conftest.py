"""Shared fixtures: start methods, and proof that no test leaves a process or a descriptor.

Every test that takes ``start_method`` runs under each start method in ``START_METHODS``
(``fork`` and ``spawn`` by default; set ``ORDPOOL_TEST_START_METHODS=fork,spawn,forkserver``
to add more). The autouse ``no_leaks`` fixture fails a test that leaves a child process or an
open file descriptor behind.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import time

import psutil
import pytest

START_METHODS = os.environ.get("ORDPOOL_TEST_START_METHODS", "fork,spawn").split(",")

# A shell starts a background job (`make test &`) with SIGINT ignored, and Python then never
# raises KeyboardInterrupt, in this process or in the interpreters the tests start. The Ctrl-C
# tests need the handler a terminal gives: set it here (a handled signal is reset to its
# default in a child that execs, so the tests' subprocesses get theirs too).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Long-lived helpers that multiprocessing starts once per parent process; not leaks.
_HELPERS = ("forkserver", "resource_tracker")


def _is_helper(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return any(h in cmdline for h in _HELPERS)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if not _is_helper(p)}


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(scope="session", autouse=True)
def _start_helpers() -> None:
    # Start multiprocessing's helper processes up front, so that their descriptors exist
    # before the first leak check.
    multiprocessing.resource_tracker.ensure_running()
    if "forkserver" in START_METHODS:
        multiprocessing.forkserver.ensure_running()


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return request.param


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("ray"):
        yield
        return
    children, fds = _children(), _fds()
    yield
    gc.collect()
    ok = wait_until(lambda: not (_children() - children), timeout=10)
    left = _children() - children
    for pid in left:  # do not let one failure cascade into every later test
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert ok, f"child processes left behind: {sorted(left)}"
    wait_until(lambda: not (_fds() - fds), timeout=5)
    leaked = _fds() - fds
    details = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in leaked
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not leaked, f"file descriptors left open: {details}"
