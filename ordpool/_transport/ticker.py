"""A periodic signal for the worker while it runs a task: a POSIX timer (``timer_create``)
on the monotonic clock, through ``ctypes``.

A worker uses it to notice, by itself, a task that runs much longer than its items usually
take (:class:`.worker.EarlyResults`): the timer is armed when a task starts and disarmed when
it ends, two system calls per task; only a task that overruns gets the signal. (A signal
costs a worker 20 to 30 us of CPU on the project's VM: a timer ticking through every task
would cost more than the slow items it finds.) The signal's Python
handler then runs in the worker's main thread between two bytecodes of the user's function, or
during its ``sleep``. Unlike ``signal.setitimer``, the timer sends a signal of our choice, not
``SIGALRM``, which user code may use for its own timeouts (``signal.alarm``).

Where ``timer_create`` is missing (not Linux, or a C library without it), :func:`new_ticker`
returns ``None`` and the parent's watch alone finds slow items (``ProcessTransport._look``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
from typing import Any

__all__ = ["Ticker", "new_ticker"]

_CLOCK_MONOTONIC = 1
_SIGEV_SIGNAL = 0


class _Sigevent(ctypes.Structure):
    # Linux's struct sigevent: 64 bytes, of which we set the signal and how it is delivered.
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_rest", ctypes.c_byte * 48),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _every(seconds: float) -> _Itimerspec:
    sec, nsec = int(seconds), round((seconds % 1) * 1e9)
    step = _Timespec(sec, nsec)
    return _Itimerspec(step, _Timespec(sec, nsec))


class Ticker:
    """A timer of this process that sends ``signum`` after ``seconds``, then every ``seconds``,
    while armed.

    >>> import signal, time
    >>> ticks = []
    >>> old = signal.signal(signal.SIGRTMIN + 4, lambda *a: ticks.append(1))
    >>> t = new_ticker(signal.SIGRTMIN + 4)
    >>> t.arm(0.001); time.sleep(0.2); t.disarm()
    >>> len(ticks) >= 3  # about 200 (a loaded machine coalesces some)
    True
    >>> n = len(ticks); time.sleep(0.01); len(ticks) == n  # disarmed: no more ticks
    True
    >>> t.close(); _ = signal.signal(signal.SIGRTMIN + 4, old)
    """

    __slots__ = ("_delete", "_off", "_settime", "_timer")

    def __init__(self, libc: Any, timer: ctypes.c_void_p) -> None:
        self._timer = timer
        self._settime = libc.timer_settime
        self._delete = libc.timer_delete
        self._off = ctypes.byref(_Itimerspec())

    def arm(self, seconds: float) -> None:
        """Tick ``seconds`` from now, then every ``seconds``."""
        self._settime(self._timer, 0, ctypes.byref(_every(seconds)), None)

    def disarm(self) -> None:
        self._settime(self._timer, 0, self._off, None)

    def close(self) -> None:
        self.disarm()
        self._delete(self._timer)


def _libc() -> Any:
    """The C library that has ``timer_create`` (glibc 2.34+ has it, older ones in librt)."""
    for name in (None, ctypes.util.find_library("rt")):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.timer_create  # noqa: B018 - raises AttributeError when missing
        except (OSError, AttributeError):
            continue
        return lib
    return None


def new_ticker(signum: int) -> Ticker | None:
    """A disarmed :class:`Ticker`, or ``None`` where POSIX timers are not available here.

    The signal is set to restart interrupted system calls (``SA_RESTART``): a C library
    reading a socket in the user's function sees no ``EINTR`` for a tick; ``time.sleep`` is
    interrupted all the same, so a sleeping item is still noticed.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()
    if libc is None:
        return None
    libc.timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.timer_delete.argtypes = [ctypes.c_void_p]
    event = _Sigevent()
    event.sigev_signo = signum
    event.sigev_notify = _SIGEV_SIGNAL
    timer = ctypes.c_void_p()
    if libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
        return None
    try:
        signal.siginterrupt(signum, False)
    except (OSError, ValueError):
        pass
    return Ticker(libc, timer)
